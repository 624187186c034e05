"""Rectified-flow DiT models (SD3/SD3.5 `SD3Transformer2DModel`, Flux `FluxTransformer2DModel`) behind
the sigma-space contract, so `spo sample`, the resampler, best-of-N and FK steering run on them.

The sample lives in the model's latent space (`x = (1 - sigma) x0 + sigma eps`, no VP rescaling);
the transformer predicts v and the denoiser returns `x0 = x - sigma * v` with guidance inside:
real classifier-free guidance for SD3 (and Flux models without a guidance embedding), Flux-dev's
distilled guidance as the transformer's `guidance` input. Flux's 2x2 latent packing and its
position ids stay inside the denoiser, so the rest of the pack sees [B, C, h, w] latents. The
prompt encoder is the pipeline's own (`encode_prompt`), or any callable returning
(embeddings, pooled) for the embedded flow world.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError, require
from ..sampling.denoiser import TensorConditioning
from ..sampling.flow import FlowSchedule, flux_mu

log = logging.getLogger(__name__)

PromptEncoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # prompts -> (embeds [B,L,D], pooled [B,P])

FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def is_flow_pipeline_folder(path: str | Path) -> bool:
    """A diffusers folder whose model_index names an SD3 or Flux pipeline."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    return json.loads(index.read_text()).get("_class_name", "") in FLOW_PIPELINES


def is_flow_model_spec(spec: str | Path | None) -> bool:
    """`world-flow`, a local SD3/SD3.5/Flux diffusers folder, or a single file holding such a transformer."""
    from ..model_names import is_flow_world
    from .flow_files import flow_file_family

    if spec is None:
        return False
    path = Path(str(spec)).expanduser()
    return is_flow_world(spec) or (path.is_dir() and is_flow_pipeline_folder(path)) or flow_file_family(path) is not None


def load_flow_model(spec: str | Path, device="cpu", dtype: torch.dtype = torch.float32, files=None) -> "FlowBackend":
    """The FlowBackend of `world-flow` (the embedded world's flow model), of a local SD3/SD3.5/Flux folder, or of
    single files (`files`: a FlowFiles naming the text encoders, VAE, T5 tokenizer and configs beside it)."""
    from ..model_names import is_flow_world

    if is_flow_world(spec):
        from ..world import load_flow_world_backend

        return load_flow_world_backend(device, dtype)
    path = Path(str(spec)).expanduser()
    if path.is_file():
        from .flow_files import load_flow_files

        return load_flow_files(path, files, device=device, dtype=dtype)
    return FlowBackend.from_pretrained(path, device=device, dtype=dtype)


class FlowDenoiser:
    """`denoise(x, sigma, cond) -> x0` for a flow transformer (x0 = x - sigma * v), guidance inside."""

    def __init__(self, backend: "FlowBackend", guidance_scale: float):
        self.backend = backend
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorConditioning) -> torch.Tensor:
        be = self.backend
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        x_in = x.to(be.dtype)
        if be.guidance_embeds or self.guidance_scale == 1.0:
            v = be.velocity(x_in, sigma, cond["embeds"], cond["pooled"], self.guidance_scale).float()
        else:
            both = be.velocity(torch.cat([x_in, x_in]), torch.cat([sigma, sigma]),
                               torch.cat([cond["neg_embeds"], cond["embeds"]]), torch.cat([cond["neg_pooled"], cond["pooled"]]),
                               None).float()
            v_u, v_c = both.chunk(2)
            v = v_u + self.guidance_scale * (v_c - v_u)
        return x.float() - s * v


