"""The stochastic DDIM(eta) step as an ancestral step in sigma space, and its log-probability.

DDIM with eta draws x_{t-1} ~ N(mu, sigma_t^2) around the mean made of the predicted x0 and
eps. Written in sigma space (divide by sqrt(abar_{t-1})) it is exactly k-diffusion's
Euler-ancestral step: `x_next = x0 + sigma_down * eps_hat + sigma_up * z` with
`sigma_up = eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)` and
`sigma_down = sqrt(sigma_next^2 - sigma_up^2)`. All k candidates of a pool share the mean and
differ only in z. The Gaussian log-density differs from the VP one by a constant per element
(log sqrt(abar_{t-1})), which cancels in any policy/reference ratio: SPO's beta and clamp carry
over unchanged.
"""

from __future__ import annotations

import math

import torch

from .schedule import expand_like

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def ancestral_sigmas(sigma: torch.Tensor | float, sigma_next: torch.Tensor | float, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of a DDIM(eta) / Euler-ancestral step from sigma to sigma_next."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    n = torch.as_tensor(sigma_next, dtype=torch.float64)
    if eta == 0:
        return n.clone(), torch.zeros_like(n)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    up = eta * (n * n * (s * s - n * n) / (safe * safe)).clamp(min=0).sqrt()
    up = torch.minimum(up, n)
    up = torch.where(s > 0, up, torch.zeros_like(up))
    down = (n * n - up * up).clamp(min=0).sqrt()
    return down, up


def ancestral_mean(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float, sigma_down: torch.Tensor | float) -> torch.Tensor:
    """The deterministic part of the step: x0 + sigma_down * eps_hat, eps_hat = (x - x0) / sigma."""
    s = expand_like(sigma, x)
    d = expand_like(sigma_down, x)
    return x0 + d * (x - x0) / s


def ancestral_step(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next, eta: float, noise: torch.Tensor | None) -> torch.Tensor:
    """One DDIM(eta) step in sigma space with the given standard-normal noise."""
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    mean = ancestral_mean(x, x0, sigma, down)
    if noise is None or float(torch.as_tensor(up).max()) == 0.0:
        return mean
    return mean + expand_like(up, x) * noise


def stochastic_step(schedule, x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float,
                    eta: float) -> tuple[torch.Tensor, float]:
    """(mean, std) of the model's own stochastic step: the schedule's (DDIM(eta) for discrete eps/v
    models, ComfyUI's RF ancestral step or an SDE step for flow models), DDIM(eta) without one."""
    if schedule is not None:
        return schedule.ancestral_step(x, x0, sigma, sigma_next, eta)
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    return ancestral_mean(x, x0, sigma, down), float(up)


def transition_log_prob(x_next: torch.Tensor, mean: torch.Tensor, sigma_up: torch.Tensor | float, reduce: str = "mean") -> torch.Tensor:
    """log N(x_next; mean, sigma_up^2) per row: the mean over elements (SPO, DDPO) or the sum.

    Computed in float32 at least; sigma_up must be > 0 (eta > 0 and sigma_next > 0).
    """
    dtype = torch.promote_types(x_next.dtype, torch.float32)
    xn, mu = x_next.to(dtype), mean.to(dtype)
    su = expand_like(torch.as_tensor(sigma_up, dtype=dtype), xn)
    lp = -((xn - mu) ** 2) / (2 * su * su) - torch.log(su) - _LOG_SQRT_2PI
    dims = tuple(range(1, lp.ndim))
    if reduce == "mean":
        return lp.mean(dim=dims)
    if reduce == "sum":
        return lp.sum(dim=dims)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def step_rows(schedule, x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [B,...], std [B]) of the schedule's stochastic step for rows at their own sigmas: what the
    trainers re-evaluate under the policy. Differentiable through x0. DDIM(eta) is vectorised (the
    sigmas in float64, as `ancestral_sigmas`); a flow step runs once per distinct (sigma, sigma') pair."""
    sigma, sigma_next = torch.as_tensor(sigma).reshape(-1), torch.as_tensor(sigma_next).reshape(-1)
    if schedule is None or not getattr(schedule, "is_flow", False):
        down, up = ancestral_sigmas(sigma.double().cpu(), sigma_next.double().cpu(), eta)
        mean = ancestral_mean(x, x0, sigma.float().to(x.device), down.float().to(x.device))
        return mean, up.float().to(x.device)
    pairs = list(zip(sigma.tolist(), sigma_next.tolist()))
    pieces, order, stds = [], [], torch.empty(len(pairs), dtype=torch.float32)
    for s, n in dict.fromkeys(pairs):
        rows = [i for i, p in enumerate(pairs) if p == (s, n)]
        idx = torch.tensor(rows, device=x.device)
        mean, std = schedule.ancestral_step(x[idx], x0[idx], s, n, eta)
        pieces.append(mean)
        order.extend(rows)
        stds[rows] = float(std)
    mean = torch.cat(pieces)[torch.argsort(torch.tensor(order, device=x.device))]
    return mean, stds.to(x.device)


def step_std(schedule, sigma: float, sigma_next: float, eta: float) -> float:
    """The model-space std of one stochastic step (VP scale for DDIM: sigma_up / sqrt(1 + sigma_next^2))."""
    if schedule is not None and getattr(schedule, "is_flow", False):
        z = torch.zeros(1)
        return float(schedule.ancestral_step(z, z, sigma, sigma_next, eta)[1])
    _, up = ancestral_sigmas(sigma, sigma_next, eta)
    return float(up) / (1.0 + sigma_next * sigma_next) ** 0.5
