"""Sigma-space step math against diffusers' DDIMScheduler and SPO's VP-space log-probability."""

import math

import pytest
import torch

from spo_core.sampling import (NoiseSchedule, ancestral_mean, ancestral_sigmas, ancestral_step, sigma_space_to_vp,
                               transition_log_prob, vp_to_sigma_space)
from spo_core.testing import ddim_scheduler


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.scaled_linear()


def test_schedule_matches_diffusers_timesteps_and_alphas(sched):
    ddim = ddim_scheduler()
    torch.testing.assert_close(sched.alphas_cumprod.float(), ddim.alphas_cumprod.float())
    ddim.set_timesteps(20)
    assert sched.ddim_timesteps(20) == ddim.timesteps.tolist() == list(range(951, 0, -50))
    sig = sched.spo_sigmas()
    assert len(sig) == 21
    assert [int(sched.timestep(s)) for s in sig[:-1]] == list(range(951, 0, -50))
    assert abs(float(sig[-1]) - math.sqrt((1 - 0.99915) / 0.99915)) < 1e-4  # sigma(t=0), alphas_cumprod[0] = 1 - 0.00085
    for t in (0, 1, 250.5, 751, 999):
        assert abs(float(sched.timestep(sched.sigma(t))) - t) < 1e-6


def test_ancestral_sigmas_are_ddim_eta(sched):
    for t, t_prev in ((951, 901), (751, 701), (51, 1)):
        ab_t, ab_p = sched.alphas_cumprod[t], sched.alphas_cumprod[t_prev]
        for eta in (1.0, 0.5):
            std = eta * ((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)).sqrt()  # DDIM sigma_t
            down, up = ancestral_sigmas(sched.sigmas[t], sched.sigmas[t_prev], eta)
            assert abs(float(up) - float(std / ab_p.sqrt())) < 1e-10
            assert abs(float(down ** 2 + up ** 2) - float(sched.sigmas[t_prev] ** 2)) < 1e-10


@pytest.mark.parametrize("t,t_prev", [(951, 901), (751, 701), (401, 351), (1, 0)])
def test_step_equals_diffusers_ddim_eta1_step(sched, t, t_prev):
    """Same x_t, eps and noise: diffusers' DDIMScheduler(eta=1).step() and our sigma-space step agree."""
    ddim = ddim_scheduler()
    ddim.set_timesteps(20)
    g = torch.Generator().manual_seed(t)
    x_vp = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    if t == 1:  # the last step of 20 goes to the final alpha (alphas_cumprod[0] with set_alpha_to_one=False)
        ref = ddim.step(eps, 1, x_vp, eta=1.0, variance_noise=z).prev_sample
    else:
        ddim.num_inference_steps = 1000 // (t - t_prev)
        ref = ddim.step(eps, t, x_vp, eta=1.0, variance_noise=z).prev_sample
    s, s_prev = sched.sigmas[t], sched.sigmas[t_prev]
    x = vp_to_sigma_space(x_vp, s)
    x0 = x - s * eps
    ours = sigma_space_to_vp(ancestral_step(x, x0, s, s_prev, 1.0, z), s_prev)
    assert float((ours - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def _spo_logprob_vp(x_prev_vp, x_vp, eps, ab_t, ab_p, eta=1.0):
    """SPO's ddim_with_logprob (spo-method.md §1.4), re-derived: VP space, mean over (C,H,W)."""
    x0 = (x_vp - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    var = eta ** 2 * (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
    std = var.sqrt()
    mu = ab_p.sqrt() * x0 + (1 - ab_p - var).sqrt() * eps
    lp = -((x_prev_vp - mu) ** 2) / (2 * var) - std.log() - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("t,t_prev", [(751, 701), (301, 251), (51, 1)])
def test_log_prob_ratio_equals_spo_vp_formula(sched, t, t_prev):
    g = torch.Generator().manual_seed(t)
    ab_t, ab_p = sched.alphas_cumprod[t], sched.alphas_cumprod[t_prev]
    x_vp = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps_theta = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps_ref = eps_theta + 0.05 * torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    x_prev_vp = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) * 0.3 + ab_p.sqrt() * x_vp
    ratio_vp = _spo_logprob_vp(x_prev_vp, x_vp, eps_theta, ab_t, ab_p) - _spo_logprob_vp(x_prev_vp, x_vp, eps_ref, ab_t, ab_p)

    s, s_prev = sched.sigmas[t], sched.sigmas[t_prev]
    x = vp_to_sigma_space(x_vp, s)
    x_prev = vp_to_sigma_space(x_prev_vp, s_prev)
    down, up = ancestral_sigmas(s, s_prev, 1.0)
    lp = {}
    for name, eps in (("theta", eps_theta), ("ref", eps_ref)):
        mean = ancestral_mean(x, x - s * eps, s, down)
        lp[name] = transition_log_prob(x_prev, mean, up)
    ratio_sigma = lp["theta"] - lp["ref"]
    torch.testing.assert_close(ratio_sigma, ratio_vp, atol=1e-5, rtol=1e-5)
    # the absolute log-probs differ exactly by the constant log sqrt(abar_prev) per element (the Jacobian of the scaling)
    vp_theta = _spo_logprob_vp(x_prev_vp, x_vp, eps_theta, ab_t, ab_p)
    torch.testing.assert_close(lp["theta"] - vp_theta, torch.full_like(vp_theta, float(0.5 * torch.log(ab_p))), atol=1e-8, rtol=1e-8)


def test_log_prob_sum_is_mean_times_elements(sched):
    x = torch.randn(2, 4, 4, 4)
    mean = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(transition_log_prob(x, mean, 0.5, "sum"), transition_log_prob(x, mean, 0.5, "mean") * 64)


def test_eta_zero_step_is_deterministic(sched):
    x = torch.randn(1, 4, 4, 4)
    x0 = torch.randn(1, 4, 4, 4)
    down, up = ancestral_sigmas(2.0, 1.0, 0.0)
    assert float(up) == 0 and float(down) == 1.0
    torch.testing.assert_close(ancestral_step(x, x0, 2.0, 1.0, 0.0, torch.randn(1, 4, 4, 4)), x0 + (x - x0) / 2)
