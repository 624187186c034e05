"""The trainer's TrainingHost over the checkpoint the WebUI has loaded (no second copy).

A1111 (webui.md 3.4): `sd_model` is an ldm LatentDiffusion (SD1/SD2) or an sgm DiffusionEngine
(SDXL); the UNet is `sd_model.model.diffusion_model` (LDM module names); `apply_model(x, t, cond)`
takes the VP input and the DDPM timestep and returns eps (v for SD2-v); conditioning comes from
`get_learned_conditioning` (a tensor, or a dict with crossattn/vector for SDXL). Its built-in Lora
merges LoRA weights into the UNet during generation; clearing `networks.loaded_networks` makes
every layer restore its original weights on its next forward, so training starts from the base.

Forge (webui.md 7.1): `sd_model.forge_objects.unet` is a UnetPatcher; its `model.apply_model(x,
sigma, c_crossattn=, y=)` takes the sigma-space input and returns x0; the UNet is
`.model.diffusion_model` (LDM names); the model is moved to the GPU with
`memory_management.load_model_gpu`. Text conditioning and the VAE run under inference mode, so
their outputs are cloned before autograd sees them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Sequence

import torch
from torch import nn

from spo_core.errors import ConfigError
from spo_core.lora.tables import load_table
from spo_core.sampling import NoiseSchedule, TensorConditioning
from spo_core.training import LoRARoot

from .host import ensure_model, model_arch_of
from .sampler import schedule_of

log = logging.getLogger(__name__)


def _flatten(prefix: str, c: Any) -> dict[str, torch.Tensor]:
    if isinstance(c, dict):
        return {f"{prefix}.{k}": v.clone() for k, v in c.items() if isinstance(v, torch.Tensor)}
    return {prefix: c.clone()}


def _unflatten(tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if prefix in tensors:
        return tensors[prefix]
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


class WebUIDenoiserForTraining:
    """`denoise(x, sigma, cond) -> x0` with CFG, differentiable, over the WebUI's UNet."""

    def __init__(self, host: "WebUITrainingHost", guidance_scale: float):
        self.host = host
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorConditioning) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        use_cfg = self.guidance_scale != 1.0
        if use_cfg:
            xx, ss = torch.cat([x, x]), torch.cat([sigma, sigma])
            c = {k: torch.cat([cond.tensors["u" + k[1:]], v]) for k, v in cond.tensors.items() if k.startswith("c")}
            x0_u, x0_c = self.host.x0(xx, ss, c).chunk(2)
            return x0_u + self.guidance_scale * (x0_c - x0_u)
        return self.host.x0(x, sigma, {k: v for k, v in cond.tensors.items() if k.startswith("c")})


def _trainable_tensors(module: nn.Module) -> None:
    """Forge loads its model under inference mode: autograd cannot save inference tensors for the
    backward pass through the frozen UNet. Replace them by ordinary copies (once; the WebUI samples
    with them as before)."""
    converted = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                    converted += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    converted += 1
    if converted:
        log.info("made %d inference tensors of the UNet trainable-through", converted)


