"""Feynman-Kac steering (issue 17): the potentials and their telescoping, weights, ESS, multinomial
resampling that carries each particle's state, exact accounting, determinism, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from spo_core.errors import ConfigError
from spo_core.sampling import ResamplerConfig
from spo_core.sampling.particles import (ParticleState, effective_sample_size, final_log_potential, gather_particles,
                                         log_potential, multinomial_ancestors, normalized, resampling_steps)


def test_potentials_follow_the_reference_formulas():
    r, prev = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 1.0]])
    g, new = log_potential("diff", 2.0, r, prev)
    assert torch.allclose(g, 2.0 * (r - prev)) and torch.equal(new, r)
    g, new = log_potential("max", 2.0, r, prev)
    assert torch.equal(new, torch.tensor([[2.0, 3.0]])) and torch.allclose(g, 2.0 * new)
    g, new = log_potential("add", 2.0, r, prev)
    assert torch.equal(new, r + prev) and torch.allclose(g, 2.0 * (r + prev))
    g, new = log_potential("rt", 2.0, r, prev)
    assert torch.allclose(g, 2.0 * r) and torch.equal(new, r)


@pytest.mark.parametrize("kind", ["max", "add", "rt"])
def test_the_potentials_along_a_lineage_telescope_to_exp_lambda_r_final(kind):
    lam = 0.7
    state = ParticleState(1, 1, kind, lam)
    total = 0.0
    for r in (0.3, -0.2, 1.1):
        before = state.log_product.clone()
        state.weigh(torch.tensor([[r]]), last=False)
        total += float(state.log_product - before)
    final = final_log_potential(kind, lam, torch.tensor([[0.5]], dtype=torch.float64), state.stored, state.log_product)
    assert total + float(final) == pytest.approx(lam * 0.5)


def test_weights_nan_rewards_and_ess():
    log_w = torch.tensor([[0.0, -math.inf], [math.log(3.0), -math.inf]], dtype=torch.float64)
    w = normalized(log_w)
    assert torch.allclose(w[:, 0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert torch.allclose(w[:, 1], torch.tensor([0.5, 0.5], dtype=torch.float64))  # nothing to prefer: uniform
    assert float(effective_sample_size(torch.full((4, 1), 0.25))[0]) == pytest.approx(4.0)
    state = ParticleState(3, 1, "rt", 1.0)
    w = state.weigh(torch.tensor([[1.0], [float("nan")], [1.0]]), last=False)
    assert float(w[1, 0]) == 0.0 and float(w[0, 0]) == pytest.approx(0.5)


def test_multinomial_resampling_carries_each_particles_state():
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([[0.0, 0.5], [1.0, 0.5]])
    anc = multinomial_ancestors(weights, torch.tensor([True, False]), g)
    assert torch.equal(anc[:, 0], torch.tensor([1, 1])) and torch.equal(anc[:, 1], torch.tensor([0, 1]))
    x = torch.arange(4).float().reshape(4, 1)  # rows: particle j of prompt b at j*2 + b
    assert gather_particles(x, anc).flatten().tolist() == [2.0, 1.0, 2.0, 3.0]
    state = ParticleState(2, 2, "max", 1.0)
    state.stored = torch.tensor([[5.0, 6.0], [7.0, 8.0]], dtype=torch.float64)
    state.reindex(anc, torch.tensor([True, False]))
    assert state.stored.tolist() == [[7.0, 6.0], [7.0, 8.0]]


def test_the_resampling_schedule_is_every_nth_step_in_the_window_and_the_last():
    from spo_core.sampling import NoiseSchedule

    sched = NoiseSchedule.scaled_linear()
    sig = sched.spo_sigmas(20)
    assert resampling_steps(sig, sched, (0, 999), 5) == [0, 5, 10, 15, 19]
    assert resampling_steps(sig, sched, (300, 700), 2) == [6, 8, 10, 12, 19]


# -- on a real (tiny) model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("diffusers")
    from spo_core.backends import DiffusersBackend
    from spo_core.testing import tiny_sd15_pipeline

    return DiffusersBackend.from_pipeline(tiny_sd15_pipeline(seed=0))


class Brightness:
    name, step_aware, needs_prompt, differentiable = "brightness", False, False, False

    def __init__(self, nan_rows=()):
        self.nan_rows = set(nan_rows)

    def score(self, images, prompts=None, timesteps=None):
        s = images.float().mean(dim=(1, 2, 3)) * 10
        for r in self.nan_rows:
            if r < s.shape[0]:
                s[r] = float("nan")
        return s


def _fk(**kw):
    base = dict(k=4, policy="fk", potential="max", lam=5.0, window=(0, 999), score_every=2, keep_images=True)
    base.update(kw)
    return ResamplerConfig(**base)


def test_fk_accounting_determinism_and_the_best_particle(backend):
    prompts = ["a red cube", "a blue ball"]
    out = backend.sample(prompts, steps=6, seed=5, scorer=Brightness(), config=_fk())
    r = out.result
    events = r.particle_stats.events
    assert [e.i for e in events] == [0, 2, 4, 5]
    assert r.evaluations == 4 * 2 * 6  # N rows per image per step: best-of-4's budget exactly
    assert r.decodes == 4 * 2 * (len(events) + 1) and r.scorer_rows == r.decodes
    final = r.trace[-1]
    assert torch.equal(final.chosen, final.scores.argmax(0))
    again = backend.sample(prompts, steps=6, seed=5, scorer=Brightness(), config=_fk()).result
    assert torch.equal(again.x, r.x)
    other = backend.sample(prompts, steps=6, seed=6, scorer=Brightness(), config=_fk()).result
    assert not torch.equal(other.x, r.x)
    from spo_core.sampling import render_grid

    grid = render_grid(r, 1, cell=32)
    assert grid.size[1] > 32 * (len(events) + 1)


def test_fk_with_nan_rewards_never_crashes_and_reports_them(backend):
    out = backend.sample(["a cat"], steps=4, seed=1, scorer=Brightness(nan_rows=[1, 2]), config=_fk())
    stats = out.result.particle_stats
    assert stats.nan_rewards == 2 * len(stats.events)
    for e in stats.events:
        assert float(e.weights[1, 0]) == 0.0 and float(e.weights[2, 0]) == 0.0
    assert torch.isfinite(out.result.x).all()


def test_fk_adaptive_resamples_only_a_degenerate_population(backend):
    flat = _fk(lam=1e-6, adaptive=True)  # nearly equal weights: ESS ~ N, never below N/2
    stats = backend.sample(["a cat"], steps=4, seed=1, scorer=Brightness(), config=flat).result.particle_stats
    assert not any(bool(e.resampled.any()) for e in stats.events)
    peaked = _fk(lam=1e4, adaptive=True)
    stats = backend.sample(["a cat"], steps=6, seed=1, scorer=Brightness(), config=peaked).result.particle_stats
    for e in stats.events:  # resampled exactly when the ESS falls below N/2 (copies stay equal until the next step)
        assert torch.equal(e.resampled, e.ess < 4 / 2)
    assert bool(stats.events[0].resampled.all())


def test_fk_on_sdxl_with_cfg_and_a_lora(tmp_path):
    pytest.importorskip("diffusers")
    from spo_core.backends import DiffusersBackend
    from spo_core.lora import merge_into_modules
    from spo_core.testing import tiny_sdxl_pipeline

    from lora_helpers import random_lora, spo_modules

    pipe = tiny_sdxl_pipeline(seed=1)
    be = DiffusersBackend.from_pipeline(pipe)
    table = be.module_table()
    merge_into_modules({"unet": pipe.unet}, random_lora(table, spo_modules(table), rank=2))
    out = be.sample(["a cat"], steps=4, guidance_scale=4.0, seed=2, scorer=Brightness(), config=_fk(k=3))
    assert out.images.shape[0] == 1 and out.result.evaluations == 3 * 4


def test_fk_with_a_latent_scorer_decodes_nothing(backend):
    from spo_core.scorers.lrm import LRMScorer
    from spo_core.scorers.lrm_model import lrm_from_diffusion_model

    pipe = backend.pipe
    lrm = LRMScorer(lrm_from_diffusion_model(pipe.unet, pipe.text_encoder))
    r = backend.sample(["a cat"], steps=4, seed=1, scorer=lrm, config=_fk(keep_images=False)).result
    assert r.decodes == 0 and r.scorer_rows == 4 * (len(r.particle_stats.events) + 1)


@pytest.mark.parametrize("bad, match", [(dict(k=1), "plain sampling"), (dict(lam=0.0), "lambda"),
                                        (dict(lam=float("nan")), "lambda"), (dict(potential="sum"), "potential"),
                                        (dict(window=(1000.0, 1200.0)), "window")])
def test_fk_bad_input_is_refused(backend, bad, match):
    with pytest.raises(ConfigError, match=match):
        backend.sample(["a cat"], steps=4, scorer=Brightness(), config=_fk(**bad))


def test_the_cli_runs_fk_and_says_what_it_spent(tmp_path, capsys):
    from spo_core.cli import main

    out = tmp_path / "fk.png"
    assert main(["sample", "--model", "world", "--prompt", "a red circle", "--particles", "3", "--lam", "1", "--steps", "5",
                 "--window", "0:999", "--resample-every", "2", "--out", str(out), "--trace", str(tmp_path / "g.png"),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "FK steering with 3 particles" in text and "15 denoiser evaluations" in text and "decodes" in text
    assert (tmp_path / "g.png").is_file()
    assert main(["sample", "--model", "world", "--prompt", "a red circle", "--particles", "1", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "plain sampling" in capsys.readouterr().err
