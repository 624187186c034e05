"""Rectified-flow models (SD3/SD3.5, Flux class) in sigma space: schedules, steps and log-probabilities.

A flow model interpolates `x_sigma = (1 - sigma) * x0 + sigma * noise` (sigma = 1 is pure noise) and
predicts the velocity `v = noise - x0`, so the host's denoiser returns `x0 = x - sigma * v`, exactly
the contract of `denoiser.py` (ComfyUI's CONST model sampling does this inside its model wrapper).
Every step below is a Gaussian `N(mean, std^2)` around a mean built from x and x0, so the
resampler, the particle policy and the transition log-probabilities work unchanged:

- `euler`: the deterministic ODE step `x + (sigma' - sigma) * v` (diffusers' FlowMatchEulerDiscreteScheduler).
- `rf_ancestral`: ComfyUI's `sample_euler_ancestral_RF` (what "euler_ancestral" runs on CONST models):
  down-step to sigma_down = sigma' * (1 + (sigma'/sigma - 1) * eta), rescale by alpha'/alpha_down,
  renoise with sqrt(sigma'^2 - sigma_down^2 * alpha'^2 / alpha_down^2). It is not the VP ancestral step.
- `sde`: Flow-GRPO's SDE step (noise level a): sigma_t = a * sqrt(sigma / (1 - sigma)), mean
  `x + [v + sigma_t^2 / (2 sigma) * (x + (1 - sigma) v)] * dt`, std `sigma_t * sqrt(-dt)`.
- `cps`: coefficients-preserving sampling: std `sigma' * sin(a * pi / 2)`, mean
  `(1 - sigma') * x0 + sqrt(sigma'^2 - std^2) * x1_hat` with `x1_hat = x + (1 - sigma) v`.

`FlowSchedule` is the flow counterpart of `NoiseSchedule`: the model timestep is 1000 * sigma, the
training table is ComfyUI's `ModelSamplingDiscreteFlow` (shift), and `diffusers_sigmas` reproduces
diffusers' `set_timesteps` with a fixed shift (SD3) or the resolution-dependent shift mu (Flux).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

FLOW_STEPS = ("euler", "rf_ancestral", "sde", "cps")


def time_snr_shift(shift: float, t: torch.Tensor | float) -> torch.Tensor:
    """SD3's shift: sigma = shift * t / (1 + (shift - 1) * t) (ComfyUI time_snr_shift, diffusers `shift`)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def exponential_time_shift(mu: float, t: torch.Tensor | float, power: float = 1.0) -> torch.Tensor:
    """Flux's resolution-dependent shift: e^mu / (e^mu + (1/t - 1)^power) (t = 0 maps to 0)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    safe = torch.where(t > 0, t, torch.ones_like(t))
    out = math.exp(mu) / (math.exp(mu) + (1 / safe - 1) ** power)
    return torch.where(t > 0, out, torch.zeros_like(out))


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """diffusers' `calculate_shift`: mu grows linearly with the number of image tokens (Flux pipelines)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


