"""Plain stochastic sampling (DDIM(eta) = Euler-ancestral in sigma space), the baseline of the resampler.

Noise comes from a torch.Generator the caller owns or that is seeded here (drawn on the CPU
and moved, so a seed gives the same image on any device): one standard-normal draw of x's
shape per step, in step order, and none for a step whose sigma_up is 0 (eta = 0, or a last
step to sigma 0). This is exactly how diffusers' DDIM pipeline draws after its initial latents,
so with the same generator the result equals `StableDiffusionPipeline(..., eta=1)`.
With `record=True` every transition is kept with its log-probability under the sampling
policy (DDPO needs them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import Cancelled, ConfigError
from ..progress import CancelFn, ProgressFn, Reporter
from .denoiser import Conditioning, CountingDenoiser, Denoiser, call_denoiser
from .schedule import NoiseSchedule, check_sigmas
from .step import stochastic_step, transition_log_prob


@dataclass
class StepInfo:
    """What a per-step callback gets (hosts turn it into previews and progress)."""

    i: int
    total: int
    x: torch.Tensor  # the new sample, at sigma_next
    x0: torch.Tensor  # the parent's x0 prediction (ComfyUI's 'denoised')
    sigma: float
    sigma_next: float
    scores: torch.Tensor | None = None  # [k, B] when a pool was scored at this step
    chosen: torch.Tensor | None = None  # [B]


StepCallback = Callable[[StepInfo], None]


@dataclass
class Transition:
    """One sampled transition x -> x_next (batched rows), for policy-gradient training."""

    x: torch.Tensor
    x_next: torch.Tensor
    sigma: float
    sigma_next: float
    t: float
    log_prob: torch.Tensor  # [B] mean over elements, under the policy that sampled


@dataclass
class SampleResult:
    x: torch.Tensor  # final sample in sigma space, at sigmas[-1]
    evaluations: int  # denoiser rows
    calls: int
    steps: int
    transitions: list[Transition] = field(default_factory=list)

    @property
    def evaluations_per_step(self) -> float:
        return self.evaluations / max(self.steps, 1)


def make_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def randn_like(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard-normal noise drawn on the CPU from `generator`, then moved to like's device/dtype."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def sample_ancestral(
    denoiser: Denoiser,
    cond: Conditioning,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    schedule: NoiseSchedule | None = None,
    record: bool = False,
    callback: StepCallback | None = None,
    cancel: CancelFn | None = None,
    progress: ProgressFn | None = None,
) -> SampleResult:
    """Sample from x (sigma space, at sigmas[0]) down to sigmas[-1] with DDIM(eta) steps.

    `callback(StepInfo)` runs after every step (hosts show previews from it); `progress` gets a
    ProgressEvent("sampling", i + 1, steps) per step; `cancel()` is checked before every step.
    """
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}")
    sig = check_sigmas(sigmas)
    counter = denoiser if isinstance(denoiser, CountingDenoiser) else CountingDenoiser(denoiser)
    start_rows, start_calls = counter.rows, counter.calls
    g = make_generator(generator, seed)
    transitions: list[Transition] = []
    n = len(sig) - 1
    reporter = Reporter("sampling", n, progress, cancel) if progress is not None else None
    for i in range(n):
        if cancel is not None and cancel():
            raise Cancelled("sampling was cancelled")
        s, s_next = float(sig[i]), float(sig[i + 1])
        x0 = call_denoiser(counter, x, s, cond)
        mean, up = stochastic_step(schedule, x, x0, s, s_next, eta)
        if float(up) > 0:
            x_next = mean + float(up) * randn_like(x.shape, g, x)
        else:
            x_next = mean
        if record and float(up) > 0:
            t = float(schedule.timestep(s)) if schedule is not None else float("nan")
            transitions.append(Transition(x, x_next, s, s_next, t, transition_log_prob(x_next, mean, float(up))))
        x = x_next
        if callback is not None:
            callback(StepInfo(i, n, x, x0, s, s_next))
        if reporter is not None:
            reporter.update(i + 1, f"step {i + 1}/{n}")
    return SampleResult(x, counter.rows - start_rows, counter.calls - start_calls, n, transitions)
