"""The scorer protocol: `score(images, prompts, timesteps=None) -> Tensor[B]`.

Images are float tensors [B,3,H,W] in [0,1] on any device; prompts are one string (for every
image) or B strings; timesteps are the DDPM timesteps (0..999) of the predicted-x0 images
being scored (0 for final images), used by step-aware scorers only. Preprocessing happens in
torch on the tensor, so a differentiable scorer keeps the autograd graph when the images
require grad; otherwise scoring runs under no_grad.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ConfigError, InvalidTensorError


@dataclass(frozen=True)
class ScorerInfo:
    name: str
    description: str
    needs_weights: bool
    weights_hint: str  # what file/folder to give, and where it comes from
    step_aware: bool
    differentiable: bool
    needs_prompt: bool


class Scorer(ABC):
    name: str = "scorer"
    step_aware: bool = False
    differentiable: bool = False
    needs_prompt: bool = True
    # SPO's pair threshold (0.3 / 0.4) is set on the 2-way softmax of PickScore-scale scores
    # (100 * cosine): a scorer on another scale multiplies its scores by this before that softmax
    pair_scale: float = 1.0
    # False for scores on a scale of their own (JPEG kB, aesthetic ratings): SPO training then
    # calibrates its pair threshold from the first sampling round (auto_threshold)
    spo_scale: bool = True
    # what `score` takes: "pixels" (decoded images [B,3,H,W] in [0,1]) or "latent" (the model's own
    # latents [B,C,h,w] at a timestep, LPO's latent reward model): samplers skip the decode for latent scorers
    input_kind: str = "pixels"

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype

    @abstractmethod
    def _score(self, images: torch.Tensor, prompts: list[str] | None, timesteps: torch.Tensor | None) -> torch.Tensor:
        """Scores of validated inputs: images on self.device, float32 in [0,1]."""

    def score(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None,
              timesteps: torch.Tensor | int | float | None = None) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] != 3:
            raise InvalidTensorError(
                f"the {self.name} scorer scores decoded images [B,3,H,W] in [0,1], not {images.shape[1]}-channel latents: "
                "decode them first, or use a latent scorer (lrm)")
        images = check_images(images)
        b = images.shape[0]
        prompt_list = normalize_prompts(prompts, b, self.needs_prompt, self.name)
        ts = normalize_timesteps(timesteps, b) if self.step_aware else None
        images = images.to(self.device, torch.float32)
        if ts is not None:
            ts = ts.to(self.device)
        if self.differentiable and images.requires_grad:
            return self._score(images, prompt_list, ts).float()
        with torch.no_grad():
            return self._score(images, prompt_list, ts).float()

    def to(self, device=None, dtype=None) -> "Scorer":
        """Move the model (hosts offload scorers between uses)."""
        self._move(device, dtype)
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    def _move(self, device, dtype) -> None:
        for module in self.modules():
            module.to(device=device, dtype=dtype)

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules this scorer owns (for offloading and memory accounting)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"


def check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise InvalidTensorError(f"images must be a torch tensor [B,3,H,W] in [0,1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidTensorError(f"images must have shape [B,3,H,W], got {list(images.shape)}")
    if images.shape[0] == 0:
        raise InvalidTensorError("the image batch is empty")
    if not images.is_floating_point():
        raise InvalidTensorError(f"images must be float in [0,1], got dtype {images.dtype}")
    lo, hi = float(images.detach().min()), float(images.detach().max())
    if lo < -1e-3 or hi > 1 + 1e-3 or lo != lo or hi != hi:
        raise InvalidTensorError(f"images must be in [0,1], got values in [{lo:.3g}, {hi:.3g}] (map [-1,1] images with x/2+0.5)")
    return images


def normalize_prompts(prompts, batch: int, needs_prompt: bool, name: str) -> list[str] | None:
    if prompts is None:
        if needs_prompt:
            raise ConfigError(f"scorer {name!r} compares images with a prompt: give one prompt or one per image")
        return None
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if not prompts:
        if needs_prompt:
            raise ConfigError(f"scorer {name!r} got an empty prompt list")
        return None
    if len(prompts) == 1:
        return prompts * batch
    if len(prompts) != batch:
        raise ConfigError(f"{len(prompts)} prompts for {batch} images: give one prompt or one per image")
    if not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be strings")
    return prompts


def normalize_timesteps(timesteps, batch: int) -> torch.Tensor:
    if timesteps is None:
        return torch.zeros(batch)
    t = torch.as_tensor(timesteps, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ConfigError(f"{t.numel()} timesteps for {batch} images")
    if (t < 0).any() or (t > 1000).any():
        raise ConfigError("timesteps must be DDPM timesteps in [0, 999] (0 for final images)")
    return t.clone()
