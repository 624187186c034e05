"""The per-step resampler: evaluation count, policies, window, multi-step pairs, determinism, errors."""

import pytest
import torch

from spo_core.backends import DiffusersBackend
from spo_core.errors import ConfigError
from spo_core.sampling import (CountingDenoiser, ResamplerConfig, TensorConditioning, best_of_n, resample,
                               sample_ancestral, transition_log_prob)
from spo_core.sampling.schedule import NoiseSchedule
from spo_core.sampling.step import ancestral_mean, ancestral_sigmas
from spo_core.sampling.trace import render_trace_grid
from spo_core.testing import tiny_sd15_pipeline


class BrightnessScorer:
    """Prefers bright images; optionally step-aware (remembers the timesteps it was given)."""

    name = "brightness"
    differentiable = True

    def __init__(self, needs_prompt=True, step_aware=True):
        self.needs_prompt = needs_prompt
        self.step_aware = step_aware
        self.calls = []

    def score(self, images, prompts, timesteps=None):
        self.calls.append((images.shape[0], None if prompts is None else list(prompts), None if timesteps is None else timesteps.clone()))
        return 100 * images.mean(dim=(1, 2, 3))  # PickScore-like scale (~100 x cosine)


class ToyDenoiser:
    """x0 = 0.5 * x + shift per row (row r uses cond 'shift'[r]): cheap and cond-dependent."""

    def __call__(self, x, sigma, cond):
        return 0.5 * x + cond["shift"].reshape(-1, 1, 1, 1)


def toy_setup(b=2, steps=20):
    sched = NoiseSchedule.scaled_linear()
    sig = sched.spo_sigmas(steps)
    cond = TensorConditioning({"shift": torch.arange(b, dtype=torch.float32)})
    x = torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * float(sig[0])
    decode = lambda z: (z.clamp(-1, 1) + 1) / 2  # noqa: E731
    return sched, sig, cond, x, decode


def test_k1_equals_plain_sampling_exactly():
    sched, sig, cond, x, decode = toy_setup()
    plain = sample_ancestral(ToyDenoiser(), cond, x, sig, eta=1.0, seed=7)
    res = resample(ToyDenoiser(), cond, x, sig, sched, None, decode, None, ResamplerConfig(k=1), seed=7)
    torch.testing.assert_close(res.x, plain.x, rtol=0, atol=0)
    assert res.evaluations == plain.evaluations == 20 * 2


@pytest.mark.parametrize("k", [2, 4, 8])
def test_k_evaluations_per_pooled_step(k):
    sched, sig, cond, x, decode = toy_setup()
    counter = CountingDenoiser(ToyDenoiser())
    cfg = ResamplerConfig(k=k, policy="greedy", window=(0, 999), final_decode=True)
    res = resample(counter, cond, x, sig, sched, BrightnessScorer(), decode, ["a", "b"], cfg, seed=1)
    b, n = 2, 20
    # every step pooled: the first step's parent evaluation (1 per prompt) + k per step, except the
    # last step whose candidates are scored directly (SPO): (n - 1) * k + 1 per prompt
    assert res.evaluations == b * ((n - 1) * k + 1) == counter.rows
    assert res.pooled_steps == n
    # inside the window alone, exactly k per step: compare with a run whose window ends before the end
    cfg2 = ResamplerConfig(k=k, window=(300, 999))
    res2 = resample(CountingDenoiser(ToyDenoiser()), cond, x, sig, sched, BrightnessScorer(), decode, ["a", "b"], cfg2, seed=1)
    pooled = sum(1 for r in res2.trace if r.pooled)
    plain_steps = n - pooled
    assert res2.evaluations == b * (pooled * k + plain_steps)


def test_greedy_picks_the_best_candidate_and_scores_at_the_candidates_timestep():
    sched, sig, cond, x, decode = toy_setup()
    scorer = BrightnessScorer()
    res = resample(ToyDenoiser(), cond, x, sig, sched, scorer, decode, ["p0", "p1"], ResamplerConfig(k=4), seed=3)
    pooled = [r for r in res.trace if r.pooled]
    assert [round(r.t) for r in pooled] == list(range(751, 0, -50))  # SPO's window: parents t = 751 ... 1
    for r in pooled:
        assert torch.equal(r.chosen, r.scores.argmax(0))
    # step-aware timesteps: the candidates' own timestep, 0 at the last step (scored directly)
    seen = [int(c[2][0]) for c in scorer.calls]
    assert seen == list(range(701, 0, -50)) + [0]
    assert scorer.calls[0][1] == ["p0", "p1"] * 4  # k-major prompts


