"""Rectified-flow step math (spo_core.sampling.flow) against diffusers' scheduler, ComfyUI's RF
ancestral sampler (with COMFYUI_PATH) and the marginals the steps must preserve; the resampler,
best-of-N and the particle policy on a flow schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from spo_core.errors import ConfigError
from spo_core.sampling import ResamplerConfig, TensorConditioning, resample
from spo_core.sampling.best_of_n import best_of_n
from spo_core.sampling.flow import (FlowSchedule, cps_log_prob_upstream, cps_step, euler_step, exponential_time_shift, flow_step, flux_mu,
                                    rf_ancestral_step, sde_step)
from spo_core.sampling.samplers import sample_ancestral
from spo_core.sampling.step import transition_log_prob

STEPS = 20


def _x0_model(x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
    """A fixed smooth 'flow model': x0 = a nonlinear function of x and sigma (stands in for x - sigma v)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
    return torch.tanh(0.7 * x) * (1 - 0.3 * s) + 0.1 * cond["c"].reshape(-1, 1, 1, 1)


def _cond(b: int) -> TensorConditioning:
    return TensorConditioning({"c": torch.arange(b, dtype=torch.float32)})


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_fixed_shift_schedule_equals_diffusers(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(STEPS)
    ours = FlowSchedule(shift).diffusers_sigmas(STEPS)
    torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=2e-7)
    torch.testing.assert_close(FlowSchedule(shift).timestep(ours[:-1]).float(), sched.timesteps.float(), rtol=0, atol=2e-4)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_dynamic_shift_schedules_equal_diffusers(seq_len):
    """Flux: mu from the image's token count; both the default grid and Flux's own sigmas grid."""
    mu = flux_mu(seq_len)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched.set_timesteps(STEPS, mu=mu)
    torch.testing.assert_close(FlowSchedule().diffusers_sigmas(STEPS, mu=mu), sched.sigmas.float(), rtol=0, atol=2e-7)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    torch.testing.assert_close(FlowSchedule().flux_sigmas(STEPS, mu), sched.sigmas.float(), rtol=0, atol=2e-7)


def test_euler_steps_equal_diffusers_step_over_a_20_step_schedule():
    g = torch.Generator().manual_seed(0)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(STEPS)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ours = x.clone()
    for i, t in enumerate(sched.timesteps):
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        v = torch.randn(x.shape, generator=g)
        x = sched.step(v, t, x).prev_sample
        ours, _ = euler_step(ours, ours - s * v, s, s_next)
        torch.testing.assert_close(ours, x, rtol=0, atol=5e-6)