class FlowBackend:
    """A flow transformer, its VAE and a prompt encoder; the same sampling interface as DiffusersBackend."""

    is_flow = True

    def __init__(self, transformer, vae, encode: PromptEncoder, shift: float = 1.0, dynamic_shift: dict | None = None,
                 pipe=None, arch: str = "flow", device=None, dtype: torch.dtype | None = None):
        self.transformer = transformer
        self.vae = vae
        self.encode = encode
        self.pipe = pipe
        self.arch = arch
        if device is not None or dtype is not None:
            transformer.to(device=device, dtype=dtype)
            vae.to(device=device, dtype=dtype)
        self.device = next(transformer.parameters()).device
        self.dtype = next(transformer.parameters()).dtype
        self.is_flux = type(transformer).__name__.startswith("Flux")
        self.guidance_embeds = bool(getattr(transformer.config, "guidance_embeds", False))
        self.dynamic_shift = dynamic_shift  # Flux: base/max shift and sequence lengths of calculate_shift
        self.schedule = FlowSchedule(shift=shift)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        channels = int(transformer.config.in_channels)
        self.latent_channels = channels // 4 if self.is_flux else channels
        sample = getattr(transformer.config, "sample_size", None) or 128
        self.default_size = int(sample) * self.vae_scale_factor if not self.is_flux else 1024

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, device=None, dtype=None) -> "FlowBackend":
        """A diffusers StableDiffusion3Pipeline or FluxPipeline (its own encode_prompt and scheduler config)."""
        name = type(pipe).__name__
        if name not in FLOW_PIPELINES:
            raise ConfigError(f"{name} is not a rectified-flow pipeline the pack knows ({', '.join(FLOW_PIPELINES)})")
        cfg = pipe.scheduler.config
        dynamic = None
        if cfg.get("use_dynamic_shifting", False):
            dynamic = {k: cfg.get(k) for k in ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")}
        if name == "FluxPipeline":
            def encode(prompts):
                embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe.transformer.device)
                return embeds, pooled
            arch = "flux"
        else:
            def encode(prompts):
                out = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=pipe.transformer.device,
                                         do_classifier_free_guidance=False)
                return out[0], out[2]
            arch = "sd3"
        if device is not None:  # encode_prompt feeds the text encoders on the transformer's device
            for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                if getattr(pipe, attr, None) is not None:
                    getattr(pipe, attr).to(device)
        return cls(pipe.transformer, pipe.vae, encode, shift=float(cfg.get("shift", 1.0)), dynamic_shift=dynamic,
                   pipe=pipe, arch=arch, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> "FlowBackend":
        """A local diffusers SD3/SD3.5 or Flux folder; never downloads."""
        diffusers = require("diffusers", "rectified-flow models", "diffusers")
        from .diffusers_backend import quiet_load

        p = Path(path)
        index = json.loads((p / "model_index.json").read_text())
        pipe_cls = getattr(diffusers, index.get("_class_name", ""))
        # components a folder leaves out (SD3 without its T5, no image encoder) are passed as None, as diffusers wants
        expected = [n for n in inspect.signature(pipe_cls.__init__).parameters if n not in ("self", "args", "kwargs")]
        absent = {n: None for n in expected
                  if not (isinstance(index.get(n), list) and index[n][0] is not None and (p / n).is_dir())}
        pipe = quiet_load(pipe_cls.from_pretrained, str(p), local_files_only=True, torch_dtype=dtype, **absent)
        pipe.set_progress_bar_config(disable=True)
        return cls.from_pipeline(pipe, device=device)

    # -- the model ------------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                 guidance: float | None) -> torch.Tensor:
        """The transformer's v for [B, C, h, w] latents at per-row sigma (Flux: packed and unpacked here)."""
        if not self.is_flux:
            return self.transformer(hidden_states=x, timestep=sigma.to(x.dtype) * 1000, encoder_hidden_states=embeds.to(x.dtype),
                                    pooled_projections=pooled.to(x.dtype), return_dict=False)[0]
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        g = None
        if self.guidance_embeds:
            g = torch.full((b,), float(guidance if guidance is not None else 3.5), device=x.device, dtype=torch.float32)
        out = self.transformer(hidden_states=packed, timestep=sigma.to(x.dtype), guidance=g,
                               pooled_projections=pooled.to(x.dtype), encoder_hidden_states=embeds.to(x.dtype),
                               txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor)

    def module_table(self):
        """The LoRA engine's table of this transformer: a shipped real one (sd35-medium/large, flux-dev/schnell)
        when its config is that model's, else one built from the live module (tiny or custom models)."""
        from ..lora.table_build import table_for_pipeline
        from ..lora.tables import CONFIG_DIR, FLOW_ARCHS, load_table

        mine = dict(self.transformer.config)
        for arch in FLOW_ARCHS:
            ref = json.loads((CONFIG_DIR / arch / "transformer" / "config.json").read_text())
            keys = [k for k in ref if not k.startswith("_")]
            if type(self.transformer).__name__ == ref.get("_class_name") and all(mine.get(k) == ref[k] for k in keys):
                return load_table(arch)
        return table_for_pipeline(self)

    def encode_prompts(self, prompts: Sequence[str] | str, negative_prompt: str | Sequence[str] | None = None,
                       height: int | None = None, width: int | None = None) -> TensorConditioning:
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        with torch.no_grad():
            embeds, pooled = self.encode(prompt_list)
            tensors = {"embeds": embeds, "pooled": pooled}
            if not self.guidance_embeds:
                neg = negative_prompt if negative_prompt is not None else ""
                neg_list = [neg] * len(prompt_list) if isinstance(neg, str) else list(neg)
                if len(neg_list) != len(prompt_list):
                    raise ConfigError(f"{len(neg_list)} negative prompts for {len(prompt_list)} prompts")
                tensors["neg_embeds"], tensors["neg_pooled"] = self.encode(neg_list)
        return TensorConditioning({k: v.to(self.device) for k, v in tensors.items()})

    def denoiser(self, guidance_scale: float = 5.0) -> FlowDenoiser:
        return FlowDenoiser(self, guidance_scale)

    # -- latents <-> images -----------------------------------------------------------------------
    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.default_size, width or self.default_size
        factor = self.vae_scale_factor * (2 if self.is_flux else 1)
        if h % factor or w % factor:
            raise ConfigError(f"height and width must be multiples of {factor} for this model, got {h}x{w}")
        return (batch, self.latent_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)

    def initial_noise(self, batch: int, height: int | None = None, width: int | None = None, sigma: float | None = None,
                      generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """x at sigma (1 for text to image): standard normal noise drawn on the CPU, times sigma."""
        g = generator or torch.Generator().manual_seed(0 if seed is None else int(seed))
        noise = torch.randn(self.latent_shape(batch, height, width), generator=g, dtype=torch.float32)
        return (noise * (1.0 if sigma is None else float(sigma))).to(self.device)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        z = x0.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def decoder(self, kind: str | Callable[[torch.Tensor], torch.Tensor] = "vae") -> Callable[[torch.Tensor], torch.Tensor]:
        if callable(kind):
            return kind
        if kind == "vae":
            return self.decode
        from .diffusers_backend import TinyVAEDecoder

        if kind == "rgb":
            raise ConfigError("the rgb approximate decoder has factors for SD1.5/SDXL latents only; use --decoder vae "
                              "or a TAESD3 / TAEF1 folder with this model")
        return TinyVAEDecoder.from_path(kind, device=self.device, dtype=self.vae.dtype)

    def default_sigmas(self, steps: int = 20, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The pipeline's own schedule: fixed shift (SD3: diffusers' set_timesteps), or Flux's
        linspace(1, 1/steps) grid with mu from the image's token count."""
        if self.dynamic_shift is None:
            return self.schedule.diffusers_sigmas(steps)
        _, _, h, w = self.latent_shape(1, height, width)
        d = self.dynamic_shift
        mu = flux_mu((h // 2) * (w // 2), int(d.get("base_image_seq_len") or 256), int(d.get("max_image_seq_len") or 4096),
                     float(d.get("base_shift") or 0.5), float(d.get("max_shift") or 1.15))
        return self.schedule.flux_sigmas(steps, mu)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str] | str, negative_prompt: str | Sequence[str] | None = None, *,
               steps: int = 20, guidance_scale: float = 5.0, eta: float = 1.0, height: int | None = None,
               width: int | None = None, seed: int = 0, generator: torch.Generator | None = None,
               sigmas: torch.Tensor | None = None, k: int = 1, policy: str = "greedy", scorer: Any = None,
               decode: str | Callable[[torch.Tensor], torch.Tensor] = "vae", config: Any = None, best_of: int = 0,
               callback: Callable | None = None, progress: Callable | None = None,
               cancel: Callable[[], bool] | None = None):
        """Text to image with the RF ancestral step (k = 1 is ComfyUI's euler_ancestral on this model),
        the per-step resampler, FK steering (config.policy "fk") or best-of-N (`best_of` > 1); the
        schedule's step can be switched to "euler" (deterministic, k = 1), "sde" or "cps"."""
        from ..sampling import ResamplerConfig, best_of_n, resample
        from ..sampling.resampler import is_latent_scorer
        from .diffusers_backend import BackendSample

        if scorer is not None and is_latent_scorer(scorer):
            raise ConfigError(f"the latent reward model {getattr(scorer, 'name', 'lrm')!r} reads SD1.5/SDXL UNet latents; "
                              f"this is a rectified-flow model ({self.arch}): use a pixel scorer")
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = self.encode_prompts(prompt_list, negative_prompt, height, width)
        sig = self.default_sigmas(steps, height, width) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32).cpu()
        g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        b = len(prompt_list)
        denoiser = self.denoiser(guidance_scale)
        cfg = config if config is not None else ResamplerConfig(k=k, policy=policy, eta=eta)
        decode_fn = self.decoder(decode) if (cfg.k > 1 or best_of > 1) else None
        common = dict(generator=g, callback=callback, cancel=cancel, progress=progress)
        if best_of > 1:
            starts = self.initial_noise(best_of * b, height, width, sigma=float(sig[0]), generator=g)
            result = best_of_n(denoiser, cond, starts, sig, self.schedule, scorer, decode_fn, prompt_list, best_of,
                               eta=cfg.eta, **common)
        else:
            x = self.initial_noise(b, height, width, sigma=float(sig[0]), generator=g)
            result = resample(denoiser, cond, x, sig, self.schedule, scorer, decode_fn, prompt_list, cfg, **common)
        return BackendSample(self.decode(result.x), result.x, result, sig)

