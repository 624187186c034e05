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
    with pytest.raises(ConfigError, match="no prompt text"):
        resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(needs_prompt=True), decode, None, ResamplerConfig(k=2))
    with pytest.raises(ConfigError, match="no prompt text"):
        resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(needs_prompt=True), decode, ["", " "], ResamplerConfig(k=2))
    resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(needs_prompt=False), decode, None, ResamplerConfig(k=2))
    with pytest.raises(ConfigError, match="3 prompts for a batch of 2"):
        resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, ["a", "b", "c"], ResamplerConfig(k=2))


def test_trace_grid_renders_on_a_real_tiny_pipeline():
    be = DiffusersBackend.from_pipeline(tiny_sd15_pipeline())
    cond = be.encode_prompts(["a red circle"], height=32, width=32)
    sig = be.schedule.spo_sigmas(4)
    x = be.initial_noise(1, 32, 32, sigma=float(sig[0]), seed=0)
    res = resample(be.denoiser(5.0), cond, x, sig, be.schedule, BrightnessScorer(), be.decode, "a red circle",
                   ResamplerConfig(k=3, keep_images=True, window=(0, 999)), seed=0)
    grid = render_trace_grid(res, title="a red circle")
    pooled = sum(1 for r in res.trace if r.pooled)
    assert pooled == 4 and grid.size[1] > pooled * 96