def test_diffusers_stochastic_sampling_is_cps_at_noise_level_one():
    """diffusers' stochastic_sampling step x' = (1 - s')x0 + s' eps is CPS with a = 1 (std s')."""
    g = torch.Generator().manual_seed(1)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    sched.set_timesteps(STEPS)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps[:-1]):
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        v = torch.randn(x.shape, generator=g)
        seed = 100 + i
        ref = sched.step(v, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        mean, std = cps_step(x, x - s * v, s, s_next, noise_level=1.0)
        torch.testing.assert_close(mean + std * eps, ref, rtol=0, atol=5e-6)
        x = ref


def _comfy_rf_reference(model, x, sigmas, noises, eta):
    """ComfyUI's sample_euler_ancestral_RF loop, as written in comfy/k_diffusion/sampling.py @a125cd8 (L234-257)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
            sigma_down = sigmas[i + 1] * downstep_ratio
            alpha_ip1, alpha_down = 1 - sigmas[i + 1], 1 - sigma_down
            renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down ** 2 * alpha_ip1 ** 2 / alpha_down ** 2) ** 0.5
            ratio = sigma_down / sigmas[i]
            x = ratio * x + (1 - ratio) * denoised
            if eta > 0:
                x = (alpha_ip1 / alpha_down) * x + noises[i] * renoise_coeff
    return x


def _our_rf_loop(model, x, sigmas, noises, eta):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        mean, std = rf_ancestral_step(x, model(x, sigmas[i]), s, s_next, eta)
        x = mean + std * noises[i] if std > 0 else mean
    return x


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_rf_ancestral_equals_comfyuis_loop(eta):
    g = torch.Generator().manual_seed(2)
    sigmas = FlowSchedule(3.0).diffusers_sigmas(STEPS)
    x = torch.randn(2, 4, 8, 8, generator=g)
    noises = [torch.randn(x.shape, generator=g) for _ in range(STEPS)]
    model = lambda x, s: _x0_model(x, torch.as_tensor(s).expand(x.shape[0]), _cond(2))  # noqa: E731
    torch.testing.assert_close(_our_rf_loop(model, x, sigmas, noises, eta), _comfy_rf_reference(model, x, sigmas, noises, eta),
                               rtol=0, atol=1e-5)


def _flow_grpo_sde_reference(v, x, sigma, sigma_prev, sigma_max, noise_level, prev_sample):
    """Flow-GRPO's sde_step_with_logprob 'sde' branch, as written in the paper's code (frontier.md §3)."""
    v, x = v.float(), x.float()
    dt = sigma_prev - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    mean = x * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * math.sqrt(-dt)
    lp = -((prev_sample - mean) ** 2) / (2 * std ** 2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return mean, std, lp.mean(dim=(1, 2, 3))


def test_sde_step_and_log_prob_equal_flow_grpos_over_a_schedule():
    g = torch.Generator().manual_seed(4)
    sigmas = FlowSchedule(3.0).diffusers_sigmas(10)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for i in range(10):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = torch.randn(x.shape, generator=g)
        mean, std = sde_step(x, x - s * v, s, s_next, noise_level=0.7)
        nxt = mean + std * torch.randn(x.shape, generator=g)
        ref_mean, ref_std, ref_lp = _flow_grpo_sde_reference(v, x, s, s_next, float(sigmas[1]), 0.7, nxt)
        torch.testing.assert_close(mean, ref_mean, rtol=0, atol=2e-5)
        assert std == pytest.approx(ref_std, rel=1e-6)
        torch.testing.assert_close(transition_log_prob(nxt, mean, std), ref_lp, rtol=1e-5, atol=1e-5)
        x = nxt


@pytest.mark.parametrize("kind", ["rf_ancestral", "cps"])
def test_steps_preserve_the_flow_marginal_given_the_true_x0(kind):
    """With the exact x0 of x = (1 - s) x0 + s eps, RF ancestral and CPS land exactly on (1 - s') x0 + s' eps'."""
    g = torch.Generator().manual_seed(5)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.4)
    s, s_next = 0.8, 0.55
    x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
    mean, std = flow_step(kind, x, x0, s, s_next, 0.7 if kind == "cps" else 1.0)
    nxt = mean + std * torch.randn(x0.shape, generator=g)
    assert float(nxt.mean()) == pytest.approx((1 - s_next) * 0.4, abs=0.01)
    assert float(nxt.std()) == pytest.approx(s_next, rel=0.01)


def test_sde_step_preserves_the_marginal_to_first_order():
    g = torch.Generator().manual_seed(6)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.4)
    s, s_next = 0.6, 0.58
    x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
    mean, std = sde_step(x, x0, s, s_next, noise_level=0.7)
    nxt = mean + std * torch.randn(x0.shape, generator=g)
    assert float(nxt.mean()) == pytest.approx((1 - s_next) * 0.4, abs=0.005)
    assert float(nxt.std()) == pytest.approx(s_next, rel=0.01)


def test_exponential_shift_maps_the_ends():
    t = torch.tensor([0.0, 0.5, 1.0])
    out = exponential_time_shift(1.15, t)
    assert float(out[0]) == 0 and float(out[2]) == 1 and 0.5 < float(out[1]) < 1


def test_bad_sigmas_are_refused():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ConfigError, match="flow step"):
        rf_ancestral_step(x, x, 14.6, 10.0)
    with pytest.raises(ConfigError, match="unknown flow step"):
        FlowSchedule(step="heun")


# --- the samplers on a flow schedule -------------------------------------------------------------

class _Brightness:
    name = "brightness"
    needs_prompt = False

    def score(self, images, prompts, timesteps):
        return images.mean(dim=(1, 2, 3))


