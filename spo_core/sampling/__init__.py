"""Sampling in sigma space: schedules, the DDIM(eta)/ancestral step and its log-probability,
plain sampling, the per-step resampler, best-of-N, cheap decoders and the trace grid."""

from .approx_decode import LatentRGBDecoder
from .best_of_n import best_of_n
from .denoiser import Conditioning, CountingDenoiser, Decoder, Denoiser, TensorConditioning, call_denoiser, repeat_cond
from .resampler import (FK_WINDOW, POLICIES, SPO_THRESHOLDS, SPO_WINDOW, ResampleResult, ResamplerConfig, StepRecord,
                        TransitionPair, default_window, resample, window_hi_after_policy_change)
from .samplers import SampleResult, StepInfo, Transition, sample_ancestral
from .schedule import (NoiseSchedule, alpha_bar_from_sigma, check_sigmas, sigma_from_alpha_bar, sigma_space_to_vp,
                       vp_to_sigma_space)
from .step import ancestral_mean, ancestral_sigmas, ancestral_step, transition_log_prob
from .particles import POTENTIALS, fk_sample
from .trace import render_grid, render_particle_grid, render_trace_grid

__all__ = [
    "Conditioning", "CountingDenoiser", "Decoder", "Denoiser", "LatentRGBDecoder", "NoiseSchedule", "POLICIES",
    "ResampleResult", "ResamplerConfig", "SPO_THRESHOLDS", "SPO_WINDOW", "FK_WINDOW", "default_window",
    "window_hi_after_policy_change", "SampleResult", "StepInfo", "StepRecord", "TensorConditioning",
    "Transition", "TransitionPair", "alpha_bar_from_sigma", "ancestral_mean", "ancestral_sigmas", "ancestral_step",
    "best_of_n", "call_denoiser", "POTENTIALS", "fk_sample", "render_grid", "render_particle_grid", "check_sigmas", "render_trace_grid", "repeat_cond", "resample", "sample_ancestral",
    "sigma_from_alpha_bar", "sigma_space_to_vp", "transition_log_prob", "vp_to_sigma_space",
]
