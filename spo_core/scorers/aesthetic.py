"""The LAION improved aesthetic predictor: an MLP on the L2-normalized CLIP ViT-L/14 image embedding.

The head (`sac+logos+ava1-l14-linearMSE.pth`, keys layers.{0,2,4,6,7}) has no activations
("linearMSE"); its input is OpenAI CLIP ViT-L/14's projected image embedding (768-d), which
needs QuickGELU. A transformers folder of openai/clip-vit-large-patch14 says so in its
config.json and our CLIP follows it; an OpenAI `ViT-L-14.pt` archive or state dict is built
with QuickGELU by open_clip. Output roughly on the AVA 1-10 scale.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelMismatchError, WeightsNotFoundError
from ..safe_io import load_state_dict
from .backbones import ClipBackbone, load_clip_backbone
from .base import Scorer
from .preprocess import clip_processor_pixels

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
CLIP_HINT = ("OpenAI CLIP ViT-L/14: a local transformers folder of huggingface.co/openai/clip-vit-large-patch14 "
             "or OpenAI's ViT-L-14.pt")
HINT = (f"the aesthetic head {HEAD_FILE} (github.com/christophschuhmann/improved-aesthetic-predictor, 3.7 MB) "
        f"and {CLIP_HINT}")


class AestheticHead(nn.Module):
    """Linear(768,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout Linear(64,16) Linear(16,1), no activations."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def find_aesthetic_files(path: str | os.PathLike, clip: str | os.PathLike | None) -> tuple[Path, Path]:
    """(head file, CLIP folder or file): `path` is the head file, or a folder holding it and a CLIP subfolder/file."""
    p = Path(path).expanduser()
    if p.is_dir():
        head = p / HEAD_FILE
        if not head.is_file():
            heads = sorted(p.glob("*.pth"))
            if len(heads) != 1:
                raise WeightsNotFoundError(f"{p} holds no aesthetic head {HEAD_FILE}. Download {HINT}.")
            head = heads[0]
        if clip is None:
            cands = [d for d in sorted(p.iterdir()) if d.is_dir() and (d / "config.json").is_file()]
            cands += [f for f in sorted(p.glob("*.pt")) if "L-14" in f.name or "l14" in f.name.lower()]
            if not cands:
                raise WeightsNotFoundError(f"{p} holds no CLIP ViT-L/14 (a subfolder with config.json, or ViT-L-14.pt). "
                                           f"Download {CLIP_HINT}, or pass it with the clip option.")
            clip = cands[0]
    else:
        head = p
        if not head.is_file():
            raise WeightsNotFoundError(f"aesthetic head not found: {head}. Download {HINT}.")
        if clip is None:
            raise WeightsNotFoundError(f"the aesthetic scorer also needs {CLIP_HINT}: pass it with the clip option "
                                       "(CLI: --clip), or put head and CLIP in one folder")
    return head, Path(clip).expanduser()


def load_aesthetic_head(path: Path) -> AestheticHead:
    sd, _ = load_state_dict(path)
    w = sd.get("layers.0.weight")
    head = AestheticHead(w.shape[1] if w is not None and w.ndim == 2 else 768)
    try:
        head.load_state_dict(sd)
    except RuntimeError as exc:
        raise ModelMismatchError(f"{path} is not a LAION aesthetic MLP head (keys layers.0..7): {str(exc)[:400]}") from exc
    return head.eval().requires_grad_(False)


class AestheticScorer(Scorer):
    name = "aesthetic"
    spo_scale = False  # not a preference logit: SPO calibrates its pair threshold
    differentiable = True
    needs_prompt = False

    def __init__(self, backbone: ClipBackbone, head: AestheticHead, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.backbone = backbone
        self.head = head
        backbone.to(device, dtype)
        head.to(device=device, dtype=torch.float32)  # 3.7 MB: kept in fp32

    @classmethod
    def from_path(cls, path: str | os.PathLike, clip: str | os.PathLike | None = None, device="cpu",
                  dtype=torch.float32, model_name: str | None = None) -> "AestheticScorer":
        head_path, clip_path = find_aesthetic_files(path, clip)
        head = load_aesthetic_head(head_path)
        backbone = load_clip_backbone(clip_path, "cpu", dtype, model_name=model_name, what=f"CLIP ViT-L/14 ({CLIP_HINT})")
        dim = backbone.embed_dim
        if dim != head.layers[0].in_features:
            raise ModelMismatchError(f"the CLIP at {clip_path} embeds into {dim} dimensions but the head {head_path.name} "
                                     f"expects {head.layers[0].in_features}: use OpenAI CLIP ViT-L/14")
        return cls(backbone, head, device, dtype)

    def modules(self):
        return [self.backbone.module, self.head]

    def _move(self, device, dtype):
        self.backbone.to(device, dtype)
        self.head.to(device=device)

    def _score(self, images, prompts, timesteps):
        emb = self.backbone.image_embeddings(clip_processor_pixels(images, self.backbone.image_size))
        return self.head(emb).squeeze(-1)
