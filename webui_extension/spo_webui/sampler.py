"""The SPO sampler in the WebUI's sampler list: the per-step resampler of spo_core on the
WebUI's own CFG denoiser.

The WebUI calls a k-diffusion-style function `f(model, x, sigmas, extra_args, callback,
disable, eta)`, where `model(x, sigma, **extra_args)` is its CFG denoiser
(`CFGDenoiserKDiffusion`, with `model.p` the processing object) returning the guided x0 for
exactly the B rows of the batch (its conditioning is built per image, so more rows cannot go
through in one call). The adapter below is the sigma-space `Denoiser` of spo_core: a pool of
k*B candidate rows (k-major) is evaluated as k calls of B rows, each with the denoiser's step
counter set to the sampling step so prompt editing follows the schedule. The same code runs on
A1111 and Forge (whose denoiser takes the same B rows, webui.md 3.2/7.1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from spo_core.errors import ConfigError
from spo_core.sampling import NoiseSchedule, ResamplerConfig, resample

from .options import SPOOptions, options_from_p

log = logging.getLogger(__name__)

SAMPLER_NAME = "SPO Euler a (k candidates)"
SAMPLER_ALIASES = ["spo", "spo_euler_a", "k_spo"]


@dataclass
class BatchRows:
    """Conditioning rows of the WebUI batch: the WebUI keeps the real conditioning inside its
    denoiser; spo_core only needs to select rows, and only ever asks for whole k-major copies."""

    batch: int
    index: torch.Tensor

    @classmethod
    def of(cls, batch: int) -> "BatchRows":
        return cls(batch, torch.arange(batch))

    @property
    def batch_size(self) -> int:
        return int(self.index.numel())

    def take(self, index: torch.Tensor) -> "BatchRows":
        return BatchRows(self.batch, self.index[torch.as_tensor(index, dtype=torch.long)])


class WebUIDenoiser:
    """spo_core's Denoiser over the WebUI's CFG denoiser `model(x, sigma, **extra_args) -> x0`."""

    def __init__(self, model: Callable[..., torch.Tensor], extra_args: dict, sigmas: torch.Tensor):
        self.model = model
        self.extra_args = extra_args or {}
        self.sigmas = sigmas.detach().float().cpu()
        self.calls = 0

    def step_of(self, sigma: float) -> int:
        return int((self.sigmas[:-1] - float(sigma)).abs().argmin())

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: BatchRows) -> torch.Tensor:
        b = cond.batch
        n = x.shape[0]
        if n % b:
            raise ConfigError(f"{n} rows is not a whole number of copies of the batch of {b}")
        want = torch.arange(b)
        outs = []
        for start in range(0, n, b):
            if not torch.equal(cond.index[start:start + b].cpu(), want):
                raise ConfigError("the WebUI denoiser can only evaluate whole copies of the batch (k-major rows)")
            if hasattr(self.model, "step"):
                self.model.step = self.step_of(float(sigma[start]))
            outs.append(self.model(x[start:start + b], sigma[start:start + b], **self.extra_args))
            self.calls += 1
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def schedule_of(model: Any):
    """The model's noise levels: a FlowSchedule for Forge's rectified-flow predictors (Flux: its mu;
    prediction type 'const'), whose step is the RF ancestral step Forge's Euler a runs on Flux;
    else the 1000 training levels, `inner_model.sigmas` on A1111 (k-diffusion CompVisDenoiser) and
    Forge (ForgeScheduleLinker), SD's scaled-linear schedule without them."""
    inner = getattr(model, "inner_model", None)
    predictor = getattr(inner, "predictor", None)
    if getattr(predictor, "prediction_type", None) == "const":
        from spo_core.sampling.flow import FlowSchedule

        mu = getattr(predictor, "mu", None)
        if mu is not None:
            return FlowSchedule(mu=float(mu), num_train_timesteps=1000)
        return FlowSchedule(shift=float(getattr(predictor, "shift", 1.0)))
    sigmas = getattr(inner, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() >= 2:
        s = sigmas.detach().double().cpu()
        return NoiseSchedule(1 / (1 + s * s))
    return NoiseSchedule.scaled_linear()


def batch_seed(seeds: Sequence[int], salt: int = 0) -> int:
    """One 63-bit seed from the image seeds of the batch (the same seeds give the same candidates)."""
    h = 0x53504F + salt
    for s in seeds:
        h = (h * 6364136223846793005 + int(s) + 1442695040888963407) % (1 << 64)
    return h % (1 << 63)


def webui_decoder(sd_model: Any, chunk: int = 4) -> Callable[[torch.Tensor], torch.Tensor]:
    """x0 latents -> images in [0,1] with the WebUI's full VAE decode (both A1111 and Forge)."""
    from modules import sd_samplers_common

    def decode(x0: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for part in x0.split(chunk):
                images = sd_samplers_common.samples_to_images_tensor(part, approximation=0, model=sd_model)
                out.append(((images.float() + 1) / 2).clamp(0, 1))
        return torch.cat(out)

    return decode


def record_infotext(p: Any, options: SPOOptions, result: Any) -> None:
    params = getattr(p, "extra_generation_params", None)
    if params is None:
        return
    params.update(options.infotext())
    if options.policy == "fk" and result.particle_stats is not None:
        params["SPO resamplings"] = sum(int(e.resampled.sum()) for e in result.particle_stats.events)
    else:
        params["SPO pooled steps"] = result.pooled_steps


def load_scorer(options: SPOOptions, device: torch.device) -> Any:
    from spo_core.ui.actions import SCORERS

    path = options.weights_path()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return SCORERS.get(options.scorer, str(path) if path else None, device=device, dtype=dtype)


def check_scorer_fits(scorer: Any, sd_model: Any) -> None:
    """A latent reward model must be made for the loaded checkpoint's architecture (refused naming both)."""
    from spo_core.scorers.lrm import check_latent_scorer_fits

    from .host import model_arch_of

    arch = model_arch_of(sd_model)
    dims = {"sd15": 768, "sd2": 1024, "sdxl": 2048}
    check_latent_scorer_fits(scorer, "sdxl" if arch == "sdxl" else "sd1", dims.get(arch), f"the loaded checkpoint ({arch})")


def check_flow_scorer(scorer: Any) -> None:
    """Latent reward models read SD UNet latents: refused on rectified-flow models (Flux)."""
    from spo_core.sampling.resampler import is_latent_scorer

    if is_latent_scorer(scorer):
        raise ConfigError(f"the latent reward model {getattr(scorer, 'name', 'lrm')!r} reads SD1.5/SDXL UNet latents; "
                          "the loaded model is a rectified-flow model (Flux): choose a pixel scorer")


def host_noise(p: Any) -> Callable[[], torch.Tensor] | None:
    """The WebUI's own per-step noise (`p.rng.next()`, what Euler a draws through its TorchHijack),
    so that k = 1 is the stock Euler a image for image, and the first candidate follows the seeds."""
    rng = getattr(p, "rng", None)
    return rng.next if rng is not None and hasattr(rng, "next") else None


def sample_spo(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0):
    """The sampler function the WebUI calls (see the module docstring)."""
    p = getattr(model, "p", None)
    options = options_from_p(p)
    config = ResamplerConfig(k=options.k, policy=options.policy, eta=float(eta if eta is not None else 1.0),
                             window=(options.window_lo, options.window_hi), score_every=options.score_every,
                             potential=options.potential, lam=options.lam, adaptive=options.adaptive)
    batch = x.shape[0]
    denoiser = WebUIDenoiser(model, extra_args, sigmas)
    schedule = schedule_of(model)
    prompts = list(getattr(p, "prompts", None) or [""] * batch)
    if len(prompts) != batch:
        prompts = (prompts * batch)[:batch]
    seeds = list(getattr(p, "seeds", None) or getattr(p, "all_seeds", None) or [0])[:batch]
    generator = torch.Generator().manual_seed(batch_seed(seeds, salt=1 if getattr(p, "is_hr_pass", False) else 0))
    scorer = None
    decode = None
    if options.k > 1:
        from modules import devices, shared

        scorer = load_scorer(options, torch.device(devices.device))
        sd_model = getattr(p, "sd_model", None) or shared.sd_model
        if getattr(schedule, "is_flow", False):
            check_flow_scorer(scorer)
        else:
            check_scorer_fits(scorer, sd_model)
        decode = webui_decoder(sd_model)

    def step_callback(info):
        if callback is not None:
            callback({"x": info.x, "i": info.i, "sigma": info.sigma, "sigma_hat": info.sigma, "denoised": info.x0})

    result = resample(denoiser, BatchRows.of(batch), x, sigmas, schedule, scorer, decode, prompts, config,
                      generator=generator, callback=step_callback, host_noise=host_noise(p))
    if p is not None:
        record_infotext(p, options, result)
    return result.x


def register_sampler() -> bool:
    """Add the SPO sampler to the WebUI's sampler list (idempotent; must run before the UI is built)."""
    from modules import sd_samplers, sd_samplers_common, sd_samplers_kdiffusion

    if SAMPLER_NAME in sd_samplers.all_samplers_map:
        return False

    def constructor(model):
        return sd_samplers_kdiffusion.KDiffusionSampler(sample_spo, model)

    data = sd_samplers_common.SamplerData(SAMPLER_NAME, constructor, SAMPLER_ALIASES, {})
    if hasattr(sd_samplers, "add_sampler"):  # Forge
        sd_samplers.add_sampler(data)
    else:
        sd_samplers.all_samplers.append(data)
        sd_samplers.all_samplers_map[SAMPLER_NAME] = data
        sd_samplers.set_samplers()
    log.info("registered sampler %r", SAMPLER_NAME)
    return True
