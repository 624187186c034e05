"""LPO (arXiv 2502.01051): SPO's step-wise loop with a latent reward model.

What differs from SPO (Kwai-Kolors/LPO): the scorer is the latent reward model, which scores each
noisy candidate x_{t-1} at the timestep t of the step that produced it, with no decoding; pools are
drawn at every step (the window is the whole schedule); and the pair threshold follows the
sampler's noise: th(t) = th_min + (s_t - s_min) / (s_max - s_min) * (th_max - th_min), with s_t the
DDIM(eta) posterior std of the step from t (LPO's "sigma" schedule, whose hard-coded 20-entry table
is exactly this std for SD1.5's schedule). The loss is SPO's (beta 500 in LPO's configs).
"""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ...sampling.resampler import is_latent_scorer
from ...sampling.step import step_std
from .spo import SPOObjective, SPOSource


def noise_std_by_timestep(sigmas: torch.Tensor, schedule, eta: float) -> dict[float, float]:
    """The model-space std of each stochastic step's noise, by the step's parent timestep: for DDIM
    sigma_up / sqrt(1 + sigma_next^2) (= DDIM's sqrt((1-a_prev)/(1-a_t) * (1 - a_t/a_prev)) at eta 1);
    for a flow model its own step's std."""
    out = {}
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        std = step_std(schedule, s, s_next, eta)
        if std > 0:
            out[round(float(schedule.timestep(s)), 2)] = std
    return out


def dynamic_threshold(stds: dict[float, float], th_min: float, th_max: float):
    """LPO's sigma-following threshold as a function of the parent timestep."""
    lo, hi = min(stds.values()), max(stds.values())

    def threshold(t: float) -> float:
        s = stds.get(round(t, 2))
        if s is None:  # not a step of the schedule: the nearest one
            s = stds[min(stds, key=lambda k: abs(k - t))]
        return th_min + (s - lo) / (hi - lo) * (th_max - th_min) if hi > lo else th_min

    return threshold


class LPOSource(SPOSource):
    """SPO's sampling rounds, scored by a latent reward model, with LPO's dynamic threshold."""

    def __init__(self, ctx, prompts: list[str], scorer):
        if scorer is not None and not is_latent_scorer(scorer):
            raise ConfigError(
                f"LPO scores noisy latents with a latent reward model (scorer lrm); the {scorer.name} scorer reads decoded "
                "images: use method spo with it, or give an lrm")
        super().__init__(ctx, prompts, scorer)  # threshold_max gives SPO's source the dynamic threshold too


class LPOObjective(SPOObjective):
    name = "lpo"
