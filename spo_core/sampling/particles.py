"""Feynman-Kac steering (FK, arXiv 2501.06848): a population of particles per prompt, weighted by
potentials of their rewards along the way and resampled, the best final one kept.

The population is N particles per prompt, one batch of N*B rows (particle j of prompt b at row
j*B + b, k-major like the resampler's pools), every step a plain stochastic DDIM(eta) step for all
of them. At each resampling step (every `score_every`-th step whose parent timestep lies in the
window, and always the last step) each particle's reward r is taken, as zacharyhorvitz/
Fk-Diffusion-Steering takes it: a pixel scorer scores the decoded x0 prediction of the step's input
(at that step's timestep, for step-aware scorers), a latent scorer the step's output latents (at
the step's timestep, LPO's convention). With r_prev the particle's stored reward (0 at the start),
the potential is

    diff: G = exp(lam (r - r_prev))        r_prev <- r
    max:  r_prev <- max(r, r_prev)         G = exp(lam r_prev)
    add:  r_prev <- r + r_prev             G = exp(lam r_prev)
    rt:   G = exp(lam r)                   r_prev <- r

and at the last step max/add/rt use exp(lam r) / (the product of the particle's past potentials),
so that the product along a lineage telescopes to exp(lam r(x_0)). Weights accumulate between
resamplings and are normalised per prompt in log space (exact; the upstream clamps exp() at 1e10);
a NaN reward gives weight 0 and is counted in the trace. Resampling is multinomial with
replacement; each particle's reward state and potential product move with it. `adaptive`
resamples a prompt's population only when its ESS = 1 / sum(w^2) falls below N/2. After the last
step the final images are scored and the best particle of each prompt is returned (as the upstream
keeps its top "best_of_n" sample).

Cost per image: N denoiser rows per step (best-of-N's exactly), plus N decodes and N scorer rows
at each resampling step and at the end (the end only, for best-of-N). Deterministic for a seed:
one CPU generator draws each step's noise [N*B, ...] and each resampling's multinomial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import Cancelled, ConfigError
from ..progress import Reporter

POTENTIALS = ("max", "diff", "add", "rt")


@dataclass
class ParticleEvent:
    """One resampling step of one run (all prompts): what the trace and the grid show."""

    i: int  # step index
    t: float  # the step's parent timestep
    rewards: torch.Tensor  # [N, B] (NaN where the scorer gave NaN)
    weights: torch.Tensor  # [N, B] normalised
    ess: torch.Tensor  # [B]
    resampled: torch.Tensor  # [B] bool
    ancestors: torch.Tensor  # [N, B] the particle each new particle copies
    nan_rewards: int = 0


def log_potential(kind: str, lam: float, reward: torch.Tensor, stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log G, the new stored reward) of a resampling step."""
    if kind == "diff":
        return lam * (reward - stored), reward
    if kind == "max":
        new = torch.maximum(reward, stored)
        return lam * new, new
    if kind == "add":
        new = reward + stored
        return lam * new, new
    if kind == "rt":
        return lam * reward, reward
    raise ConfigError(f"unknown FK potential {kind!r}; choose one of {', '.join(POTENTIALS)}")


def final_log_potential(kind: str, lam: float, reward: torch.Tensor, stored: torch.Tensor,
                        log_product: torch.Tensor) -> torch.Tensor:
    """The last step's log weight: max/add/rt divide exp(lam r) by the lineage's past potentials."""
    if kind == "diff":
        return lam * (reward - stored)
    return lam * reward - log_product


def normalized(log_w: torch.Tensor) -> torch.Tensor:
    """Per-prompt normalised weights [N, B] from log weights; -inf (NaN rewards) weigh 0; a prompt whose
    every weight is -inf keeps uniform weights (nothing to prefer)."""
    finite = torch.isfinite(log_w)
    safe = torch.where(finite, log_w, torch.full_like(log_w, -math.inf))
    top = safe.max(0, keepdim=True).values
    dead = ~torch.isfinite(top)
    w = torch.exp(safe - torch.where(dead, torch.zeros_like(top), top))
    w = torch.where(finite, w, torch.zeros_like(w))
    w = torch.where(dead.expand_as(w), torch.ones_like(w), w)
    return w / w.sum(0, keepdim=True)


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    return 1.0 / (weights * weights).sum(0)


def check_particle_config(cfg, n_steps: int) -> None:
    if cfg.k < 2:
        raise ConfigError("FK steering with 1 particle is plain sampling: use k (particles) >= 2, or the plain sampler")
    if cfg.potential not in POTENTIALS:
        raise ConfigError(f"unknown FK potential {cfg.potential!r}; choose one of {', '.join(POTENTIALS)}")
    if not (isinstance(cfg.lam, (int, float)) and math.isfinite(cfg.lam) and cfg.lam > 0):
        raise ConfigError(f"FK lambda must be a finite number > 0, got {cfg.lam}")
    if cfg.eta <= 0:
        raise ConfigError("FK steering needs stochastic steps (eta > 0): with eta = 0 resampled copies stay identical")