def test_determinism_and_policies():
    sched, sig, cond, x, decode = toy_setup()
    outs = {}
    for policy in ("greedy", "random", "softmax", "pairs"):
        a = resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, "p", ResamplerConfig(k=4, policy=policy), seed=11)
        b = resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, "p", ResamplerConfig(k=4, policy=policy), seed=11)
        torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
        outs[policy] = a
    c = resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, "p", ResamplerConfig(k=4, policy="random"), seed=12)
    assert not torch.equal(c.x, outs["random"].x)
    # greedy ends brighter than random continuation on average over prompts
    assert decode(outs["greedy"].x).mean() > decode(outs["random"].x).mean()
    # a near-zero temperature softmax behaves like greedy
    cold = resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, "p",
                    ResamplerConfig(k=4, policy="softmax", temperature=1e-6), seed=11)
    for r in cold.trace:
        if r.pooled:
            assert torch.equal(r.chosen, r.scores.argmax(0))


def test_pairs_follow_spo_threshold_and_log_probs_are_computable():
    sched, sig, cond, x, decode = toy_setup()
    cfg = ResamplerConfig(k=4, policy="pairs", threshold=0.3)
    res = resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, ["a", "b"], cfg, seed=5)
    assert res.pairs
    for p in res.pairs:
        dp = torch.softmax(torch.tensor([p.score_win, p.score_lose], dtype=torch.float64), 0)
        assert float(dp[0] - dp[1]) > 0.3 and p.score_win >= p.score_lose
        assert p.shared_parent and 0 <= p.t <= 751
        down, up = ancestral_sigmas(p.sigma, p.sigma_next, p.eta)
        parent = p.x_t.unsqueeze(0)
        mean = ancestral_mean(parent, ToyDenoiser()(parent, torch.tensor([p.sigma]), cond.take(torch.tensor([p.row]))), p.sigma, down)
        lp = transition_log_prob(torch.stack([p.x_win, p.x_lose]), mean.expand(2, *mean.shape[1:]), up)
        assert torch.isfinite(lp).all()
    strict = resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, ["a", "b"],
                      ResamplerConfig(k=4, policy="pairs", threshold=0.999), seed=5)
    assert len(strict.pairs) < len(res.pairs)


def test_multi_step_segments_make_pairs_of_both_chains():
    sched, sig, cond, x, decode = toy_setup()
    cfg = ResamplerConfig(k=2, policy="pairs", inner_steps=3, threshold=0.0)
    res = resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, ["a", "b"], cfg, seed=2)
    pooled = [r for r in res.trace if r.pooled]
    assert [r.i for r in pooled] == [4, 8, 12, 16] and all(r.steps == 4 for r in pooled)  # SDXL: branch at 4, 8, 12, 16
    by_parent = [p for p in res.pairs if p.shared_parent]
    inner = [p for p in res.pairs if not p.shared_parent]
    assert len(inner) == 3 * len(by_parent)  # every segment: 1 branch + 3 inner transitions of both chains


def test_window_and_interval():
    sched, sig, cond, x, decode = toy_setup()
    res = resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, "p",
                   ResamplerConfig(k=2, window=(200, 600), score_every=2), seed=0)
    pooled_t = [round(r.t) for r in res.trace if r.pooled]
    assert pooled_t == [551, 451, 351, 251]


def test_best_of_n_keeps_the_best_final_image():
    sched, sig, cond, x, decode = toy_setup()
    n = 4
    starts = torch.randn(n * 2, 3, 8, 8, generator=torch.Generator().manual_seed(9)) * float(sig[0])
    res = best_of_n(ToyDenoiser(), cond, starts, sig, sched, BrightnessScorer(), decode, ["a", "b"], n=n, seed=4)
    rec = res.trace[0]
    assert rec.scores.shape == (n, 2) and torch.equal(rec.chosen, rec.scores.argmax(0))
    assert res.evaluations == n * 2 * 20


def test_bad_input():
    sched, sig, cond, x, decode = toy_setup()
    with pytest.raises(ConfigError, match="at least 1"):
        resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, "p", ResamplerConfig(k=0))
    with pytest.raises(ConfigError, match="identical"):
        resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, "p", ResamplerConfig(k=4, eta=0.0))
    with pytest.raises(ConfigError, match="no step of this schedule"):
        resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, "p", ResamplerConfig(k=2, window=(960, 990)))
    with pytest.raises(ConfigError, match="needs the prompt"):
        resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(needs_prompt=True), decode, None, ResamplerConfig(k=2))
    resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(needs_prompt=False), decode, None, ResamplerConfig(k=2))
    with pytest.raises(ConfigError, match="3 prompts for a batch of 2"):
        resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, ["a", "b", "c"], ResamplerConfig(k=2))


def test_trace_grid_renders_on_a_real_tiny_pipeline():
    be = DiffusersBackend.from_pipeline(tiny_sd15_pipeline())
    cond = be.encode_prompts(["a red circle"], height=32, width=32)
    sig = be.schedule.spo_sigmas(8)
    x = be.initial_noise(1, 32, 32, sigma=float(sig[0]), seed=0)
    res = resample(be.denoiser(5.0), cond, x, sig, be.schedule, BrightnessScorer(), be.decode, "a red circle",
                   ResamplerConfig(k=3, keep_images=True, window=(0, 999)), seed=0)
    grid = render_trace_grid(res, title="a red circle")
    pooled = sum(1 for r in res.trace if r.pooled)
    assert pooled == 8 and grid.size[1] > pooled * 96
