"""DDPO's weight-free rewards: JPEG incompressibility (file size in kB at quality 95) and compressibility (its negative)."""

from __future__ import annotations

import io

import torch
from PIL import Image

from .base import Scorer


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (bytes / 1000) of each image saved as JPEG, exactly as ddpo-pytorch's rewards.py."""
    arr = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JPEGIncompressibilityScorer(Scorer):
    name = "jpeg_incompressibility"
    spo_scale = False  # not a preference logit: SPO calibrates its pair threshold
    needs_prompt = False

    def __init__(self, device="cpu", dtype=torch.float32, quality: int = 95):
        super().__init__(device, dtype)
        self.quality = quality

    def _score(self, images, prompts, timesteps):
        return jpeg_sizes_kb(images, self.quality).to(self.device)


class JPEGCompressibilityScorer(JPEGIncompressibilityScorer):
    name = "jpeg_compressibility"

    def _score(self, images, prompts, timesteps):
        return -jpeg_sizes_kb(images, self.quality).to(self.device)
