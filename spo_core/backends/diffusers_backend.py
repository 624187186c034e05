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

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..clip_tokenizer import load_clip_tokenizer
from ..errors import ConfigError, ModelMismatchError, require
from ..safe_io import check_exists
from ..sampling.approx_decode import LatentRGBDecoder
from ..sampling.denoiser import TensorConditioning
from ..sampling.schedule import NoiseSchedule, sigma_space_to_vp, vp_to_sigma_space

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
        self.offloaded: set[str] = set()

    # -- memory -------------------------------------------------------------------------------
    def offload(self, parts: str | Sequence[str] = ("text_encoders",)) -> None:
        """Keep the text encoders ("text_encoders") and/or the VAE ("vae") on the CPU, moving each to the
        device only while it runs: less GPU memory for training and sampling, at the cost of a transfer
        per use (the text encoders run once per sampling round, the VAE once per decode)."""
        parts = {parts} if isinstance(parts, str) else set(parts)
        unknown = parts - {"text_encoders", "vae"}
        if unknown:
            raise ConfigError(f"cannot offload {', '.join(sorted(unknown))}; choose text_encoders and/or vae")
        self.offloaded = parts
        if self.device.type != "cpu":
            for module in self._offload_modules():
                module.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _offload_modules(self, which: str | None = None) -> list[torch.nn.Module]:
        out = []
        if "text_encoders" in self.offloaded and which in (None, "text_encoders"):
            out += [m for m in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None)) if m]
        if "vae" in self.offloaded and which in (None, "vae"):
            out.append(self.vae)
        return out

    @contextlib.contextmanager
    def resident(self, which: str):
        """An offloaded part on the device for the length of the block, back on the CPU after it."""
        modules = self._offload_modules(which) if self.device.type != "cpu" else []
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")

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
                        dtype: torch.dtype = torch.float32, vae=None, loading_bars: bool = False) -> "DiffusersBackend":
        """A local diffusers folder or single-file checkpoint (.safetensors/.ckpt); never downloads.

        `loading_bars`: show diffusers'/transformers' per-component loading bars (the CLI does, for
        multi-GB checkpoints; UIs show their own progress).

        `vae`: another VAE to use (an AutoencoderKL, a diffusers VAE folder or a single VAE
        file), e.g. SDXL's fp16-fix VAE.
        """
        diffusers = require("diffusers", "the diffusers backend", "diffusers")
        from ..model_names import is_world

        if is_world(path) and vae is None:
            from ..world import load_world_backend

            return load_world_backend(device, dtype)
        p = check_exists(path, "model")
        extra = {}
        if p.is_dir():
            index = p / "model_index.json"
            if not index.is_file():
                raise ConfigError(f"{p} is not a diffusers model folder (no model_index.json)")
            sdxl = "XL" in json.loads(index.read_text()).get("_class_name", "")
            if vae is not None:
                extra["vae"] = _load_vae(diffusers, vae, dtype, sdxl)
            kwargs = _tokenizer_kwargs(p, sdxl)
            pipe_cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
            if not sdxl:
                kwargs.update(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
            pipe = quiet_load(pipe_cls.from_pretrained, str(p), local_files_only=True, torch_dtype=dtype, **kwargs, **extra,
                              show_bars=loading_bars)
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
            if vae is not None:
                extra["vae"] = _load_vae(diffusers, vae, dtype, sdxl)
            kwargs = {"tokenizer": load_clip_tokenizer()}
            if sdxl:
                kwargs["tokenizer_2"] = load_clip_tokenizer(pad_token="!")
            else:
                kwargs.update(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
            pipe_cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
            pipe = quiet_load(pipe_cls.from_single_file, str(p), config=str(config or CONFIG_DIR / arch), local_files_only=True,
                              torch_dtype=dtype, **kwargs, **extra, show_bars=loading_bars)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, device=device, arch=arch)

    # -- conditioning ---------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str] | str, negative_prompt: str | Sequence[str] | None = None,
                       height: int | None = None, width: int | None = None, clip_skip: int | None = None) -> TensorConditioning:
        """Text embeddings for CFG: cond and uncond rows (SDXL: both encoders, pooled embeds, and
        add_time_ids = (height, width, 0, 0, height, width) for the output size).

        negative_prompt=None does what the diffusers pipelines do without one: the empty prompt
        (SD1.x/2.x), zero embeddings (SDXL, whose config sets force_zeros_for_empty_prompt).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ConfigError("the prompt list is empty")
        if negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) != len(prompts):
            raise ConfigError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
        with torch.no_grad(), self.resident("text_encoders"):
            if self.is_sdxl:
                cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
                    prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                    negative_prompt=negative_prompt, clip_skip=clip_skip)
                h = height or self.default_size
                w = width or self.default_size
                time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond.dtype, device=self.device).repeat(len(prompts), 1)
                tensors = {"cond": cond, "uncond": uncond, "pooled": pooled, "uncond_pooled": uncond_pooled,
                           "time_ids": time_ids}
            else:
                cond, uncond = self.pipe.encode_prompt(prompts, self.device, 1, True, negative_prompt=negative_prompt,
                                                       clip_skip=clip_skip)
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
        if self.is_sdxl:
            cfg = self.unet.config
            got = tensors["pooled"].shape[-1] + tensors["time_ids"].shape[-1] * cfg.addition_time_embed_dim
            if got != cfg.projection_class_embeddings_input_dim:
                raise ModelMismatchError(
                    f"conditioning has {tensors['pooled'].shape[-1]}-dim pooled embeddings and {tensors['time_ids'].shape[-1]} "
                    f"time ids, but this UNet's added embedding takes {cfg.projection_class_embeddings_input_dim} inputs; "
                    "encode the prompts with this model's own text encoders (an SDXL refiner needs its own time ids)")

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
        self._upcast_vae_if_needed()
        z = x0.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        with self.resident("vae"):
            images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _upcast_vae_if_needed(self) -> None:
        """SDXL's original VAE overflows in fp16 (its config says force_upcast): run it in fp32, as diffusers does."""
        if self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            log.info("this VAE overflows in fp16 (force_upcast): running it in fp32; an fp16-fix VAE avoids this")
            self.vae.to(torch.float32)

    def approx_decoder(self) -> LatentRGBDecoder:
        """A near-free decoder for scoring candidates and previews: a linear latent -> RGB map
        (ComfyUI's Latent2RGB factors), upsampled to the VAE's output size."""
        return LatentRGBDecoder(self.arch, upscale=self.vae_scale_factor)

    def decoder(self, kind: str | Callable[[torch.Tensor], torch.Tensor] = "vae") -> Callable[[torch.Tensor], torch.Tensor]:
        """A decoder for the resampler: "vae" (full VAE), "rgb" (the linear approximation), the path
        of a local TAESD folder (diffusers AutoencoderTiny; ComfyUI's taesd/taesdxl), or a callable."""
        if callable(kind):
            return kind
        if kind == "vae":
            return self.decode
        if kind == "rgb":
            return self.approx_decoder()
        return TinyVAEDecoder.from_path(kind, device=self.device, dtype=self.vae.dtype)

    def decode_with_grad(self, x0: torch.Tensor) -> torch.Tensor:
        self._upcast_vae_if_needed()
        z = x0.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        with self.resident("vae"):
            return (self.vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [N,3,H,W] in [0,1] -> model-space latents (the VAE posterior mean, or a sample)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"images must be [N,3,H,W], got {tuple(images.shape)}")
        self._upcast_vae_if_needed()
        with self.resident("vae"):
            dist = self.vae.encode((images.to(self.device, self.vae.dtype) * 2 - 1), return_dict=False)[0]
        z = dist.sample(generator) if sample else dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).float()

    # -- convenience ------------------------------------------------------------------------
    def default_sigmas(self, steps: int = 20) -> torch.Tensor:
        """The DDIM sigmas of this model's scheduler config (SD1.5/SDXL: 'leading', offset 1 = SPO's
        t = 951, 901, ..., 1 for 20 steps), ending at sigma(t=0) like diffusers' DDIM."""
        cfg = self.pipe.scheduler.config
        return self.schedule.ddim_sigmas(steps, steps_offset=int(cfg.get("steps_offset", 1) or 0),
                                         spacing=cfg.get("timestep_spacing", "leading") or "leading")

    @torch.no_grad()
    def sample(self, prompts: Sequence[str] | str, negative_prompt: str | Sequence[str] | None = None, *,
               steps: int = 20, guidance_scale: float = 5.0, eta: float = 1.0, height: int | None = None,
               width: int | None = None, seed: int = 0, generator: torch.Generator | None = None,
               sigmas: torch.Tensor | None = None, k: int = 1, policy: str = "greedy", scorer: Any = None,
               decode: str | Callable[[torch.Tensor], torch.Tensor] = "vae", config: Any = None, best_of: int = 0,
               callback: Callable | None = None, progress: Callable | None = None,
               cancel: Callable[[], bool] | None = None) -> "BackendSample":
        """Text to image: plain DDIM(eta) sampling (k = 1), the per-step resampler (k > 1, or a
        full `config`: ResamplerConfig), or best-of-N (`best_of` > 1). `decode` picks how candidates
        are decoded for scoring ("vae", "rgb", a TAESD folder, a callable); the final image always
        goes through the full VAE. With k = 1 and the default sigmas the latents equal diffusers'
        DDIM pipeline (eta=1) output for the same seed.
        """
        from ..sampling import ResamplerConfig, best_of_n, resample

        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = self.encode_prompts(prompt_list, negative_prompt, height, width)
        sig = self.default_sigmas(steps) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32).cpu()
        g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        b = len(prompt_list)
        denoiser = self.denoiser(guidance_scale)
        cfg = config if config is not None else ResamplerConfig(k=k, policy=policy, eta=eta)
        if scorer is not None:
            from ..scorers.lrm import check_latent_scorer_fits

            table = self.module_table()
            check_latent_scorer_fits(scorer, table.family, table.cross_attention_dim, f"the model ({self.arch})")
        decode_fn = self.decoder(decode) if (cfg.k > 1 or best_of > 1) else None
        common = dict(generator=g, callback=callback, cancel=cancel, progress=progress)
        if best_of > 1:
            starts = self.initial_noise(best_of * b, height, width, sigma=float(sig[0]), generator=g)
            result = best_of_n(denoiser, cond, starts, sig, self.schedule, scorer, decode_fn, prompt_list, best_of,
                               eta=cfg.eta, **common)
        else:
            x = self.initial_noise(b, height, width, sigma=float(sig[0]), generator=g)
            result = resample(denoiser, cond, x, sig, self.schedule, scorer, decode_fn, prompt_list, cfg, **common)
        final = float(sig[-1])
        latents = sigma_space_to_vp(result.x, final) if final > 0 else result.x
        return BackendSample(self.decode(latents), latents, result, sig)

    def module_table(self):
        """The LoRA engine's table of this model (real SD tables for real models)."""
        from ..lora.table_build import table_for_pipeline
        from ..lora.tables import load_table

        if self.arch in ("sd15", "sd2", "sdxl"):
            return load_table(self.arch)
        return table_for_pipeline(self.pipe, arch=self.arch)


