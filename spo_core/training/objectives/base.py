"""What objectives share: the context the trainer gives them, batches, and small helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch

from ...sampling.denoiser import Conditioning, Denoiser


@dataclass
class Batch:
    items: list[Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)


class TrainContext(Protocol):
    """The trainer as objectives and data sources see it."""

    cfg: Any  # TrainConfig (resolved)
    host: Any  # TrainingHost
    network: Any  # LoRANetwork
    device: torch.device
    rank: int
    world: int
    sigmas: torch.Tensor  # the sampling schedule (sigma space)
    schedule: Any  # the host's NoiseSchedule, or its FlowSchedule with the training step (sde/cps)
    eta: float  # DDIM's eta, or the flow step's noise level
    denoiser_cfg: Denoiser  # CFG at cfg.guidance_scale
    denoiser_plain: Denoiser  # no CFG (guidance 1): DPO / NCP
    train_gen: torch.Generator  # noise and timesteps of the DPO family, DDPO's timestep order
    max_empty_rounds: int
    cancel: Callable[[], bool] | None

    def autocast(self) -> ContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def share_items(self, items: list, shuffle_gen: torch.Generator) -> list: ...
    def gather_objects(self, obj) -> list: ...
    def log_event(self, event: str, **values) -> None: ...
    def warn(self, message: str) -> None: ...
    def sampling_progress(self, step: int, total: int, message: str) -> None: ...


def encode_rows(ctx: TrainContext, prompts: Sequence[str]) -> Conditioning:
    """Conditioning with one row per prompt (each distinct prompt encoded once)."""
    unique = list(dict.fromkeys(prompts))
    cond = ctx.host.encode_prompts(unique, ctx.cfg.negative_prompt or None, ctx.cfg.height, ctx.cfg.width)
    if len(unique) == len(prompts):
        return cond
    where = {p: i for i, p in enumerate(unique)}
    return cond.take(torch.tensor([where[p] for p in prompts]))


def initial_noise(ctx: TrainContext, batch: int, sigma0: float, generator: torch.Generator) -> torch.Tensor:
    """The first sample: standard normal (drawn on the CPU) times sqrt(1 + sigma0^2) in DDIM's sigma
    space, times sigma0 (= 1) for a flow model."""
    shape = ctx.host.latent_shape(batch, ctx.cfg.height, ctx.cfg.width)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return ctx.schedule.start_sample(noise, sigma0).to(ctx.device)


def stack_or_none(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(tensors) if tensors else None


def mse_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error over (C, H, W) per row, in float32."""
    return ((a.float() - b.float()) ** 2).mean(dim=tuple(range(1, a.ndim)))
