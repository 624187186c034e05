"""HPS v2 / v2.1: cosine similarity on an open_clip ViT-H-14 fine-tuned on human preferences.

Loaded from the local `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` (a `{'state_dict'}`
torch file, weights-only) into open_clip's architecture, with HPS's own preprocessing: the
longest side to 224 (bicubic), centered black padding to a square, CLIP normalization. The
score is cos(image, prompt) with no logit scale (HPS's benchmarks print 100x). v2 and v2.1
scores are not comparable with each other.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import WeightsNotFoundError
from .backbones import OpenClipBackbone
from .base import Scorer
from .preprocess import hps_pixels

HPS_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")
HINT = f"{HPS_FILES[0]} (v2.1) or {HPS_FILES[1]} (v2.0) from huggingface.co/xswu/HPSv2; needs open_clip_torch"


def find_hps_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        cands = [p / n for n in HPS_FILES if (p / n).is_file()] or sorted(p.glob("HPS_v2*.pt"))
        if not cands:
            raise WeightsNotFoundError(f"{p} holds no HPS checkpoint. Download {HINT}.")
        return cands[0]
    if not p.is_file():
        raise WeightsNotFoundError(f"HPS checkpoint not found: {p}. Download {HINT}.")
    return p


class HPSv2Scorer(Scorer):
    name = "hpsv2"
    pair_scale = 100.0  # a raw cosine; PickScore's scale is exp(logit_scale) = 100
    differentiable = True
    needs_prompt = True

    def __init__(self, backbone: OpenClipBackbone, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.backbone = backbone
        backbone.to(device, dtype)

    @classmethod
    def from_path(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32, model_name: str = "ViT-H-14") -> "HPSv2Scorer":
        from .open_clip_loading import load_open_clip_model

        model, tokenizer = load_open_clip_model(find_hps_file(path), model_name, "cpu", dtype)
        return cls(OpenClipBackbone(model, tokenizer), device, dtype)

    def modules(self):
        return [self.backbone.module]

    def _move(self, device, dtype):
        self.backbone.to(device, dtype)

    def _score(self, images, prompts, timesteps):
        pixels = hps_pixels(images, self.backbone.image_size)
        return (self.backbone.image_embeddings(pixels) * self.backbone.text_embeddings(prompts)).sum(-1)
