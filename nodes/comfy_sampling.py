"""ComfyUI's sampler internals seen through spo_core's sampling contract.

Inside a ComfyUI sampler function, `model(x, sigma, **extra_args)` already is a sigma-space
denoiser returning the CFG-combined x0 (conditioning, negative prompt, CFG scale and
prediction type are the guider's), and ComfyUI broadcasts conditioning cyclically over any
batch: exactly spo_core's k-major candidate layout. So the adapter only checks that the rows
asked for are that cyclic layout, turns the resampler's per-step record into ComfyUI's
callback (progress bar, live preview, SamplerCustom's denoised output), decodes with the
VAE, and draws its noise from `extra_args["seed"]` with ComfyUI's own noise sampler (candidate 0 and
every unpooled step get exactly the noise the stock euler_ancestral would draw).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from spo_core.errors import ConfigError, ModelMismatchError
from spo_core.sampling import NoiseSchedule, ResamplerConfig, resample
from spo_core.sampling.flow import FlowSchedule

log = logging.getLogger(__name__)


class RowConditioning:
    """spo_core's Conditioning over the conds ComfyUI's guider already holds: only row indices."""

    def __init__(self, batch: int, index: torch.Tensor | None = None):
        self.batch = batch
        self.index = torch.arange(batch) if index is None else index

    @property
    def batch_size(self) -> int:
        return int(self.index.numel())

    def take(self, index: torch.Tensor) -> "RowConditioning":
        return RowConditioning(self.batch, self.index[torch.as_tensor(index, dtype=torch.long).cpu()])

    def is_cyclic(self) -> bool:
        n = self.index.numel()
        return torch.equal(self.index, torch.arange(n) % self.batch)


class ComfyDenoiser:
    """`denoise(x, sigma, cond) -> x0` over ComfyUI's model (a KSamplerX0Inpaint around the guider)."""

    def __init__(self, model, extra_args: dict):
        self.model = model
        self.extra_args = extra_args

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: RowConditioning) -> torch.Tensor:
        if not cond.is_cyclic():
            raise ConfigError("ComfyUI conditioning can only be broadcast cyclically over candidate rows")
        return self.model(x, sigma.to(x.device, x.dtype), **self.extra_args)


def base_model_of(model):
    """The BaseModel behind a sampler function's `model` (KSamplerX0Inpaint -> guider -> BaseModel)."""
    inner = getattr(model, "inner_model", model)
    return getattr(inner, "inner_model", inner)


def is_flow_model(base_model) -> bool:
    """Rectified-flow models (SD3, Flux, and any model patched by ModelSamplingSD3/Flux) sample with CONST."""
    return "CONST" in [c.__name__ for c in type(base_model.model_sampling).__mro__]


def noise_schedule(base_model):
    """The model's noise levels as a spo_core schedule: a FlowSchedule for CONST (rectified-flow) models,
    whose stochastic step is ComfyUI's own RF ancestral step, else the 1000 discrete training levels."""
    ms = base_model.model_sampling
    if is_flow_model(base_model):
        if "ModelSamplingFlux" in [c.__name__ for c in type(ms).__mro__]:
            return FlowSchedule(mu=float(ms.shift))
        return FlowSchedule(shift=float(getattr(ms, "shift", 1.0)))
    if not hasattr(ms, "sigmas"):
        raise ModelMismatchError(
            f"the per-step resampler works with discrete eps/v models (SD1.5/SD2/SDXL) and rectified-flow models "
            f"(SD3, Flux); this model samples with {type(ms).__name__}"
        )
    sigmas = ms.sigmas.detach().double().cpu()
    return NoiseSchedule(1.0 / (1.0 + sigmas * sigmas))


def check_scorer_fits(scorer, base_model) -> None:
    """A latent reward model must be made for this model's architecture (refused naming both)."""
    from spo_core.sampling.resampler import is_latent_scorer
    from spo_core.scorers.lrm import check_latent_scorer_fits

    if is_flow_model(base_model) and is_latent_scorer(scorer):
        raise ModelMismatchError(f"the latent reward model {getattr(scorer, 'name', 'lrm')!r} reads SD1.5/SDXL UNet "
                                 f"latents; this is a rectified-flow model ({type(base_model).__name__}): use a pixel "
                                 "scorer (SPM, PickScore, HPSv2, aesthetic, CLIP, JPEG)")
    unet = getattr(getattr(base_model, "model_config", None), "unet_config", None) or {}
    family = "sdxl" if unet.get("adm_in_channels") else "sd1"
    check_latent_scorer_fits(scorer, family, unet.get("context_dim"), f"the model ({type(base_model).__name__})")


