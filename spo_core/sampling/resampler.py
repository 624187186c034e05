"""The per-step resampler: k candidates from the same x_t at each step, scored, one kept.

At a pool step the parent's x0 prediction gives one shared mean; k candidates draw their own
noise (k-major rows), one batched denoiser call at the next sigma gives every candidate's x0,
those are decoded and scored (step-aware scorers get the candidates' timestep), and a policy
keeps one candidate per prompt. The kept candidate's x0 is the next step's evaluation, so a
pool step costs k denoiser evaluations, not k+1.

Policies: `greedy` (argmax: an SVDD-PM-style search), `softmax` (multinomial over
softmax(scores / temperature): Feynman-Kac-style steering), `random` (SPO's continuation) and
`pairs` (random continuation, and the best/worst candidates recorded as a training pair when
their 2-way softmax gap exceeds the threshold, as SPO's compare function does).
`inner_steps` = j gives SDXL's multi-step SPO: each candidate is denoised j more steps before
it is scored, and every transition of the winning and losing chains becomes a pair.

Cost, in denoiser rows per prompt: a plain step 1 (its parent), a pooled step k (the
candidates at the next sigma, one batched call of k*B rows), plus 1 for the parent when the
step before was not pooled; a pool at the last step, which ends at a small sigma > 0, costs
0 more (its candidates are final: decoded directly and scored at t = 0, as SPO does). Each
`StepRecord.evaluations` holds what its step spent.

Randomness, all from one CPU torch.Generator (seeded from `seed`, or the caller's), in this
order: per plain step one normal draw of x's shape [B,...] (none when sigma_up is 0); per pool
one draw of [k,B,...], then one draw of [k*B,...] per inner step, then the policy's draw
(random/pairs: randint over k for each prompt; softmax: a multinomial per prompt; greedy: none).
With k = 1 the draws and the result are exactly `sample_ancestral`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import Cancelled, ConfigError, InvalidTensorError
from ..progress import CancelFn, ProgressFn, Reporter
from .denoiser import Conditioning, CountingDenoiser, Decoder, Denoiser, call_denoiser, repeat_cond
from .samplers import StepCallback, StepInfo, make_generator, randn_like
from .schedule import NoiseSchedule, check_sigmas
from .step import stochastic_step

POLICIES = ("greedy", "random", "softmax", "pairs", "fk")

# SPO's first trained transition starts at t = 751 (divert_start_step = 4 of 20 leading DDIM steps);
# the paper calls the range "t <= 750".
SPO_WINDOW = (0.0, 751.0)
# FK steering weighs particles over the whole trajectory (its paper resamples from the first steps on)
FK_WINDOW = (0.0, 999.0)


def default_window(policy: str) -> tuple[float, float]:
    """The window a policy pools in when none is given: FK's whole trajectory, SPO's t <= 751 otherwise."""
    return FK_WINDOW if policy == "fk" else SPO_WINDOW


def window_hi_after_policy_change(policy: str, current: float, chain_default: float = SPO_WINDOW[1]) -> float:
    """What a UI's "highest timestep" field should show once the policy is `policy`: the new policy's default
    when the field holds the other policy's default (`chain_default` for greedy/softmax/random, FK's 999),
    the user's own value otherwise."""
    if policy == "fk" and current == chain_default:
        return FK_WINDOW[1]
    if policy != "fk" and current == FK_WINDOW[1]:
        return chain_default
    return current

# SPO's pair validity threshold on p_win - p_lose of the 2-way softmax of the raw scores
SPO_THRESHOLDS = {"sd15": 0.3, "sd2": 0.3, "custom-sd1": 0.3, "sdxl": 0.4, "custom-sdxl": 0.4}


