"""Noise schedules in sigma space, and the VP (alpha-bar) <-> sigma conversions.

ComfyUI and the WebUI sample in k-diffusion's sigma space, `x = x0 + sigma * eps`; diffusers
works in VP space, `x_vp = sqrt(abar) * x0 + sqrt(1 - abar) * eps`. They are the same point up
to a scale: `x_sigma = x_vp * sqrt(1 + sigma^2)` with `sigma = sqrt((1 - abar) / abar)`.
A `NoiseSchedule` is built from the 1000 training alphas_cumprod of the model and maps
sigma <-> DDPM timestep (fractional timesteps interpolate in log sigma, as k-diffusion does).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def sigma_from_alpha_bar(alpha_bar: torch.Tensor | float) -> torch.Tensor:
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return ((1 - ab) / ab).sqrt()


def alpha_bar_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return 1 / (1 + s * s)


def expand_like(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-row [N] value shaped to broadcast against x [N, ...]."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v


def vp_to_sigma_space(x_vp: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """A diffusers (VP) latent as a sigma-space point: x * sqrt(1 + sigma^2)."""
    s = expand_like(sigma, x_vp)
    return x_vp * (1 + s * s).sqrt()


def sigma_space_to_vp(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    s = expand_like(sigma, x)
    return x / (1 + s * s).sqrt()


class NoiseSchedule:
    """The discrete noise levels a model was trained on, in sigma space."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ab.ndim != 1 or len(ab) < 2 or not ((ab > 0) & (ab <= 1)).all():
            raise ConfigError("alphas_cumprod must be a 1-D tensor of values in (0, 1]")
        self.alphas_cumprod = ab
        self.sigmas = sigma_from_alpha_bar(ab)  # increasing with t
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000) -> "NoiseSchedule":
        """SD1.x/SD2.x/SDXL's schedule."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, 0))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, t: torch.Tensor | float | int) -> torch.Tensor:
        """sigma at (fractional) timestep t, interpolated in log sigma."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """(fractional) DDPM timestep of sigma, inverse of `sigma`; exact integers at the table's sigmas."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        log_s = s.clamp(min=self.sigma_min).log()
        idx = torch.searchsorted(self.log_sigmas, log_s.reshape(-1)).reshape(log_s.shape).clamp(1, self.num_train_timesteps - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = ((log_s - lo) / (hi - lo)).clamp(0, 1)
        t = idx - 1 + w
        near = (t - t.round()).abs() < 1e-3  # float32 sigmas: snap so a table sigma maps back to its integer t
        return torch.where(near, t.round(), t)

    def ddim_timesteps(self, steps: int, steps_offset: int = 1, spacing: str = "leading") -> list[int]:
        """The timesteps diffusers' DDIMScheduler visits (descending)."""
        n = self.num_train_timesteps
        if not 1 <= steps <= n:
            raise ConfigError(f"steps must be in 1..{n}, got {steps}")
        if spacing == "leading":
            ratio = n // steps
            ts = [i * ratio + steps_offset for i in range(steps)]
        elif spacing == "trailing":
            ratio = n / steps
            ts = [round(n - i * ratio) - 1 for i in range(steps)][::-1]
        elif spacing == "linspace":
            ts = [round(x) for x in torch.linspace(0, n - 1, steps).tolist()]
        else:
            raise ConfigError(f"unknown timestep spacing {spacing!r}")
        return sorted(ts, reverse=True)

    def ddim_sigmas(self, steps: int, steps_offset: int = 1, spacing: str = "leading", final: str = "alpha0") -> torch.Tensor:
        """Sigmas of a DDIM schedule: one per visited timestep, then the final level.

        final="alpha0": the level diffusers' DDIM ends at with set_alpha_to_one=False (SD's
        config), sigma(t=0) ~ 0.029, so sampling matches diffusers exactly; final="zero": 0,
        as k-diffusion samplers (ComfyUI, the WebUI) end.
        """
        ts = self.ddim_timesteps(steps, steps_offset, spacing)
        sig = [float(self.sigmas[t]) for t in ts]
        if final == "alpha0":
            sig.append(float(self.sigmas[0]))
        elif final == "zero":
            sig.append(0.0)
        else:
            raise ConfigError(f"final must be 'alpha0' or 'zero', got {final!r}")
        return torch.tensor(sig, dtype=torch.float32)

    def spo_sigmas(self, steps: int = 20) -> torch.Tensor:
        """SPO's sampling schedule: 20 DDIM 'leading' steps t = 951, 901, ..., 1, then sigma(0)."""
        return self.ddim_sigmas(steps, steps_offset=1, spacing="leading", final="alpha0")

    is_flow = False

    def scorer_timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The timestep a step-aware scorer is told for a predicted x0 at sigma: the model's own."""
        return self.timestep(sigma)

    def model_latent(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The model-space (VP) latent of a sigma-space sample: what a VAE or a latent scorer reads."""
        return sigma_space_to_vp(x, sigma) if float(torch.as_tensor(sigma).max()) > 0 else x

    def start_sample(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """The sigma-space sample at `sigma` made of standard-normal noise: noise * sqrt(1 + sigma^2)."""
        return vp_to_sigma_space(noise, sigma)

    def ancestral_step(self, x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, eta: float):
        """(mean, std) of the DDIM(eta) = Euler-ancestral step (step.py)."""
        from .step import ancestral_mean, ancestral_sigmas

        down, up = ancestral_sigmas(sigma, sigma_next, eta)
        return ancestral_mean(x, x0, sigma, down), float(up)

    def karras_sigmas(self, steps: int, rho: float = 7.0) -> torch.Tensor:
        """Karras et al. spacing between this schedule's sigma_min and sigma_max, ending in 0."""
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / rho), self.sigma_max ** (1 / rho)
        sig = (hi + ramp * (lo - hi)) ** rho
        return torch.cat([sig, sig.new_zeros(1)]).float()


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Validate a sampling schedule: 1-D, at least 2 values, non-increasing, non-negative."""
    s = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
    if len(s) < 2:
        raise ConfigError("a sigma schedule needs at least 2 values (one step)")
    if (s < 0).any() or not math.isfinite(float(s.max())):
        raise ConfigError("sigmas must be finite and non-negative")
    if (s[1:] > s[:-1]).any():
        raise ConfigError("sigmas must be non-increasing")
    return s