class RecordingDenoiser(ToyDenoiser):
    """ToyDenoiser that remembers the batch size of every call."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, cond):
        self.batches.append(x.shape[0])
        return super().__call__(x, sigma, cond)


@pytest.mark.parametrize("k", [2, 4])
def test_each_pooled_step_is_one_batched_call_of_k_rows_per_prompt(k):
    sched, sig, cond, x, decode = toy_setup(b=2)
    den = RecordingDenoiser()
    decoded = []
    res = resample(den, cond, x, sig, sched, BrightnessScorer(), lambda z: decoded.append(z.shape[0]) or decode(z),
                   ["a", "b"], ResamplerConfig(k=k), seed=0)
    # SPO window: 4 plain steps (t = 951 ... 801), then pools at t = 751 ... 1
    assert [r.pooled for r in res.trace] == [False] * 4 + [True] * 16
    assert [r.evaluations for r in res.trace] == [2] * 4 + [2 * (k + 1)] + [2 * k] * 14 + [0]
    # calls: 4 plain (B rows), the first pool's parent (B rows), then one k*B call per pool but the last
    assert den.batches == [2] * 5 + [k * 2] * 15
    assert decoded == [k * 2] * 16  # every pool decodes all its candidates at once
    assert res.evaluations == sum(r.evaluations for r in res.trace) == sum(den.batches)
    assert res.pooled_evaluations == 2 * (k + 1) + 14 * 2 * k


def test_pairs_are_consistent_transitions_of_the_recorded_parents():
    """x_win / x_lose must be draws of N(mean(x_t), sigma_up^2) under the sampling denoiser:
    recompute the mean from the recorded parent and check the implied noise is standard normal."""
    sched, sig, cond, x, decode = toy_setup()
    for cfg in (ResamplerConfig(k=4, policy="pairs", threshold=0.0),
                ResamplerConfig(k=2, policy="pairs", inner_steps=3, threshold=0.0)):
        res = resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, ["a", "b"], cfg, seed=8)
        assert res.pairs
        for p in res.pairs:
            down, up = ancestral_sigmas(p.sigma, p.sigma_next, p.eta)
            assert abs(float(sched.timestep(p.sigma)) - p.t) < 1e-6 and abs(float(sched.timestep(p.sigma_next)) - p.t_next) < 1e-6
            for parent, child in ((p.x_t, p.x_win), (p.x_t_lose, p.x_lose)):
                par = parent.unsqueeze(0)
                x0 = ToyDenoiser()(par, torch.tensor([p.sigma]), cond.take(torch.tensor([p.row])))
                z = (child.unsqueeze(0) - ancestral_mean(par, x0, p.sigma, down)) / float(up)
                assert 0.6 < float(z.pow(2).mean()) < 1.4, "child is not a draw around its recorded parent's mean"


def test_progress_callback_and_cancel():
    from spo_core.errors import Cancelled

    sched, sig, cond, x, decode = toy_setup()
    events, infos = [], []
    resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, "p", ResamplerConfig(k=2), seed=0,
             progress=events.append, callback=infos.append)
    assert [e.step for e in events] == list(range(1, 21)) and events[-1].total == 20
    assert [i.i for i in infos] == list(range(20))
    for info in infos:  # what a host needs for a preview
        assert info.x.shape == x.shape and info.x0.shape == x.shape and info.total == 20
        assert (info.scores is None) == (info.i < 4)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 6

    with pytest.raises(Cancelled):
        resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, "p", ResamplerConfig(k=2), seed=0, cancel=cancel)
    with pytest.raises(Cancelled):
        sample_ancestral(ToyDenoiser(), cond, x, sig, seed=0, cancel=lambda: True)


def test_bad_scores_and_missing_decoder():
    from spo_core.errors import InvalidTensorError

    class NaNScorer(BrightnessScorer):
        def score(self, images, prompts, timesteps=None):
            return torch.full((images.shape[0],), float("nan"))

    class ShortScorer(BrightnessScorer):
        def score(self, images, prompts, timesteps=None):
            return torch.zeros(1)

    sched, sig, cond, x, decode = toy_setup()
    with pytest.raises(InvalidTensorError, match="non-finite"):
        resample(ToyDenoiser(), cond, x, sig, sched, NaNScorer(), decode, "p", ResamplerConfig(k=2, policy="softmax"))
    with pytest.raises(InvalidTensorError, match="1 scores for 4"):
        resample(ToyDenoiser(), cond, x, sig, sched, ShortScorer(), decode, "p", ResamplerConfig(k=2))
    with pytest.raises(ConfigError, match="decoder"):
        resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), None, "p", ResamplerConfig(k=2))
    with pytest.raises(ConfigError, match="needs a scorer"):
        resample(ToyDenoiser(), cond, x, sig, sched, None, decode, "p", ResamplerConfig(k=2))
    with pytest.raises(ConfigError, match="non-increasing"):
        resample(ToyDenoiser(), cond, x, sig.flip(0), sched, BrightnessScorer(), decode, "p", ResamplerConfig(k=2))


def test_k_diffusion_schedules_ending_at_zero():
    """ComfyUI/WebUI schedules end at sigma 0: the last step is deterministic (x = x0) and never pooled."""
    sched, _, cond, x, decode = toy_setup()
    sig = sched.karras_sigmas(10)
    assert float(sig[-1]) == 0
    res = resample(ToyDenoiser(), cond, x * float(sig[0]) / 14.6, sig, sched, BrightnessScorer(), decode, "p",
                   ResamplerConfig(k=3, window=(0, 999)), seed=0)
    assert [r.pooled for r in res.trace] == [True] * 9 + [False]
    assert res.trace[-1].evaluations == 0  # the chosen candidate's x0 is the final image: no extra call
    assert torch.isfinite(res.x).all()


def test_spo_presets():
    sd15, sdxl = ResamplerConfig.for_spo("sd15"), ResamplerConfig.for_spo("sdxl")
    assert (sd15.k, sd15.inner_steps, sd15.threshold, sd15.policy) == (4, 0, 0.3, "pairs")
    assert (sdxl.k, sdxl.inner_steps, sdxl.threshold) == (2, 3, 0.4)
    assert ResamplerConfig.for_spo("sdxl", k=4).k == 4


def test_trace_grid_marks_the_chosen_candidate():
    from spo_core.sampling.trace import CHOSEN

    sched, sig, cond, x, decode = toy_setup()
    res = resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, ["a", "b"],
                   ResamplerConfig(k=3, keep_images=True, image_size=16), seed=1)
    cell = 40
    for prompt in (0, 1):
        grid = render_trace_grid(res, prompt, cell=cell, title="t")
        pooled = [r for r in res.trace if r.pooled]
        assert grid.size == (84 + 3 * (cell + 4) + 4, 22 + len(pooled) * (cell + 14 + 4) + 4)
        for row, rec in enumerate(pooled):
            y = 22 + row * (cell + 18)
            for c in range(3):
                px = grid.getpixel((84 + c * (cell + 4) - 2, y + cell // 2))  # left edge of the outline
                assert (px == CHOSEN) == (c == int(rec.chosen[prompt]))
    with pytest.raises(ConfigError, match="keep_images"):
        render_trace_grid(resample(ToyDenoiser(), cond, x, sig, sched, BrightnessScorer(), decode, "p",
                                   ResamplerConfig(k=2), seed=1))


def test_latent_rgb_decoder_matches_comfyui_previewer():
    from spo_core.sampling import LatentRGBDecoder

    z = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    # ComfyUI Latent2RGBPreviewer: x0.permute(1, 2, 0) @ factors (+ bias), then (v + 1) / 2 clamped
    sdxl_factors = torch.tensor([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
                                 [-0.3165, -0.2492, -0.2188]])
    ref = ((z[1].permute(1, 2, 0) @ sdxl_factors + torch.tensor([0.1084, -0.0175, -0.0011]) + 1) / 2).clamp(0, 1)
    ours = LatentRGBDecoder("sdxl", upscale=1)(z)
    torch.testing.assert_close(ours[1].permute(1, 2, 0), ref)
    up = LatentRGBDecoder("sd15", upscale=8)(z)
    assert up.shape == (2, 3, 40, 48) and 0 <= float(up.min()) and float(up.max()) <= 1
    with pytest.raises(ConfigError):
        LatentRGBDecoder("flux")


def test_default_windows_and_the_policy_switch_rule():
    from spo_core.sampling import FK_WINDOW, SPO_WINDOW, default_window, window_hi_after_policy_change

    assert default_window("fk") == FK_WINDOW == (0.0, 999.0) and default_window("greedy") == SPO_WINDOW == (0.0, 751.0)
    assert window_hi_after_policy_change("fk", 751.0) == 999.0 and window_hi_after_policy_change("random", 999.0) == 751.0
    assert window_hi_after_policy_change("fk", 500.0) == 500.0  # a typed value stays
    assert window_hi_after_policy_change("fk", 700.0, chain_default=700.0) == 999.0  # the WebUI's own default
    assert window_hi_after_policy_change("greedy", 999.0, chain_default=700.0) == 700.0