def resampling_steps(sigmas: torch.Tensor, schedule, window: tuple[float, float], every: int) -> list[int]:
    """Steps where the population is weighted and resampled: every `every`-th step whose parent timestep
    is in the window, and always the last step."""
    n = len(sigmas) - 1
    lo, hi = window
    inside = [i for i in range(n) if lo <= float(schedule.timestep(float(sigmas[i]))) <= hi]
    chosen = set(inside[::max(1, every)])
    chosen.add(n - 1)
    return sorted(chosen)


def multinomial_ancestors(weights: torch.Tensor, resample_mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[N, B] indices: a multinomial draw with replacement per prompt whose mask is set, the identity otherwise."""
    n, b = weights.shape
    keep = torch.arange(n).unsqueeze(1).expand(n, b).clone()
    for col in torch.nonzero(resample_mask).flatten().tolist():
        keep[:, col] = torch.multinomial(weights[:, col].double(), n, replacement=True, generator=generator)
    return keep


def gather_particles(x: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """Rows of x ([N*B, ...], k-major) reordered so particle j of prompt b copies particle ancestors[j, b]."""
    n, b = ancestors.shape
    rows = (ancestors * b + torch.arange(b).unsqueeze(0)).flatten().to(x.device)
    return x.index_select(0, rows)


@dataclass
class ParticleRunStats:
    events: list[ParticleEvent]
    overhead_s: float  # weights, multinomial, reindexing (not scoring)
    nan_rewards: int


class ParticleState:
    """Per-particle reward state, lineage potential product and accumulated log weight, all [N, B]."""

    def __init__(self, n: int, b: int, kind: str, lam: float):
        self.kind, self.lam = kind, lam
        self.stored = torch.zeros(n, b, dtype=torch.float64)
        self.log_product = torch.zeros(n, b, dtype=torch.float64)
        self.log_w = torch.zeros(n, b, dtype=torch.float64)

    def weigh(self, rewards: torch.Tensor, last: bool) -> torch.Tensor:
        r = rewards.double()
        nan = torch.isnan(r)
        r_safe = torch.where(nan, torch.zeros_like(r), r)
        if last:
            log_g = final_log_potential(self.kind, self.lam, r_safe, self.stored, self.log_product)
            new_stored = r_safe
        else:
            log_g, new_stored = log_potential(self.kind, self.lam, r_safe, self.stored)
        log_g = torch.where(nan, torch.full_like(log_g, -math.inf), log_g)
        self.stored = torch.where(nan, self.stored, new_stored)
        self.log_product = self.log_product + torch.where(nan, torch.zeros_like(log_g), log_g)
        self.log_w = self.log_w + log_g
        return normalized(self.log_w)

    def reindex(self, ancestors: torch.Tensor, resampled: torch.Tensor) -> None:
        for name in ("stored", "log_product", "log_w"):
            setattr(self, name, torch.gather(getattr(self, name), 0, ancestors))
        self.log_w[:, resampled] = 0.0  # a resampled population starts with equal weights


def run_particles(step_fn, reward_fn, x: torch.Tensor, n: int, b: int, steps: list[int], n_steps: int, cfg, generator,
                  timestep_of, cancel=None, progress=None, on_event=None) -> tuple[torch.Tensor, ParticleRunStats]:
    """The FK loop over a population x [N*B, ...]. `step_fn(i, x) -> (x_next, x0)` makes one step for all
    particles; `reward_fn(i, x0, x_next) -> [N*B] rewards` is called at resampling steps only."""
    import time

    state = ParticleState(n, b, cfg.potential, float(cfg.lam))
    events: list[ParticleEvent] = []
    overhead, nans = 0.0, 0
    reporter = Reporter("sampling", n_steps, progress, cancel) if progress is not None else None
    scheduled = set(steps)
    for i in range(n_steps):
        if cancel is not None and cancel():
            raise Cancelled("sampling was cancelled")
        x_next, x0 = step_fn(i, x)
        if i in scheduled:
            rewards = reward_fn(i, x0, x_next).reshape(n, b).double()
            t0 = time.perf_counter()
            count = int(torch.isnan(rewards).sum())
            nans += count
            weights = state.weigh(rewards, last=i == n_steps - 1)
            ess = effective_sample_size(weights)
            mask = ess < n / 2 if cfg.adaptive else torch.ones(b, dtype=torch.bool)
            ancestors = multinomial_ancestors(weights, mask, generator)
            x_next = gather_particles(x_next, ancestors)
            state.reindex(ancestors, mask)
            overhead += time.perf_counter() - t0
            event = ParticleEvent(i, float(timestep_of(i)), rewards.float(), weights.float(), ess.float(), mask, ancestors,
                                  count)
            events.append(event)
            if on_event is not None:
                on_event(event, x0, x_next)
        x = x_next
        if reporter is not None:
            reporter.update(i + 1, f"step {i + 1}/{n_steps}")
    return x, ParticleRunStats(events, overhead, nans)


def fk_sample(denoiser, cond, x: torch.Tensor, sigmas: torch.Tensor, schedule, scorer, decode, prompts, cfg,
              generator: torch.Generator, callback=None, cancel=None, progress=None):
    """FK steering with N = cfg.k particles per prompt (see the module docstring): x [B, ...] at sigmas[0]
    is particle 0's start, the others start from their own noise; returns a ResampleResult whose x is
    the best final particle per prompt and whose trace holds one record per resampling (with its
    `particles` event) and the final choice."""
    from .denoiser import CountingDenoiser, call_denoiser, repeat_cond
    from .resampler import ResampleResult, StepRecord, _check_scorer, _scores, _thumbs, is_latent_scorer
    from .samplers import StepInfo, randn_like
    from .step import stochastic_step

    n_steps = len(sigmas) - 1
    check_particle_config(cfg, n_steps)
    n, b = cfg.k, x.shape[0]
    prompt_list = _check_scorer(scorer, prompts, b)
    latent = is_latent_scorer(scorer)
    if decode is None and not latent:
        raise ConfigError("FK steering with a pixel scorer needs a decoder (latents -> images)")
    counter = denoiser if isinstance(denoiser, CountingDenoiser) else CountingDenoiser(denoiser)
    start_rows, start_calls = counter.rows, counter.calls
    cond_n = repeat_cond(cond, n)
    prompts_n = [prompt_list[r % b] for r in range(n * b)] if prompt_list is not None else None
    # every particle starts from its own noise: particle 0 from the given x (so N = 1 would be plain sampling)
    s0 = float(sigmas[0])
    extra = randn_like((n - 1, *x.shape), generator, x) * s0 if n > 1 else x[:0]
    pop = torch.cat([x.unsqueeze(0), extra.reshape(n - 1, *x.shape)]).reshape(n * b, *x.shape[1:])
    trace: list = []
    counts = {"decodes": 0, "scored": 0}

    def step_fn(i: int, xs: torch.Tensor):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = call_denoiser(counter, xs, s, cond_n)
        mean, up = stochastic_step(schedule, xs, x0, s, s_next, cfg.eta)
        nxt = mean + float(up) * randn_like(xs.shape, generator, xs) if float(up) > 0 else mean
        if callback is not None:
            callback(StepInfo(i, n_steps, nxt[:b], x0[:b], s, s_next))
        return nxt, x0

    def reward_fn(i: int, x0: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        t = round(float(schedule.scorer_timestep(float(sigmas[i]))), 4)
        if latent:
            s_next = float(sigmas[i + 1])
            images = schedule.model_latent(x_next, s_next)
        else:
            images = decode(x0)
            counts["decodes"] += n * b
        counts["scored"] += n * b
        return _rewards(scorer, images, prompts_n, torch.full((n * b,), t))

    def on_event(event, x0, x_next):
        images = None
        if cfg.keep_images and decode is not None:
            images = _thumbs(decode(x0), cfg.image_size)
            images = images.reshape(n, b, *images.shape[1:])
        trace.append(StepRecord(event.i, float(sigmas[event.i]), float(sigmas[event.i + 1]), event.t, pooled=True,
                                t_scored=event.t, scores=event.rewards, chosen=event.ancestors[0], images=images,
                                decodes=0 if latent else n * b, scorer_rows=n * b, particles=event))

    final_pop, stats = run_particles(step_fn, reward_fn, pop, n, b, resampling_steps(sigmas, schedule, cfg.window,
                                     cfg.score_every), n_steps, cfg, generator,
                                     lambda i: schedule.timestep(float(sigmas[i])), cancel, progress, on_event)
    # the best final particle per prompt, by the final images' reward
    s_end = float(sigmas[-1])
    final = schedule.model_latent(final_pop, s_end)
    images = final if latent else decode(final)
    t_end = round(float(schedule.timestep(float(sigmas[-2]))), 4) if latent else 0.0
    scores = _rewards(scorer, images, prompts_n, torch.full((n * b,), t_end)).reshape(n, b).float()
    chosen = torch.nan_to_num(scores, nan=-math.inf).argmax(0)
    best = final_pop.reshape(n, b, *final_pop.shape[1:])[chosen, torch.arange(b)]
    thumbs = None
    if cfg.keep_images:
        shown = images if not latent else (decode(final) if decode is not None else None)
        if shown is not None:
            thumbs = _thumbs(shown, cfg.image_size)
            thumbs = thumbs.reshape(n, b, *thumbs.shape[1:])
    trace.append(StepRecord(n_steps - 1, float(sigmas[-2]), s_end, t_end, pooled=True, t_scored=t_end, scores=scores,
                            chosen=chosen, images=thumbs, decodes=0 if latent else n * b, scorer_rows=n * b))
    return ResampleResult(best, counter.rows - start_rows, counter.calls - start_calls, n_steps, trace, particle_stats=stats)


def _rewards(scorer, images: torch.Tensor, prompts, timesteps: torch.Tensor) -> torch.Tensor:
    """The scorer's rewards as float64 [N*B]; NaN allowed (weighted 0), other failures raise."""
    out = scorer.score(images, prompts, timesteps)
    return torch.as_tensor(out).detach().double().cpu().flatten()
