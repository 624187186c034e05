"""The diffusers host: a local SD1.5 / SD2 / SDXL model as a sigma-space denoiser, decoder,
prompt encoder and noise schedule (the reference host, used by the CLI, the app and tests).

The denoiser feeds the UNet `x / sqrt(1 + sigma^2)` (the VP latent) at the DDPM timestep of
sigma and returns x0 (eps: `x - sigma * eps`; v: `x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v`),
with classifier-free guidance on one batched [uncond, cond] call. With DDIM sigmas, plain
ancestral sampling here reproduces diffusers' DDIM(eta=1) pipeline exactly for the same seed.
Models load from local files only: a diffusers folder, or a single-file checkpoint with the
configs shipped in `spo_core/configs/` and a tokenizer built offline.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from ..clip_tokenizer import load_clip_tokenizer
from ..errors import ConfigError, ModelMismatchError, require
from ..safe_io import check_exists
from ..sampling.denoiser import TensorConditioning
from ..sampling.schedule import NoiseSchedule, vp_to_sigma_space

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class DiffusersDenoiser:
    """`denoise(x, sigma, cond) -> x0` for a diffusers UNet, CFG inside."""

    def __init__(self, backend: "DiffusersBackend", guidance_scale: float):
        self.backend = backend
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorConditioning) -> torch.Tensor:
        be = self.backend
        be.check_conditioning(cond)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        x_in = x / (1 + s * s).sqrt()
        t = be.schedule.timestep(sigma.detach().double().cpu()).to(device=x.device, dtype=torch.float32)
        use_cfg = self.guidance_scale != 1.0
        if use_cfg:
            out = be.unet_forward(torch.cat([x_in, x_in]), torch.cat([t, t]), cond, both=True)
            out_u, out_c = out.chunk(2)
            x0_u, x0_c = be.to_x0(x, s, out_u), be.to_x0(x, s, out_c)
            return x0_u + self.guidance_scale * (x0_c - x0_u)
        return be.to_x0(x, s, be.unet_forward(x_in, t, cond, both=False))


class DiffusersBackend:
    """A diffusers StableDiffusion(XL)Pipeline seen through the sigma-space contract."""

    def __init__(self, pipe, device: str | torch.device | None = None, dtype: torch.dtype | None = None, arch: str | None = None):
        self.pipe = pipe
        if device is not None or dtype is not None:
            pipe.to(device=device, dtype=dtype)
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        self.is_sdxl = getattr(self.unet.config, "addition_embed_type", None) == "text_time"
        self.arch = arch or self._guess_arch()
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction type {self.prediction_type!r} is not supported (epsilon or v_prediction)")
        self.schedule = NoiseSchedule(pipe.scheduler.alphas_cumprod)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        self.shift_factor = getattr(self.vae.config, "shift_factor", None) or 0.0
        self.latent_channels = int(self.unet.config.in_channels)
        self.default_size = int(self.unet.config.sample_size) * self.vae_scale_factor

    def _guess_arch(self) -> str:
        ctx = self.unet.config.cross_attention_dim
        full_size = self.unet.config.block_out_channels[0] == 320
        if self.is_sdxl:
            return "sdxl" if full_size and ctx == 2048 else "custom-sdxl"
        if full_size and ctx in (768, 1024):
            return "sd15" if ctx == 768 else "sd2"
        return "custom-sd1"

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, device=None, dtype=None, arch: str | None = None) -> "DiffusersBackend":
        return cls(pipe, device, dtype, arch)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, arch: str | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, vae=None) -> "DiffusersBackend":
        """A local diffusers folder or single-file checkpoint (.safetensors/.ckpt); never downloads.

        `vae`: another VAE to use (an AutoencoderKL, a diffusers VAE folder or a single VAE
        file), e.g. SDXL's fp16-fix VAE.
        """
        diffusers = require("diffusers", "the diffusers backend", "diffusers")
        p = check_exists(path, "model")
        extra = {}
        if vae is not None:
            extra["vae"] = _load_vae(diffusers, vae, dtype)
        if p.is_dir():
            index = p / "model_index.json"
            if not index.is_file():
                raise ConfigError(f"{p} is not a diffusers model folder (no model_index.json)")
            sdxl = "XL" in json.loads(index.read_text()).get("_class_name", "")
            kwargs = _tokenizer_kwargs(p, sdxl)
            pipe_cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
            if not sdxl:
                kwargs.update(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
            pipe = pipe_cls.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype, **kwargs, **extra)
        else:
            if arch is None:
                from ..lora.checkpoints import CheckpointReader

                with CheckpointReader(p) as reader:
                    arch = reader.arch
            config = None
            if isinstance(arch, (str, os.PathLike)) and Path(arch).is_dir():  # a config folder for custom models
                config = Path(arch)
                arch = "custom-sdxl" if "XL" in json.loads((config / "model_index.json").read_text()).get("_class_name", "") else "custom-sd1"
            elif arch not in ("sd15", "sd2", "sdxl"):
                raise ConfigError(f"unknown architecture {arch!r} for a single-file checkpoint; use sd15, sd2 or sdxl")
            sdxl = arch in ("sdxl", "custom-sdxl")
            kwargs = {"tokenizer": load_clip_tokenizer()}
            if sdxl:
                kwargs["tokenizer_2"] = load_clip_tokenizer(pad_token="!")
            else:
                kwargs.update(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
            pipe_cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
            pipe = pipe_cls.from_single_file(str(p), config=str(config or CONFIG_DIR / arch), local_files_only=True,
                                             torch_dtype=dtype, **kwargs, **extra)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, device=device, arch=arch)

    # -- conditioning ---------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str] | str, negative_prompt: str | Sequence[str] | None = None,
                       height: int | None = None, width: int | None = None) -> TensorConditioning:
        """Text embeddings for CFG: cond and uncond rows (SDXL: pooled embeds and time ids too)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ConfigError("the prompt list is empty")
        if negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) != len(prompts):
            raise ConfigError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
        with torch.no_grad():
            if self.is_sdxl:
                cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
                    prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                    negative_prompt=negative_prompt)
                h = height or self.default_size
                w = width or self.default_size
                time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond.dtype, device=self.device).repeat(len(prompts), 1)
                tensors = {"cond": cond, "uncond": uncond, "pooled": pooled, "uncond_pooled": uncond_pooled,
                           "time_ids": time_ids}
            else:
                cond, uncond = self.pipe.encode_prompt(prompts, self.device, 1, True, negative_prompt=negative_prompt)
                tensors = {"cond": cond, "uncond": uncond}
        return TensorConditioning(tensors, {"arch": self.arch})

    def check_conditioning(self, cond: TensorConditioning) -> None:
        tensors = getattr(cond, "tensors", None)
        if tensors is None or "cond" not in tensors:
            raise ModelMismatchError("conditioning for the diffusers backend must come from its encode_prompts()")
        ctx = tensors["cond"].shape[-1]
        want = self.unet.config.cross_attention_dim
        if self.is_sdxl and "pooled" not in tensors:
            raise ModelMismatchError(
                "this is an SDXL model but the conditioning has no pooled text embeddings or time ids "
                "(it was encoded for SD1.5/SD2); encode the prompts with this model's text encoders")
        if ctx != want:
            raise ModelMismatchError(f"conditioning has {ctx}-dim text embeddings but this {self.arch} UNet expects {want}; "
                                     "the prompts were encoded by another model's text encoder")

    def unet_forward(self, x_vp: torch.Tensor, t: torch.Tensor, cond: TensorConditioning, both: bool) -> torch.Tensor:
        """UNet output for [uncond; cond] (both=True) or cond rows."""
        tensors = cond.tensors
        ctx = torch.cat([tensors["uncond"], tensors["cond"]]) if both else tensors["cond"]
        kwargs = {}
        if self.is_sdxl:
            pooled = torch.cat([tensors["uncond_pooled"], tensors["pooled"]]) if both else tensors["pooled"]
            time_ids = torch.cat([tensors["time_ids"], tensors["time_ids"]]) if both else tensors["time_ids"]
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype)}
        out = self.unet(x_vp.to(self.dtype), t, encoder_hidden_states=ctx.to(self.dtype), return_dict=False, **kwargs)[0]
        return out.to(x_vp.dtype)

    def to_x0(self, x: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return x - s * out
        return x / (1 + s * s) - s / (1 + s * s).sqrt() * out

    def denoiser(self, guidance_scale: float = 5.0) -> DiffusersDenoiser:
        return DiffusersDenoiser(self, guidance_scale)

    # -- latents <-> images -----------------------------------------------------------------
    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.default_size, width or self.default_size
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ConfigError(f"height and width must be multiples of {self.vae_scale_factor}, got {h}x{w}")
        return (batch, self.latent_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)

    def initial_noise(self, batch: int, height: int | None = None, width: int | None = None, sigma: float | None = None,
                      generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """x_T in sigma space: standard normal noise (drawn on the CPU like diffusers' pipeline) times sqrt(1 + sigma^2)."""
        g = generator or torch.Generator().manual_seed(0 if seed is None else int(seed))
        noise = torch.randn(self.latent_shape(batch, height, width), generator=g, dtype=torch.float32)
        sigma = self.schedule.sigma_max if sigma is None else sigma
        return vp_to_sigma_space(noise, sigma).to(self.device)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents (model space) -> images [N,3,H,W] in [0,1], float32."""
        z = x0.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def decode_with_grad(self, x0: torch.Tensor) -> torch.Tensor:
        z = x0.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return (self.vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [N,3,H,W] in [0,1] -> model-space latents (the VAE posterior mean, or a sample)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"images must be [N,3,H,W], got {tuple(images.shape)}")
        dist = self.vae.encode((images.to(self.device, self.vae.dtype) * 2 - 1), return_dict=False)[0]
        z = dist.sample(generator) if sample else dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).float()

    # -- convenience ------------------------------------------------------------------------
    def module_table(self):
        """The LoRA engine's table of this model (real SD tables for real models)."""
        from ..lora.tables import load_table, table_for_pipeline

        if self.arch in ("sd15", "sd2", "sdxl"):
            return load_table(self.arch)
        return table_for_pipeline(self.pipe, arch=self.arch)


def _load_vae(diffusers, vae, dtype):
    if isinstance(vae, torch.nn.Module):
        return vae
    p = check_exists(vae, "VAE")
    if p.is_dir():
        return diffusers.AutoencoderKL.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype)
    return diffusers.AutoencoderKL.from_single_file(str(p), local_files_only=True, torch_dtype=dtype,
                                                    config=str(CONFIG_DIR / "sd15" / "vae"))


def _tokenizer_kwargs(folder: Path, sdxl: bool) -> dict:
    """Tokenizers missing from a folder are built offline instead of fetched."""
    kwargs = {}
    if not (folder / "tokenizer").is_dir():
        kwargs["tokenizer"] = load_clip_tokenizer()
    if sdxl and not (folder / "tokenizer_2").is_dir():
        kwargs["tokenizer_2"] = load_clip_tokenizer(pad_token="!")
    return kwargs
