"""Scorers on a plain CLIP: PickScore and CLIP score.

Both preprocess like transformers' CLIPImageProcessor (shortest side 224, bicubic, center crop,
OpenAI normalization), in torch so that they are differentiable.
"""

from __future__ import annotations

import os

import torch

from .backbones import ClipBackbone, load_clip_backbone
from .base import Scorer
from .preprocess import clip_processor_pixels

PICKSCORE_HINT = ("a local copy of the folder huggingface.co/yuvalkirstain/PickScore_v1 "
                  "(config.json + model.safetensors or pytorch_model.bin; tokenizer files optional)")
CLIP_HINT = ("a local transformers CLIP folder (config.json + model.safetensors), e.g. openai/clip-vit-large-patch14, "
             "or an open_clip / OpenAI CLIP file (with model_name for non-OpenAI open_clip architectures)")


class CLIPFeatureScorer(Scorer):
    """Shared machinery: cosine of normalized image and prompt embeddings of one CLIP backbone."""

    differentiable = True
    needs_prompt = True

    def __init__(self, backbone: ClipBackbone, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.backbone = backbone
        backbone.to(device, dtype)

    def modules(self):
        return [self.backbone.module]

    def _move(self, device, dtype):
        self.backbone.to(device, dtype)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_processor_pixels(images, self.backbone.image_size)
        return (self.backbone.image_embeddings(pixels) * self.backbone.text_embeddings(prompts)).sum(-1)


class PickScoreScorer(CLIPFeatureScorer):
    """PickScore_v1: exp(logit_scale) * cos(image, prompt) on CLIP ViT-H/14 (about 18-24 for real images)."""

    name = "pickscore"

    @classmethod
    def from_path(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32,
                  tokenizer_path: str | None = None) -> "PickScoreScorer":
        return cls(load_clip_backbone(path, "cpu", dtype, tokenizer_path=tokenizer_path,
                                      what=f"PickScore model (expected {PICKSCORE_HINT})"), device, dtype)

    def _score(self, images, prompts, timesteps):
        return self.backbone.logit_scale() * self.cosine(images, prompts)


class CLIPScoreScorer(CLIPFeatureScorer):
    """CLIP score: scale * max(cos(image, prompt), 0). scale 100 is torchmetrics' CLIPScore,
    2.5 Hessel et al.'s CLIP-S, 1 the raw cosine (clipped at 0)."""

    name = "clip"

    def __init__(self, backbone: ClipBackbone, device="cpu", dtype=torch.float32, scale: float = 100.0):
        super().__init__(backbone, device, dtype)
        self.scale = float(scale)

    @classmethod
    def from_path(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32, scale: float = 100.0,
                  model_name: str | None = None, tokenizer_path: str | None = None) -> "CLIPScoreScorer":
        backbone = load_clip_backbone(path, "cpu", dtype, model_name=model_name, tokenizer_path=tokenizer_path,
                                      what=f"CLIP model (expected {CLIP_HINT})")
        return cls(backbone, device, dtype, scale)

    def _score(self, images, prompts, timesteps):
        return self.scale * self.cosine(images, prompts).clamp(min=0)