def vae_decoder(vae, base_model):
    """x0 latents in the model's space -> images [N,3,H,W] in [0,1], through the VAE node input."""
    def decode(x0: torch.Tensor) -> torch.Tensor:
        images = vae.decode(base_model.process_latent_out(x0.float()))
        if images.ndim == 5:  # video VAEs return [B, T, H, W, C]
            images = images.reshape(-1, *images.shape[-3:])
        return images[..., :3].movedim(-1, 1).float().clamp(0, 1)

    return decode


@dataclass
class ResamplerTrace:
    """What the resampler did in its last run (filled while sampling, read by the grid node)."""

    result: object = None
    prompt: str = ""
    runs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def store(self, result, prompt: str) -> None:
        with self.lock:
            self.result, self.prompt = result, prompt
            self.runs += 1

    def grid_images(self, cell: int = 96) -> torch.Tensor:
        """One grid per batch row (pooled steps down, candidates across, the kept one outlined) as an IMAGE."""
        from spo_core.sampling.trace import render_grid

        from .host import pil_to_image

        with self.lock:
            result = self.result
        if result is None or not any(r.pooled and r.images is not None for r in result.trace):
            raise ConfigError("no candidate pools were recorded: run the sampler with k > 1 and a step window that "
                              "contains some of its steps before making the grid")
        batch = next(r.images.shape[1] for r in result.trace if r.pooled and r.images is not None)
        grids = [pil_to_image(render_grid(result, b, cell=cell, title=(self.prompt or None))) for b in range(batch)]
        return torch.cat(grids, dim=0)


@dataclass
class ResamplerOptions:
    """Everything the SPO sampler function needs besides what ComfyUI passes it."""

    config: ResamplerConfig
    scorer: object
    vae: object
    prompt: str
    trace: ResamplerTrace = field(default_factory=ResamplerTrace)


def sample_spo(model, x, sigmas, extra_args=None, callback=None, disable=None, spo: ResamplerOptions | None = None):
    """A ComfyUI sampler function (KSAMPLER) running spo_core's per-step resampler."""
    extra_args = {} if extra_args is None else extra_args
    if spo is None:
        raise ConfigError("the SPO sampler was called without its options")
    if extra_args.get("denoise_mask") is not None and x.shape[0] > 1 and spo.config.k > 1:
        raise ConfigError(
            f"inpainting with a noise mask works with batch size 1 only in the SPO resampler (this batch has "
            f"{x.shape[0]} latents): ComfyUI blends every candidate with the batch's own latent. Use batch size 1 "
            "or remove the mask."
        )
    base = base_model_of(model)
    schedule = noise_schedule(base)
    check_scorer_fits(spo.scorer, base)
    prompt = spo.prompt.strip()
    if getattr(spo.scorer, "needs_prompt", False) and not prompt and spo.config.k > 1:
        raise ConfigError(f"scorer {spo.scorer.name!r} compares candidates with the prompt: enter the prompt text "
                          "in the SPO resampler node")

    from tqdm.auto import tqdm

    console = tqdm(total=len(sigmas) - 1, disable=disable)  # the server console's bar, as the stock samplers draw

    def step_callback(info):
        console.update(info.i + 1 - console.n)
        if callback is not None:
            callback({"x": info.x, "i": info.i, "sigma": info.sigma, "sigma_hat": info.sigma, "denoised": info.x0})

    config = spo.config
    if not config.keep_images:
        config = ResamplerConfig(**{**config.__dict__, "keep_images": True})
    result = resample(
        ComfyDenoiser(model, extra_args), RowConditioning(x.shape[0]), x, sigmas, schedule, spo.scorer,
        vae_decoder(spo.vae, base), prompt or None, config, seed=int(extra_args.get("seed") or 0),
        callback=step_callback, host_noise=comfy_noise(x, extra_args.get("seed")),
    )
    console.close()
    spo.trace.store(result, prompt)
    return result.x


def comfy_noise(x: torch.Tensor, seed):
    """ComfyUI's own ancestral noise (`default_noise_sampler(x, seed)`, as euler_ancestral draws it),
    so that k = 1 is the stock sampler image for image."""
    from comfy.k_diffusion.sampling import default_noise_sampler

    sampler = default_noise_sampler(x, seed=seed)
    return lambda: sampler(None, None)


def spo_ksampler(options: ResamplerOptions):
    """The SAMPLER socket value (for SamplerCustom / SamplerCustomAdvanced)."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_spo, extra_options={"spo": options})


def sampler_sample_wrapper(options: ResamplerOptions):
    """A SAMPLER_SAMPLE wrapper that makes the stock KSampler / KSamplerAdvanced use the resampler."""

    def wrapper(executor, guider, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                disable_pbar=False):
        return spo_ksampler(options).sample(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                            disable_pbar)

    return wrapper