def _decode(x0: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x0[:, :3].repeat_interleave(4, -1).repeat_interleave(4, -2))


def test_resampler_with_one_candidate_is_the_plain_rf_ancestral_sampler():
    schedule = FlowSchedule(3.0)
    sigmas = schedule.diffusers_sigmas(8)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    plain = sample_ancestral(_x0_model, _cond(2), x, sigmas, seed=3, schedule=schedule)
    one = resample(_x0_model, _cond(2), x, sigmas, schedule, None, None, None, ResamplerConfig(k=1), seed=3)
    torch.testing.assert_close(one.x, plain.x)
    g = torch.Generator().manual_seed(3)
    ref = x
    for i in range(8):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        mean, std = rf_ancestral_step(ref, _x0_model(ref, torch.full((2,), s), _cond(2)), s, s_next)
        ref = mean + std * torch.randn(ref.shape, generator=g) if std > 0 else mean
    torch.testing.assert_close(plain.x, ref)


def test_resampler_best_of_n_and_particles_steer_a_flow_model_towards_the_reward():
    schedule = FlowSchedule(3.0)
    sigmas = schedule.diffusers_sigmas(8)
    x = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    base = sample_ancestral(_x0_model, _cond(4), x, sigmas, seed=1, schedule=schedule)
    greedy = resample(_x0_model, _cond(4), x, sigmas, schedule, _Brightness(), _decode, None,
                      ResamplerConfig(k=4, window=(0, 1000)), seed=1)
    fk = resample(_x0_model, _cond(4), x, sigmas, schedule, _Brightness(), _decode, None,
                  ResamplerConfig(k=4, policy="fk", window=(0, 1000), score_every=1, lam=10.0), seed=1)
    starts = torch.cat([x, torch.randn(12, 4, 4, 4, generator=torch.Generator().manual_seed(9))])
    bon = best_of_n(_x0_model, _cond(4), starts, sigmas, schedule, _Brightness(), _decode, None, n=4, seed=1)
    reward = lambda r: float(_decode(r).mean())  # noqa: E731
    for steered in (greedy.x, fk.x, bon.x):
        assert reward(steered) > reward(base.x)
    assert [r.t for r in greedy.trace][:2] == [pytest.approx(1000.0), pytest.approx(float(sigmas[1]) * 1000)]
    # step-aware scorers are told the SD timestep of the same signal-to-noise ratio as the scored x0's sigma
    first = greedy.trace[0]
    assert first.t_scored == pytest.approx(float(schedule.scorer_timestep(float(sigmas[1]))), abs=1e-3)
    assert float(schedule.scorer_timestep(0.5)) == pytest.approx(354, abs=1)
    assert fk.evaluations == 4 * 4 * 8 and bon.evaluations == 4 * 4 * 8


def test_flow_schedule_refuses_discrete_sigmas_and_a_deterministic_pool():
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ConfigError, match="rectified-flow"):
        resample(_x0_model, _cond(1), x, torch.tensor([14.6, 1.0, 0.0]), FlowSchedule(), _Brightness(), _decode, None,
                 ResamplerConfig(k=2, window=(0, 1000)))
    with pytest.raises(ConfigError, match="deterministic"):
        resample(_x0_model, _cond(1), x, FlowSchedule().diffusers_sigmas(4), FlowSchedule(step="euler"), _Brightness(),
                 _decode, None, ResamplerConfig(k=2, window=(0, 1000)))


def test_cps_upstream_log_prob_is_the_gaussian_one_without_its_scale_and_constants():
    """Flow-CPS trains on -mean((x' - mean)^2): 2 std^2 (log N + log std + log sqrt(2 pi)) of the exact one."""
    g = torch.Generator().manual_seed(10)
    x, x0 = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    mean, std = cps_step(x, x0, 0.7, 0.5, noise_level=0.7)
    nxt = mean + std * torch.randn(x.shape, generator=g)
    exact = transition_log_prob(nxt, mean, std)
    expected = 2 * std ** 2 * (exact + math.log(std) + 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(cps_log_prob_upstream(nxt, mean), expected, rtol=1e-4, atol=1e-6)