@dataclass
class BackendSample:
    images: torch.Tensor  # [B,3,H,W] in [0,1], float32
    latents: torch.Tensor  # diffusers (VP) latents [B,C,h,w]
    result: Any  # ResampleResult: final x, trace, evaluations, pairs
    sigmas: torch.Tensor


class TinyVAEDecoder:
    """TAESD (diffusers AutoencoderTiny) as a cheap decoder: takes model-space latents, like `decode`."""

    def __init__(self, vae):
        self.vae = vae

    @classmethod
    def from_path(cls, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> "TinyVAEDecoder":
        diffusers = require("diffusers", "the TAESD decoder", "diffusers")
        p = check_exists(path, "TAESD folder")
        if not (p.is_dir() and (p / "config.json").is_file()):
            raise ConfigError(f"{p} is not a diffusers AutoencoderTiny (TAESD) folder with a config.json; "
                              "the decoder must be 'vae', 'rgb' or such a folder (e.g. madebyollin/taesd)")
        vae = quiet_load(diffusers.AutoencoderTiny.from_pretrained, str(p), local_files_only=True,
                          torch_dtype=dtype or torch.float32)
        return cls(vae.to(device).eval())

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        scale = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        out = self.vae.decode(x0.to(self.vae.device, self.vae.dtype) / scale, return_dict=False)[0]
        return (out.float() / 2 + 0.5).clamp(0, 1)


def quiet_load(fn, *args, show_bars: bool = False, **kwargs):
    """Call a diffusers/transformers loader quietly: no FutureWarning for `torch_dtype=` (what every
    supported diffusers knows) and, unless `show_bars`, no per-component loading bars (the caller
    shows its own progress; the bars come back afterwards if they were on)."""
    import warnings

    bars = []
    for name in () if show_bars else ("diffusers", "transformers"):
        try:
            logging_mod = __import__(f"{name}.utils.logging", fromlist=["logging"])
        except ImportError:
            continue
        if logging_mod.is_progress_bar_enabled():
            logging_mod.disable_progress_bar()
            bars.append(logging_mod)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            return fn(*args, **kwargs)
    finally:
        for logging_mod in bars:
            logging_mod.enable_progress_bar()


def _load_vae(diffusers, vae, dtype, sdxl: bool):
    """An AutoencoderKL from a module, a diffusers VAE folder, or a single VAE file (with the shipped
    SD1.5 or SDXL VAE config: they differ in scaling factor, 0.18215 vs 0.13025)."""
    if isinstance(vae, torch.nn.Module):
        return vae
    p = check_exists(vae, "VAE")
    if p.is_dir():
        return quiet_load(diffusers.AutoencoderKL.from_pretrained, str(p), local_files_only=True, torch_dtype=dtype)
    return quiet_load(diffusers.AutoencoderKL.from_single_file, str(p), local_files_only=True, torch_dtype=dtype,
                       config=str(CONFIG_DIR / ("sdxl" if sdxl else "sd15") / "vae"))


def _tokenizer_kwargs(folder: Path, sdxl: bool) -> dict:
    """Tokenizers missing from a folder are built offline instead of fetched."""
    kwargs = {}
    if not (folder / "tokenizer").is_dir():
        kwargs["tokenizer"] = load_clip_tokenizer()
    if sdxl and not (folder / "tokenizer_2").is_dir():
        kwargs["tokenizer_2"] = load_clip_tokenizer(pad_token="!")
    return kwargs