class FlowSchedule:
    """The noise levels of a rectified-flow model; the same interface as `NoiseSchedule`.

    `timestep(sigma)` is 1000 * sigma (the windows and scorer timesteps of the pack, and the SD3
    transformer's input; ComfyUI's Flux model takes sigma itself, which its own wrapper handles).
    `step` picks the transition: `rf_ancestral` by default, which is what ComfyUI's euler_ancestral
    runs on these models, so k = 1 of the resampler is the host's own sampler. `mu` makes the
    training table Flux's (exponential shift) instead of SD3's (shift).
    """

    is_flow = True

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000, step: str = "rf_ancestral",
                 noise_level: float | None = None, mu: float | None = None):
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ConfigError(f"flow shift must be a finite number > 0, got {shift}")
        if step not in FLOW_STEPS:
            raise ConfigError(f"unknown flow step {step!r}; choose one of {', '.join(FLOW_STEPS)}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.step = step
        self.noise_level = noise_level
        t = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float64) / self.num_train_timesteps
        self.mu = mu
        # ComfyUI's ModelSamplingDiscreteFlow table (or ModelSamplingFlux's, with mu), increasing
        self.sigmas = time_snr_shift(self.shift, t) if mu is None else exponential_time_shift(mu, t)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float64) * self.num_train_timesteps

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """The inverse of `timestep` (t / 1000): windows given in timesteps select these sigmas."""
        return torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps

    def scorer_timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The DDPM timestep of SD's schedule with the same signal-to-noise ratio as flow sigma, which is
        what step-aware scorers (SPM, trained on DDPM timesteps) are told: a flow sample at sigma is a
        VE sample at sigma / (1 - sigma), so flow sigma 0.5 reads as t ~ 354 rather than 500."""
        from .schedule import NoiseSchedule

        s = torch.as_tensor(sigma, dtype=torch.float64)
        ve = s / (1 - s).clamp(min=1e-6)
        return NoiseSchedule.scaled_linear().timestep(ve)

    def model_latent(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The model-space latent of a sample: a flow sample already is one (no VP rescaling)."""
        return x

    def start_sample(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """The sample at `sigma` made of standard-normal noise alone: sigma * noise (sigma = 1: the noise)."""
        return noise * float(sigma)

    def spo_sigmas(self, steps: int = 20) -> torch.Tensor:
        """The sampling schedule of training rollouts and validation: diffusers' shifted grid (SD3), or
        Flux's linspace(1, 1/steps) grid with this schedule's mu."""
        return self.diffusers_sigmas(steps) if self.mu is None else self.flux_sigmas(steps, self.mu)

    def with_step(self, step: str, noise_level: float | None = None) -> "FlowSchedule":
        """The same noise levels with another stochastic step (training rollouts: sde or cps)."""
        return FlowSchedule(self.shift, self.num_train_timesteps, step, noise_level, self.mu)

    def diffusers_sigmas(self, steps: int, mu: float | None = None) -> torch.Tensor:
        """FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps[, mu]).sigmas, ending in 0.

        Like diffusers, the grid runs from the shifted table's ends (1 and shift(1/1000)) and is shifted
        again (fixed shift), or unshifted ends and the exponential shift with mu (dynamic, Flux).
        """
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        n = self.num_train_timesteps
        if mu is None:
            hi, lo = float(time_snr_shift(self.shift, 1.0)), float(time_snr_shift(self.shift, 1.0 / n))
            grid = torch.linspace(hi * n, lo * n, steps, dtype=torch.float64) / n
            sig = time_snr_shift(self.shift, grid)
        else:
            grid = torch.linspace(n, 1.0, steps, dtype=torch.float64) / n
            sig = exponential_time_shift(mu, grid)
        return torch.cat([sig, sig.new_zeros(1)]).float()

    def flux_sigmas(self, steps: int, mu: float) -> torch.Tensor:
        """Flux pipelines' schedule: sigmas linspace(1, 1/steps, steps), shifted by mu, ending in 0."""
        grid = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        return torch.cat([exponential_time_shift(mu, grid), torch.zeros(1, dtype=torch.float64)]).float()

    def ancestral_step(self, x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, eta: float):
        """(mean, std) of this schedule's stochastic step; eta is ComfyUI's eta or Flow-GRPO's noise level."""
        level = eta if self.noise_level is None else self.noise_level
        return flow_step(self.step, x, x0, sigma, sigma_next, level)


def _check_sigmas(sigma: float, sigma_next: float) -> None:
    if not (0 <= sigma_next <= sigma <= 1) or sigma <= 0:
        raise ConfigError(f"a flow step needs 1 >= sigma > 0 and 0 <= sigma_next <= sigma, got {sigma} -> {sigma_next}")


def velocity(x: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
    """v = (x - x0) / sigma: the model output that gave x0 = x - sigma * v."""
    return (x - x0) / sigma


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> tuple[torch.Tensor, float]:
    _check_sigmas(sigma, sigma_next)
    if sigma_next == 0:
        return x0, 0.0
    return x + (sigma_next - sigma) * velocity(x, x0, sigma), 0.0


def rf_ancestral_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, eta: float = 1.0,
                      s_noise: float = 1.0) -> tuple[torch.Tensor, float]:
    """ComfyUI's sample_euler_ancestral_RF step as (mean, std); x0 itself at sigma_next = 0."""
    _check_sigmas(sigma, sigma_next)
    if sigma_next == 0:
        return x0, 0.0
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    ratio = sigma_down / sigma
    mean = ratio * x + (1 - ratio) * x0
    if eta <= 0:
        return mean, 0.0
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = max(sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2, 0.0) ** 0.5
    return (alpha_next / alpha_down) * mean, s_noise * renoise


def sde_sigma_t(sigma: float, noise_level: float, sigma_max: float) -> float:
    """Flow-GRPO's sigma_t = a * sqrt(sigma / (1 - sigma)); at sigma = 1 the denominator uses sigma_max,
    the schedule's second sigma (Flow-GRPO's `scheduler.sigmas[1]`), to avoid dividing by 0."""
    denom_sigma = sigma if sigma < 1 else sigma_max
    return noise_level * math.sqrt(sigma / (1 - denom_sigma))


def sde_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, noise_level: float = 0.7,
             sigma_max: float | None = None) -> tuple[torch.Tensor, float]:
    """Flow-GRPO's SDE step as (mean, std), computed in float32 at least as Flow-GRPO does.

    `sigma_max` defaults to sigma_next, which is the schedule's second sigma at the one step where it
    matters (sigma = 1 is the first). Like Flow-GRPO it stays stochastic on a last step to sigma = 0."""
    _check_sigmas(sigma, sigma_next)
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, x0 = x.to(dtype), x0.to(dtype)
    v = velocity(x, x0, sigma)
    dt = sigma_next - sigma
    st = sde_sigma_t(sigma, noise_level, sigma_next if sigma_max is None else sigma_max)
    mean = x * (1 + st ** 2 / (2 * sigma) * dt) + v * (1 + st ** 2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, st * math.sqrt(-dt)


def cps_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float,
             noise_level: float = 0.7) -> tuple[torch.Tensor, float]:
    """Coefficients-preserving step as (mean, std): x0 weight 1 - sigma', noise weight sigma' in distribution."""
    _check_sigmas(sigma, sigma_next)
    v = velocity(x, x0, sigma)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x1_hat = x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0 + math.sqrt(max(sigma_next ** 2 - std ** 2, 0.0)) * x1_hat
    return mean, std


def flow_step(kind: str, x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float,
              eta: float = 1.0) -> tuple[torch.Tensor, float]:
    """(mean, std) of one flow transition of the given kind (eta: RF ancestral eta, or SDE/CPS noise level)."""
    if kind == "euler":
        return euler_step(x, x0, sigma, sigma_next)
    if kind == "rf_ancestral":
        return rf_ancestral_step(x, x0, sigma, sigma_next, eta)
    if kind == "sde":
        return sde_step(x, x0, sigma, sigma_next, eta)
    if kind == "cps":
        return cps_step(x, x0, sigma, sigma_next, eta)
    raise ConfigError(f"unknown flow step {kind!r}; choose one of {', '.join(FLOW_STEPS)}")


def cps_log_prob_upstream(x_next: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Flow-CPS's own training log-prob: -||x' - mean||^2 averaged over elements, no constants and no
    variance normalisation (so it is not a density; kept for parity with the published code)."""
    d = (x_next.float() - mean.float()) ** 2
    return -d.mean(dim=tuple(range(1, d.ndim)))

