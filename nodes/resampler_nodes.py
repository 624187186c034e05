"""The per-step resampler and FK steering in ComfyUI: SAMPLERs for SamplerCustom /
SamplerCustomAdvanced, MODEL patches that make the stock KSampler use them, and the grid."""

from __future__ import annotations

from spo_core.errors import ConfigError
from spo_core.sampling import POTENTIALS, SPO_WINDOW, ResamplerConfig

from .comfy_sampling import ResamplerOptions, ResamplerTrace, sampler_sample_wrapper, spo_ksampler
from .scorer_nodes import SCORER_TYPE
from .spec import In, NodeSpec, Out, Result

TRACE_TYPE = "SPO_TRACE"
POLICIES = ["greedy", "softmax", "random"]
WRAPPER_KEY = "spo_resampler"


def _options_inputs() -> list[In]:
    return [
        In("scorer", SCORER_TYPE, "Scores the candidates (a step-aware scorer sees their timestep)."),
        In("vae", "VAE", "Decodes each candidate's predicted x0 for the scorer (a TAESD VAE is faster)."),
        In("prompt", "STRING", "The prompt text for the scorer (conditioning carries no text).", multiline=True, default=""),
        In("k", "INT", "Candidates drawn from the same x_t at each pooled step.", default=4, min=1, max=64, step=1),
        In("policy", "COMBO", "greedy = keep the best; softmax = sample by score (temperature); random = SPO's "
           "continuation.", options=POLICIES, default="greedy"),
        In("eta", "FLOAT", "Noise of each step (DDIM eta, or the RF ancestral eta on flow models; 1 = ancestral, as SPO). Must be > 0 when k > 1.",
           default=1.0, min=0.0, max=1.0, step=0.01),
        In("window_t_min", "INT", "Pools are drawn at steps whose timestep t is in [min, max] (DDPM t; 1000 x sigma "
           "on rectified-flow models).", default=int(SPO_WINDOW[0]), min=0, max=1000, step=1),
        In("window_t_max", "INT", "SPO trains t <= 750 (751 = its first trained step).", default=int(SPO_WINDOW[1]),
           min=0, max=1000, step=1),
        In("score_every", "INT", "Draw a pool at every n-th step inside the window.", default=1, min=1, max=100, step=1),
        In("temperature", "FLOAT", "softmax policy: lower = greedier.", default=1.0, min=0.01, max=100.0, step=0.01),
        In("lookahead_steps", "INT", "Denoise each candidate this many more steps before scoring it (SDXL SPO uses 3).",
           default=0, min=0, max=10, step=1),
    ]


def _options(scorer, vae, prompt: str, k: int, policy: str, eta: float, window_t_min: int, window_t_max: int,
             score_every: int, temperature: float, lookahead_steps: int) -> ResamplerOptions:
    config = ResamplerConfig(k=int(k), policy=policy, eta=float(eta), temperature=float(temperature),
                             window=(float(window_t_min), float(window_t_max)), score_every=int(score_every),
                             inner_steps=int(lookahead_steps), keep_images=True)
    # settings that are wrong whatever the schedule: say so now, not when the sampler runs
    if config.eta == 0 and config.k > 1:
        raise ConfigError("eta = 0 makes every step deterministic, so the k candidates would be identical; use eta > 0 or k = 1")
    if window_t_min > window_t_max:
        raise ConfigError(f"window_t_min ({window_t_min}) is above window_t_max ({window_t_max})")
    return ResamplerOptions(config=config, scorer=scorer, vae=vae, prompt=prompt or "", trace=ResamplerTrace())


def _fk_inputs() -> list[In]:
    return [
        In("scorer", SCORER_TYPE, "Rewards the particles (pixel scorers see each particle's decoded x0 prediction, "
           "latent scorers (lrm) its latents)."),
        In("vae", "VAE", "Decodes the particles' predicted x0 for a pixel scorer (a TAESD VAE is faster)."),
        In("prompt", "STRING", "The prompt text for the scorer (conditioning carries no text).", multiline=True, default=""),
        In("particles", "INT", "Particles per image: the population, sampled as one batch (N times the work of one "
           "image, as best-of-N).", default=4, min=2, max=64, step=1),
        In("potential", "COMBO", "How rewards weigh: max (the best reward so far), diff (its change), add (the sum), "
           "rt (the current one).", options=list(POTENTIALS), default="max"),
        In("lam", "FLOAT", "lambda: how strongly rewards weigh (higher = greedier).", default=10.0, min=0.001, max=1000.0,
           step=0.1),
        In("eta", "FLOAT", "Noise of each step (DDIM eta; 1 = ancestral). Must be > 0.", default=1.0, min=0.01, max=1.0,
           step=0.01),
        In("window_t_min", "INT", "Resample at steps whose timestep t is in [min, max] (DDPM t; 1000 x sigma on "
           "rectified-flow models), and always at the last step.", default=0, min=0, max=1000, step=1),
        In("window_t_max", "INT", "Upper end of the resampling window.", default=999, min=0, max=1000, step=1),
        In("resample_every", "INT", "Resample at every n-th step inside the window.", default=5, min=1, max=100, step=1),
        In("adaptive", "BOOLEAN", "Resample only when the effective sample size falls below half the particles.",
           default=False),
    ]