@dataclass
class ResamplerConfig:
    k: int = 4
    policy: str = "greedy"
    eta: float = 1.0
    temperature: float = 1.0  # softmax policy
    window: tuple[float, float] = SPO_WINDOW  # parent DDPM timesteps (inclusive) where pools are drawn
    score_every: int = 1  # draw a pool at every n-th step inside the window
    inner_steps: int = 0  # SDXL multi-step SPO: j steps per candidate before scoring
    threshold: float = 0.3  # pairs: keep a pair when p_win - p_lose > threshold (0.3 SD1.5, 0.4 SDXL)
    score_scale: float = 1.0  # pairs: scores are multiplied by this before the 2-way softmax (the scorer's pair_scale)
    threshold_fn: Callable[[float], float] | None = None  # pairs: the threshold by parent timestep (LPO's dynamic one)
    # fk (Feynman-Kac particles, spo_core.sampling.particles): k is the number of particles per prompt,
    # score_every the resampling interval inside the window
    potential: str = "max"
    lam: float = 10.0
    adaptive: bool = False
    final_decode: bool = True  # last step ending at sigma > 0: score the candidates themselves at t=0 (SPO)
    keep_images: bool = False  # keep the candidates' decoded x0 in the trace (for the grid)
    image_size: int = 96  # thumbnail size kept per candidate

    @classmethod
    def for_spo(cls, arch: str = "sd15", **overrides) -> "ResamplerConfig":
        """SPO's released training settings: SD1.5 k = 4, one-step pairs, threshold 0.3; SDXL k = 2,
        3 inner steps (segments of 4 transitions), threshold 0.4; eta 1, window t <= 751, pairs."""
        sdxl = "sdxl" in arch
        base = dict(k=2 if sdxl else 4, policy="pairs", eta=1.0, window=SPO_WINDOW, inner_steps=3 if sdxl else 0,
                    threshold=SPO_THRESHOLDS.get(arch, 0.4 if sdxl else 0.3))
        base.update(overrides)
        return cls(**base)

    def validate(self, sigmas: torch.Tensor | None = None, schedule: NoiseSchedule | None = None) -> None:
        """Raise ConfigError on settings that cannot work; the window is checked when sigmas are given."""
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.policy == "fk":
            from .particles import check_particle_config

            check_particle_config(self, 0)
        if self.eta < 0:
            raise ConfigError(f"eta must be >= 0, got {self.eta}")
        if self.eta == 0 and self.k > 1:
            raise ConfigError(
                "eta = 0 makes every step deterministic, so the k candidates of a pool would be identical; "
                "use eta > 0 (SPO uses 1.0) or k = 1"
            )
        if self.score_every < 1 or self.inner_steps < 0:
            raise ConfigError("score_every must be >= 1 and inner_steps >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.threshold < 1:
            raise ConfigError(f"threshold must be in [0, 1), got {self.threshold}")
        lo, hi = self.window
        if lo > hi:
            raise ConfigError(f"step window {self.window}: the lower bound is above the upper bound")
        if schedule is not None and getattr(schedule, "is_flow", False):
            check_flow_schedule(schedule, sigmas, self.k)
        if self.k > 1 and sigmas is not None and schedule is not None:
            ts = [round(float(schedule.timestep(s)), 2) for s in sigmas[:-1] if float(s) > 0]
            nexts = sigmas[1:]
            if not any(lo <= t <= hi and float(n) > 0 for t, n in zip(ts, nexts)):
                raise ConfigError(
                    f"step window t in [{lo:g}, {hi:g}] contains no step of this schedule "
                    f"(its steps start at t = {', '.join(f'{t:g}' for t in ts[:25])}); widen the window"
                )


def check_flow_schedule(schedule, sigmas: torch.Tensor | None, k: int) -> None:
    """A flow model's sigmas lie in [0, 1]; its deterministic Euler step cannot give k different candidates."""
    if sigmas is not None and float(sigmas.max()) > 1.0 + 1e-6:
        raise ConfigError(f"this sigma schedule starts at {float(sigmas.max()):.4g}, but a rectified-flow model's sigmas "
                          "lie in [0, 1]: these sigmas belong to a discrete eps/v model (use the flow model's own scheduler)")
    if k > 1 and schedule.step == "euler":
        raise ConfigError("the flow Euler step is deterministic, so the k candidates of a pool would be identical; "
                          "use the rf_ancestral, sde or cps step, or k = 1")


@dataclass
class StepRecord:
    i: int
    sigma: float
    sigma_next: float
    t: float  # parent timestep
    pooled: bool
    t_scored: float | None = None
    scores: torch.Tensor | None = None  # [k, B], CPU
    chosen: torch.Tensor | None = None  # [B]
    images: torch.Tensor | None = None  # [k, B, 3, h, w] uint8 thumbnails (keep_images)
    steps: int = 1  # transitions covered (1 + inner_steps for multi-step segments)
    evaluations: int = 0  # denoiser rows spent in this step (whole batch)
    decodes: int = 0  # candidate images decoded for scoring (0 with a latent scorer)
    scorer_rows: int = 0  # candidates scored
    particles: object = None  # fk: the resampling event (rewards, weights, ESS, ancestors)


@dataclass
class TransitionPair:
    """A (win, lose) pair of transitions from one pool, with everything needed to recompute
    their log-probabilities under the policy and the reference."""

    x_t: torch.Tensor  # parent of the winner [C, h, w]
    x_t_lose: torch.Tensor  # parent of the loser (differs from x_t only inside multi-step segments)
    x_win: torch.Tensor
    x_lose: torch.Tensor
    sigma: float
    sigma_next: float
    t: float  # parent DDPM timestep
    score_win: float
    score_lose: float
    row: int  # conditioning row (prompt index)
    eta: float
    t_next: float = float("nan")  # DDPM timestep of sigma_next (fractional for sigmas off the table)

    @property
    def shared_parent(self) -> bool:
        return self.x_t is self.x_t_lose or torch.equal(self.x_t, self.x_t_lose)


@dataclass
class ResampleResult:
    x: torch.Tensor  # final sample in sigma space at sigmas[-1]
    evaluations: int
    calls: int
    steps: int
    trace: list[StepRecord] = field(default_factory=list)
    pairs: list[TransitionPair] = field(default_factory=list)
    particle_stats: object = None  # fk: ParticleRunStats (events, resampling overhead, NaN rewards)

    @property
    def pooled_steps(self) -> int:
        return sum(r.steps for r in self.trace if r.pooled)

    @property
    def evaluations_per_step(self) -> float:
        return self.evaluations / max(self.steps, 1)

    @property
    def pooled_evaluations(self) -> int:
        """Denoiser rows spent in pooled steps (candidates, inner steps, and any parent evaluation)."""
        return sum(r.evaluations for r in self.trace if r.pooled)

    @property
    def decodes(self) -> int:
        """Candidate images decoded for scoring (the final image's decode is the host's, not counted)."""
        return sum(r.decodes for r in self.trace)

    @property
    def scorer_rows(self) -> int:
        return sum(r.scorer_rows for r in self.trace)


def _select(scores: torch.Tensor, policy: str, temperature: float, g: torch.Generator) -> torch.Tensor:
    """One candidate index per prompt from scores [k, B]."""
    k, b = scores.shape
    if policy == "greedy":
        return scores.argmax(0)
    if policy in ("random", "pairs"):
        return torch.randint(k, (b,), generator=g)
    probs = torch.softmax(scores.double() / temperature, dim=0).T  # [B, k]
    return torch.multinomial(probs, 1, generator=g).squeeze(1)


def _check_scorer(scorer, prompts: Sequence[str] | None, batch: int) -> list[str] | None:
    if scorer is None:
        raise ConfigError("the resampler needs a scorer when k > 1")
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if getattr(scorer, "needs_prompt", True) and (not prompts or not any(str(p).strip() for p in prompts)):
        raise ConfigError(f"scorer {getattr(scorer, 'name', type(scorer).__name__)!r} compares images with the prompt, "
                          "but no prompt text was given: pass the prompt(s), or use a scorer that needs none "
                          "(aesthetic, jpeg_compressibility)")
    if prompts is None:
        return None
    if len(prompts) == 1 and batch > 1:
        prompts = prompts * batch
    if len(prompts) != batch:
        raise ConfigError(f"{len(prompts)} prompts for a batch of {batch}")
    return prompts


def _thumbs(images: torch.Tensor, size: int) -> torch.Tensor:
    images = images.detach().float().clamp(0, 1)
    h, w = images.shape[-2:]
    if max(h, w) > size:
        scale = size / max(h, w)
        images = torch.nn.functional.interpolate(images, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    return (images * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def resample(
    denoiser: Denoiser,
    cond: Conditioning,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    schedule: NoiseSchedule,
    scorer,
    decode: Decoder,
    prompts: Sequence[str] | str | None,
    config: ResamplerConfig | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    callback: StepCallback | None = None,
    cancel: CancelFn | None = None,
    progress: ProgressFn | None = None,
    host_noise: Callable[[], torch.Tensor] | None = None,
) -> ResampleResult:
    """Sample from x (sigma space, at sigmas[0]) with per-step candidate pools (see module docstring).

    `denoiser(x, sigma[N], cond) -> x0` with CFG inside; `cond.take` selects rows. `schedule`
    maps sigma to the DDPM timestep (window, step-aware scoring). `scorer` follows the
    spo_core.scorers protocol (`score(images, prompts, timesteps)`, `needs_prompt`); `decode`
    maps x0 latents to images in [0,1] (the VAE, or a cheap approximation). `callback(StepInfo)`
    runs after each step or pooled segment, `progress` gets ProgressEvent("sampling", i, steps),
    `cancel()` is checked before each step. Returns the final sample (sigma space, at
    sigmas[-1]), the per-step trace, the pairs (policy "pairs") and the evaluation count in
    denoiser rows. k = 1 is plain sampling and needs no scorer.

    `host_noise()`: the host's own per-step noise source (A1111/Forge `p.rng.next`, ComfyUI's
    seeded noise sampler). It gives the noise of every unpooled step and of candidate 0 of every
    pool, drawn once per stochastic step as the host's own ancestral sampler draws it, so k = 1
    reproduces the host's Euler a image for image; the other candidates come from `generator`.
    """
    cfg = config or ResamplerConfig()
    sig = check_sigmas(sigmas)
    cfg.validate(sig, schedule)
    b = x.shape[0]
    if cond.batch_size != b:
        raise ConfigError(f"conditioning has {cond.batch_size} rows but the batch has {b}")
    if cfg.policy == "fk":
        from .particles import fk_sample

        return fk_sample(denoiser, cond, x, sig, schedule, scorer, decode, prompts, cfg, make_generator(generator, seed),
                         callback, cancel, progress)
    pooling = cfg.k > 1
    prompt_list = _check_scorer(scorer, prompts, b) if pooling else None
    latent_scoring = pooling and is_latent_scorer(scorer)
    if pooling and decode is None and not latent_scoring:
        raise ConfigError("the resampler needs a decoder (x0 latents -> images) to score candidates when k > 1")
    counter = denoiser if isinstance(denoiser, CountingDenoiser) else CountingDenoiser(denoiser)
    start_rows, start_calls = counter.rows, counter.calls
    g = make_generator(generator, seed)
    k = cfg.k
    cond_k = repeat_cond(cond, k) if pooling else None
    prompts_k = [prompt_list[r % b] for r in range(k * b)] if prompt_list is not None else None
    n = len(sig) - 1
    reporter = Reporter("sampling", n, progress, cancel) if progress is not None else None
    lo, hi = cfg.window
    trace: list[StepRecord] = []
    pairs: list[TransitionPair] = []
    x0 = None  # the current x's x0 prediction, when the last pool already evaluated it
    pool_count = 0
    i = 0
    while i < n:
        if cancel is not None and cancel():
            raise Cancelled("sampling was cancelled")
        step_rows = counter.rows
        s, s_next = float(sig[i]), float(sig[i + 1])
        t = float(schedule.timestep(s))
        if x0 is None:
            x0 = call_denoiser(counter, x, s, cond)
        in_window = pooling and lo <= t <= hi and s_next > 0
        pool_now = in_window and pool_count % cfg.score_every == 0
        if in_window:
            pool_count += 1
        mean, up = stochastic_step(schedule, x, x0, s, s_next, cfg.eta)
        if not pool_now:
            if float(up) > 0:
                z = host_noise().to(x) if host_noise is not None else randn_like(x.shape, g, x)
                x = mean + float(up) * z
            else:
                x = mean
            parent_x0, x0 = x0, None
            trace.append(StepRecord(i, s, s_next, t, pooled=False, evaluations=counter.rows - step_rows))
            if callback is not None:
                callback(StepInfo(i, n, x, parent_x0, s, s_next))
            i += 1
            if reporter is not None:
                reporter.update(i, f"step {i}/{n}")
            continue

        # --- a pool: k candidates from the shared mean, k-major rows ---------------------------
        z = randn_like((k, *x.shape), g, x)
        if host_noise is not None:
            z[0] = host_noise().to(x)
        cand = (mean.unsqueeze(0) + float(up) * z).reshape(k * b, *x.shape[1:])
        parents = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        chain = [(parents, cand, s, s_next, float(up))]  # transitions of every candidate's chain
        j = min(cfg.inner_steps, n - i - 1)
        cur, cur_sigma, cur_x0 = cand, s_next, None
        for step in range(j):  # multi-step segment: each candidate goes on alone for j steps
            nxt_sigma = float(sig[i + 2 + step])
            cur_x0 = call_denoiser(counter, cur, cur_sigma, cond_k)
            m2, u2 = stochastic_step(schedule, cur, cur_x0, cur_sigma, nxt_sigma, cfg.eta)
            nxt = m2 + float(u2) * randn_like(cur.shape, g, cur) if float(u2) > 0 else m2
            chain.append((cur, nxt, cur_sigma, nxt_sigma, float(u2)))
            cur, cur_sigma, cur_x0 = nxt, nxt_sigma, None
        end_index = i + 1 + j
        last = end_index == n
        decoded = 0
        if latent_scoring:  # LPO: the noisy candidates themselves, at the timestep of the step that made them
            producer = float(sig[end_index - 1])
            images = schedule.model_latent(cur, cur_sigma)
            t_scored = round(float(schedule.timestep(producer)), 4)
        elif cur_sigma == 0:
            images, t_scored = decode(cur), 0.0
            decoded = k * b
        elif last and cfg.final_decode:  # final candidates: decode the latents themselves (SPO's last step)
            images, t_scored = decode(schedule.model_latent(cur, cur_sigma)), 0.0
            decoded = k * b
        else:  # one batched call for all k*B candidates; the chosen rows are the next step's evaluation
            cur_x0 = call_denoiser(counter, cur, cur_sigma, cond_k)
            images, t_scored = decode(cur_x0), round(float(schedule.scorer_timestep(cur_sigma)), 4)
            decoded = k * b
        timesteps = torch.full((k * b,), t_scored)
        scores = _scores(scorer, images, prompts_k, timesteps, k, b)
        chosen = _select(scores, cfg.policy, cfg.temperature, g)
        rows = torch.arange(b)
        if cfg.policy == "pairs":
            pairs.extend(_pairs(chain, scores, cfg, k, b, schedule))
        x = cur.reshape(k, b, *x.shape[1:])[chosen, rows]
        x0 = cur_x0.reshape(k, b, *x.shape[1:])[chosen, rows] if cur_x0 is not None else None
        record = StepRecord(i, s, s_next, t, pooled=True, t_scored=t_scored, scores=scores, chosen=chosen, steps=1 + j,
                            evaluations=counter.rows - step_rows, decodes=decoded, scorer_rows=k * b)
        if cfg.keep_images and (not latent_scoring or decode is not None):
            # a latent scorer saw no image: the grid shows the scored latents decoded, for people only
            shown = images if not latent_scoring else decode(images)
            thumbs = _thumbs(shown, cfg.image_size)
            record.images = thumbs.reshape(k, b, *thumbs.shape[1:])
        trace.append(record)
        if callback is not None:
            callback(StepInfo(end_index - 1, n, x, x if x0 is None else x0, s, float(sig[end_index]), scores, chosen))
        i = end_index
        if reporter is not None:
            reporter.update(i, f"step {i}/{n}", score=float(scores.max(0).values.mean()))
    return ResampleResult(x, counter.rows - start_rows, counter.calls - start_calls, n, trace, pairs)


def is_latent_scorer(scorer) -> bool:
    """A scorer that reads the model's latents (LPO's LRM) instead of decoded images."""
    return getattr(scorer, "input_kind", "pixels") == "latent"


def _scores(scorer, images: torch.Tensor, prompts: list[str] | None, timesteps: torch.Tensor, k: int, b: int) -> torch.Tensor:
    """The scorer's [k*B] scores as a float32 CPU tensor [k, B], checked."""
    out = scorer.score(images, prompts, timesteps)
    out = torch.as_tensor(out).detach().float().cpu().flatten()
    if out.numel() != k * b:
        raise InvalidTensorError(f"scorer {getattr(scorer, 'name', type(scorer).__name__)!r} returned {out.numel()} "
                                 f"scores for {k * b} candidate images")
    if not torch.isfinite(out).all():
        raise InvalidTensorError(f"scorer {getattr(scorer, 'name', type(scorer).__name__)!r} returned non-finite scores "
                                 "(NaN or inf): check its weights and the decoded images (an fp16 VAE can overflow)")
    return out.reshape(k, b)


def pair_gap(score_win: float, score_lose: float, scale: float = 1.0) -> float:
    """SPO's pair criterion: p_win - p_lose of the 2-way softmax of the (scaled) scores."""
    p = torch.softmax(torch.tensor([score_win * scale, score_lose * scale], dtype=torch.float64), 0)
    return float(p[0] - p[1])


def _pairs(chain, scores: torch.Tensor, cfg: ResamplerConfig, k: int, b: int, schedule: NoiseSchedule) -> list[TransitionPair]:
    """Best and worst candidates of each prompt as pairs of transitions, if their softmax gap passes the threshold."""
    out = []
    best, worst = scores.argmax(0), scores.argmin(0)
    for r in range(b):
        w, l_ = int(best[r]), int(worst[r])
        if w == l_:
            continue
        sw, sl = float(scores[w, r]), float(scores[l_, r])
        threshold = cfg.threshold if cfg.threshold_fn is None else cfg.threshold_fn(float(schedule.timestep(chain[0][2])))
        if pair_gap(sw, sl, cfg.score_scale) <= threshold:
            continue
        for parents, children, s, s_next, up in chain:
            if up <= 0:
                continue  # deterministic transition: no density
            shape = children.shape[1:]
            par = parents.reshape(k, b, *shape)
            ch = children.reshape(k, b, *shape)
            out.append(TransitionPair(
                x_t=par[w, r].detach().clone(), x_t_lose=par[l_, r].detach().clone(), x_win=ch[w, r].detach().clone(),
                x_lose=ch[l_, r].detach().clone(), sigma=s, sigma_next=s_next,
                t=float(schedule.timestep(s)), score_win=sw, score_lose=sl, row=r, eta=cfg.eta,
                t_next=float(schedule.timestep(s_next)),
            ))
    return out