class WebUITrainingHost:
    """TrainingHost (spo_core.training.host) over the WebUI's loaded checkpoint, A1111 or Forge."""

    def __init__(self, sd_model: Any = None):
        sd_model = sd_model if sd_model is not None else ensure_model()
        if sd_model is None:
            raise ConfigError("no checkpoint is loaded in the WebUI and the selected one did not load: choose one in the "
                              "checkpoint dropdown (the console says why it failed)")
        self.sd_model = sd_model
        self.forge = hasattr(sd_model, "forge_objects")
        arch = model_arch_of(sd_model)
        if arch not in ("sd15", "sdxl", "sd2"):
            flux = "flux" in type(sd_model).__name__.lower() or getattr(sd_model, "is_flux", False)
            raise ConfigError(
                ("the loaded checkpoint is a Flux model: the WebUI tab trains SD1.5, SD2 and SDXL checkpoints (the SPO "
                 "sampler runs on Flux here); train Flux LoRAs with ComfyUI's Train SPO LoRA node or `spo train --model "
                 "FLUX_FOLDER --preset grpo-flux` (or spo-flux), and load the LoRA here") if flux else
                "the loaded checkpoint is not SD1.5, SD2 or SDXL; the WebUI tab trains those (SD3/Flux: ComfyUI's node "
                "or `spo train` on a diffusers folder)")
        self.arch = arch
        self.is_sdxl = arch == "sdxl"
        self.v_prediction = getattr(sd_model, "parameterization", "eps") == "v"
        self.unet = self._unet()
        p = next(self.unet.parameters())
        self.device = p.device
        self.dtype = p.dtype
        self.default_size = 1024 if self.is_sdxl else (768 if arch == "sd2" and self.v_prediction else 512)
        self.schedule = self._schedule()
        self._checkpoint_patched: list[nn.Module] = []
        self._weight_ptrs: set[int] | None = None
        self._reset_webui_lora()

    # -- model parts -------------------------------------------------------------------------
    def _unet(self) -> nn.Module:
        if self.forge:
            from backend import memory_management

            patcher = self.sd_model.forge_objects.unet
            memory_management.load_model_gpu(patcher)
            unet = patcher.model.diffusion_model
            _trainable_tensors(unet)
            return unet
        return self.sd_model.model.diffusion_model

    def _schedule(self) -> NoiseSchedule:
        if self.forge:
            sigmas = self.sd_model.forge_objects.unet.model.predictor.sigmas
            s = sigmas.detach().double().cpu()
            return NoiseSchedule(1 / (1 + s * s))
        ac = getattr(self.sd_model, "alphas_cumprod", None)
        if isinstance(ac, torch.Tensor):
            return NoiseSchedule(ac.detach().double().cpu())
        return schedule_of(None)

    def _reset_webui_lora(self) -> None:
        """Make A1111's built-in Lora restore the base weights (they may still hold the last prompt's LoRAs)."""
        networks = sys.modules.get("networks")
        loaded = getattr(networks, "loaded_networks", None)
        if isinstance(loaded, list) and loaded:
            log.info("clearing %d LoRA(s) of the last generation before training", len(loaded))
            loaded.clear()

    def _copy_saved_activations(self):
        """Forge's UNet is written for inference: its transformer blocks add into their hidden states in
        place (`x += ...`) after ops such as LayerNorm saved them for backward, which autograd refuses.
        While grads are on, every activation autograd saves is kept as a copy taken when it was saved
        (the value the op used), so the in-place updates cannot touch it; weights are kept as they are."""
        import contextlib

        if not torch.is_grad_enabled():
            return contextlib.nullcontext()
        if self._weight_ptrs is None:
            self._weight_ptrs = {p.data_ptr() for p in self.unet.parameters()}
        weights = self._weight_ptrs

        def pack(t: torch.Tensor) -> torch.Tensor:
            return t if t.data_ptr() in weights else t.clone()

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    # -- the TrainingHost protocol -----------------------------------------------------------
    def module_table(self):
        return load_table(self.arch)

    def lora_root(self) -> LoRARoot:
        return LoRARoot(self.unet, "ldm", "")

    def denoiser(self, guidance_scale: float) -> WebUIDenoiserForTraining:
        return WebUIDenoiserForTraining(self, guidance_scale)

    def x0(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """One UNet pass on rows x (sigma space) with the given cond rows -> x0."""
        c = _unflatten(cond, "c")
        if self.forge:
            kwargs = {"c_crossattn": c["crossattn"], "y": c["vector"]} if isinstance(c, dict) else {"c_crossattn": c}
            with self._copy_saved_activations():
                return self.sd_model.forge_objects.unet.model.apply_model(x, sigma, **kwargs).to(x.dtype)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        x_in = x / (1 + s * s).sqrt()
        t = self.schedule.timestep(sigma.detach().double().cpu()).to(device=x.device, dtype=torch.float32)
        out = self.sd_model.apply_model(x_in.to(self.dtype) if not torch.is_autocast_enabled() else x_in, t, c).to(x.dtype)
        if self.v_prediction:
            return x / (1 + s * s) - s / (1 + s * s).sqrt() * out
        return x - s * out

    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str | None = None,
                       height: int | None = None, width: int | None = None) -> TensorConditioning:
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("the prompt list is empty")
        with torch.no_grad():
            c = self.sd_model.get_learned_conditioning(prompts)
            u = self.sd_model.get_learned_conditioning([negative_prompt or ""] * len(prompts))
        tensors = {**_flatten("c", c), **_flatten("u", u)}
        return TensorConditioning({k: v.to(self.device) for k, v in tensors.items()}, {"arch": self.arch})

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        from modules import sd_samplers_common

        with torch.no_grad():
            out = [sd_samplers_common.samples_to_images_tensor(part, approximation=0, model=self.sd_model).clone()
                   for part in x0.detach().split(4)]
        return ((torch.cat(out).float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = (images.to(self.device) * 2 - 1)
            if self.forge:
                return self.sd_model.encode_first_stage(x).clone().float()
            vae_dtype = getattr(getattr(self.sd_model, "first_stage_model", None), "dtype", x.dtype)
            posterior = self.sd_model.encode_first_stage(x.to(vae_dtype))
            if hasattr(posterior, "mode"):  # ldm: the posterior mean, scaled
                return (posterior.mode() * self.sd_model.scale_factor).float()
            return self.sd_model.get_first_stage_encoding(posterior).float()

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.default_size, width or self.default_size
        if h % 8 or w % 8:
            raise ConfigError(f"height and width must be multiples of 8, got {h}x{w}")
        return (batch, 4, h // 8, w // 8)

    def feature_module(self, where: str) -> nn.Module:
        if where == "down":
            return self.unet.input_blocks[-1]
        if where == "mid":
            return self.unet.middle_block
        raise ConfigError(f"NCP features must come from 'down' or 'mid', got {where!r}")

    def set_gradient_checkpointing(self, enabled: bool, checkpoint_fn: Callable | None = None) -> None:
        """Checkpoint every input/middle/output block by wrapping its forward (removed when disabled)."""
        for block in self._checkpoint_patched:
            block.__dict__.pop("forward", None)
        self._checkpoint_patched = []
        if not enabled:
            return
        fn = checkpoint_fn or (lambda f, *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False, **k))
        blocks = list(self.unet.input_blocks) + [self.unet.middle_block] + list(self.unet.output_blocks)
        for block in blocks:
            original = block.forward

            def forward(*args, _original=original, **kwargs):
                return fn(_original, *args, **kwargs)

            block.forward = forward
            self._checkpoint_patched.append(block)

    def model_info(self) -> dict[str, str]:
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        out = {"name": str(getattr(info, "name_for_extra", None) or getattr(info, "title", None) or self.arch)}
        sha = getattr(info, "sha256", None)
        if sha:
            out["hash"] = str(sha)
        return out

    def release(self) -> None:
        """After training: put the UNet back as the WebUI expects (eval, no grads kept)."""
        self.set_gradient_checkpointing(False)
        self.unet.eval()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