def _fk_options(scorer, vae, prompt: str, particles: int, potential: str, lam: float, eta: float, window_t_min: int,
                window_t_max: int, resample_every: int, adaptive: bool) -> ResamplerOptions:
    if window_t_min > window_t_max:
        raise ConfigError(f"window_t_min ({window_t_min}) is above window_t_max ({window_t_max})")
    config = ResamplerConfig(k=int(particles), policy="fk", eta=float(eta), window=(float(window_t_min), float(window_t_max)),
                             score_every=int(resample_every), potential=potential, lam=float(lam), adaptive=bool(adaptive),
                             keep_images=True)
    config.validate()
    return ResamplerOptions(config=config, scorer=scorer, vae=vae, prompt=prompt or "", trace=ResamplerTrace())


def fk_sampler(**kwargs) -> Result:
    options = _fk_options(**kwargs)
    return Result((spo_ksampler(options), options.trace))


def fk_model(model, **kwargs) -> Result:
    return _patched(model, _fk_options(**kwargs))


FK_SAMPLER = NodeSpec(
    "SPOFKSteeringSampler", "SPO FK Steering (particles)",
    "A SAMPLER for SamplerCustom / SamplerCustomAdvanced: Feynman-Kac steering. Each image is a population of "
    "particles sampled together; at resampling steps the scorer's rewards weigh them (through the potential), "
    "the population is resampled, and the best final particle is returned. Seeded by the sampler's noise seed.",
    inputs=_fk_inputs(),
    outputs=[Out("SAMPLER", "sampler"), Out(TRACE_TYPE, "trace", "The particles at each resampling; feed SPO Candidate Grid.")],
    run=fk_sampler,
)

FK_MODEL = NodeSpec(
    "SPOFKSteering", "SPO FK Steering (KSampler patch)",
    "Patch a MODEL so that the stock KSampler / KSamplerAdvanced sample each image with Feynman-Kac particle "
    "steering (its sampler choice is replaced; steps, scheduler, CFG, seed and denoise still apply).",
    inputs=[In("model", "MODEL", "The model the KSampler will use."), *_fk_inputs()],
    outputs=[Out("MODEL", "model"), Out(TRACE_TYPE, "trace", "The particles at each resampling; feed SPO Candidate Grid.")],
    run=fk_model,
)


def resampler_sampler(**kwargs) -> Result:
    options = _options(**kwargs)
    return Result((spo_ksampler(options), options.trace))


RESAMPLER = NodeSpec(
    "SPOPerStepResampler", "SPO Per-Step Resampler",
    "A SAMPLER for SamplerCustom / SamplerCustomAdvanced: at each step inside the window it draws k candidates "
    "from the same x_t (DDIM eta / Euler ancestral), decodes and scores their predicted x0, and continues from the "
    "chosen one. Seeded by the sampler's noise seed.",
    inputs=_options_inputs(),
    outputs=[Out("SAMPLER", "sampler"), Out(TRACE_TYPE, "trace", "What was chosen at each step; feed SPO Candidate Grid.")],
    run=resampler_sampler,
)


def resampling_model(model, **kwargs) -> Result:
    return _patched(model, _options(**kwargs))


def _patched(model, options: ResamplerOptions) -> Result:
    import comfy.patcher_extension

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY,
                                 sampler_sample_wrapper(options))
    extra = [p for p in (getattr(options.scorer, "patcher", None), getattr(options.vae, "patcher", None)) if p is not None]
    if extra:  # loaded (and offloaded) together with the UNet
        patched.set_additional_models(WRAPPER_KEY, extra)
    return Result((patched, options.trace))


RESAMPLING = NodeSpec(
    "SPOResampling", "SPO Resampling",
    "Patch a MODEL so that the stock KSampler / KSamplerAdvanced sample it with the SPO per-step resampler "
    "(its sampler choice is replaced; steps, scheduler, CFG, seed and denoise still apply; use the ddim_uniform "
    "scheduler for SPO's schedule).",
    inputs=[In("model", "MODEL", "The model the KSampler will use."), *_options_inputs()],
    outputs=[Out("MODEL", "model"), Out(TRACE_TYPE, "trace", "What was chosen at each step; feed SPO Candidate Grid.")],
    run=resampling_model,
)


def candidate_grid(trace: ResamplerTrace, samples: dict, cell_size: int = 96) -> Result:
    return Result((trace.grid_images(int(cell_size)),))


GRID = NodeSpec(
    "SPOCandidateGrid", "SPO Candidate Grid",
    "The candidates of every pooled step of the last run (one row per step, scores under them, the kept one "
    "outlined), or, after FK steering, the particles at each resampling (rewards, weights, copies, ESS); one grid "
    "per image of the batch. Connect the sampler's output latent so it runs after sampling.",
    inputs=[
        In("trace", TRACE_TYPE, "From SPO Per-Step Resampler or SPO Resampling."),
        In("samples", "LATENT", "The sampler's output (orders this node after the sampling run)."),
        In("cell_size", "INT", "Size of each candidate thumbnail.", default=96, min=32, max=256, step=8),
    ],
    outputs=[Out("IMAGE", "grid")],
    run=candidate_grid,
)

SPECS = [RESAMPLER, RESAMPLING, FK_SAMPLER, FK_MODEL, GRID]
