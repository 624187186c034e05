"""The trainer's TrainingHost over the MODEL, CLIP and VAE a ComfyUI user has loaded.

Rectified-flow MODELs (SD3/SD3.5 MMDiT, Flux; CONST sampling) train too: `apply_model` returns
x0 = x - sigma * v there as well, the pooled text embedding goes in as `y`, Flux's distilled
guidance as `guidance`, and the LoRA hooks sit on ComfyUI's fused q/k/v Linears (each part's rows).

No second copy of the checkpoint: the LoRA hooks attach to the MODEL's own UNet
(`BaseModel.diffusion_model`, LDM module names), which ComfyUI loads with every LoRA patch of
that MODEL merged. `BaseModel.apply_model(x, sigma, c_crossattn=, y=)` takes the sigma-space
input and returns x0, so it is the differentiable denoiser directly (CFG is done here on one
batched [uncond, cond] call). Prompts go through the CLIP input, images through the VAE input.

ComfyUI runs node bodies in `torch.inference_mode()`, and tensors made there (the model's
weights when ComfyUI moved them, conditioning, VAE output) cannot take part in autograd. The
trainer leaves inference mode; this host loads the UNet inside that and replaces any inference
tensor among its parameters with a normal copy (ComfyUI's own `set_attr_param`), and clones
what CLIP and VAE return. Other models (CLIP, VAE, scorer) may make ComfyUI offload the UNet;
every denoiser call asks ComfyUI to have it loaded again before it runs.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch
from torch import nn

from spo_core.errors import ConfigError, ModelMismatchError
from spo_core.lora import ModuleTable, load_table
from spo_core.lora.tables import ModuleInfo
from spo_core.sampling import TensorConditioning
from spo_core.training import LoRARoot

from .comfy_sampling import noise_schedule
from .host import model_arch

log = logging.getLogger(__name__)

_DEFAULT_SIZE = {"sd15": 512, "sd2": 768, "sdxl": 1024, "sd35-medium": 1024, "sd35-large": 1024, "flux-dev": 1024,
                 "flux-schnell": 1024}


def _diffusers_flow_config(base_model) -> tuple[str, str, dict]:
    """(family, diffusers class, config) of the diffusers transformer with the modules of ComfyUI's MMDiT
    (SD3/SD3.5: hidden 64 * depth, one head per 64) or Flux model, from the config ComfyUI detected."""
    u = dict(base_model.model_config.unet_config)
    if unet_image_model(base_model) == "flux":
        hidden, heads, patch = int(u["hidden_size"]), int(u["num_heads"]), int(u.get("patch_size", 2))
        return "flux", "FluxTransformer2DModel", dict(
            patch_size=1, in_channels=int(u["in_channels"]) * patch * patch, num_layers=int(u["depth"]),
            num_single_layers=int(u["depth_single_blocks"]), attention_head_dim=hidden // heads, num_attention_heads=heads,
            joint_attention_dim=int(u["context_in_dim"]), pooled_projection_dim=int(u["vec_in_dim"]),
            guidance_embeds=bool(u.get("guidance_embed", False)), axes_dims_rope=tuple(u.get("axes_dim", (16, 56, 56))))
    if "depth" in u and "joint_blocks" in dict(base_model.diffusion_model.named_children()):
        depth = int(u["depth"])
        context = dict(u.get("context_embedder_config") or {}).get("params", {})
        return "sd3", "SD3Transformer2DModel", dict(
            sample_size=128, patch_size=int(u.get("patch_size", 2)), in_channels=int(u["in_channels"]),
            num_layers=int(u.get("num_blocks") or depth), attention_head_dim=64, num_attention_heads=depth,
            joint_attention_dim=int(context.get("in_features", 4096)), caption_projection_dim=64 * depth,
            pooled_projection_dim=int(u.get("adm_in_channels") or 2048),
            out_channels=int(u.get("out_channels") or u["in_channels"]), pos_embed_max_size=int(u.get("pos_embed_max_size") or 96),
            dual_attention_layers=tuple(u.get("x_block_self_attn_layers") or ()),
            qk_norm="rms_norm" if u.get("qk_norm") == "rms" else None)
    raise ModelMismatchError(f"this rectified-flow MODEL ({type(base_model.model_config).__name__}) is neither an SD3/SD3.5 "
                             "MMDiT nor a Flux model: the trainer knows those (and SD1.5/SD2/SDXL UNets)")


def comfy_flow_table(base_model) -> ModuleTable:
    """The LoRA engine's table of ComfyUI's SD3/Flux model: the shipped sd35-medium/large or flux-dev/schnell
    table when the module shapes are that model's, else one built on `meta` from the equivalent diffusers config."""
    import diffusers

    from spo_core.lora.table_build import table_from_transformer
    from spo_core.lora.tables import FAMILY, FLOW_ARCHS

    family, cls_name, config = _diffusers_flow_config(base_model)
    with torch.device("meta"):
        model = getattr(diffusers, cls_name).from_config(config)
    built = table_from_transformer(f"custom-{family}", family, model)
    shapes = {k: m.shape for k, m in built.modules.items()}
    for arch in FLOW_ARCHS:  # the transformer decides (the shipped tables also list the text encoders)
        shipped = {k: m.shape for k, m in load_table(arch).modules.items() if k[0] == "transformer"}
        if FAMILY[arch] == family and shipped == shapes:
            name = type(base_model.model_config).__name__
            if family == "flux" and (arch == "flux-schnell") != (name == "FluxSchnell"):
                continue  # the same shapes: dev and schnell differ in their guidance embedding only
            return load_table(arch)
    return built


def comfy_module_table(base_model, arch: str) -> ModuleTable:
    """The LoRA engine's table of this UNet: the shipped one for real SD1.5/SD2/SDXL, otherwise built
    from the live model with ComfyUI's own diffusers <-> LDM name map (tiny and odd-sized UNets)."""
    if arch in ("sd15", "sd2", "sdxl"):
        return load_table(arch)
    import comfy.utils

    to_ldm = comfy.utils.unet_to_diffusers(dict(base_model.model_config.unet_config))
    by_ldm = {}
    for diffusers_key, ldm_key in to_ldm.items():
        if diffusers_key.endswith(".weight"):
            by_ldm[ldm_key[: -len(".weight")]] = diffusers_key[: -len(".weight")]
    modules = {}
    for name, mod in base_model.diffusion_model.named_modules():
        kind = "linear" if isinstance(mod, nn.Linear) else "conv" if isinstance(mod, nn.Conv2d) else \
            "norm" if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)) else None
        if kind is None or name not in by_ldm or getattr(mod, "weight", None) is None:
            continue
        info = ModuleInfo("unet", by_ldm[name], kind, tuple(mod.weight.shape), name)
        modules[("unet", info.name)] = info
    family = "sdxl" if arch.endswith("sdxl") else "sd1"
    return ModuleTable(arch, family, modules)


def unet_image_model(base_model) -> str | None:
    """ComfyUI's `image_model` of a DiT config ("flux", ...), None for UNets and MMDiT."""
    return dict(base_model.model_config.unet_config).get("image_model")


def is_transformer_model(base_model) -> bool:
    """A DiT (ComfyUI's SD3 MMDiT: `depth`, no `model_channels`; Flux: image_model "flux"), not an SD UNet."""
    u = dict(base_model.model_config.unet_config)
    return unet_image_model(base_model) is not None or ("depth" in u and "model_channels" not in u)


def training_arch(model) -> str:
    """The architecture a MODEL trains as: sd15/sd2/sdxl/custom-* for UNets, sd35-medium/large,
    flux-dev/schnell or custom-sd3/flux for ComfyUI's rectified-flow transformers."""
    base = getattr(model, "model", model)
    return comfy_flow_table(base).arch if is_transformer_model(base) else model_arch(model)


def _with_copied_streams(forward: Callable) -> Callable:
    """A block forward that adds its residuals into copies of its hidden-state inputs (positional tensors and
    img / txt / x), so a checkpoint's saved inputs stay as they were for the recomputation."""
    def copied(*args, **kwargs):
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.clone() if k in ("img", "txt", "x") and isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return forward(*args, **kwargs)

    return copied


def _repeat_to(t: torch.Tensor, length: int) -> torch.Tensor:
    return t.repeat(1, length // t.shape[1], 1) if t.shape[1] != length else t


class ComfyTrainDenoiser:
    """`denoise(x, sigma, cond) -> x0` with CFG, differentiable, on the MODEL's BaseModel."""

    def __init__(self, host: "ComfyTrainingHost", guidance_scale: float):
        self.host = host
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: TensorConditioning) -> torch.Tensor:
        host = self.host
        host.ensure_loaded()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        t = cond.tensors
        if host.distilled_guidance:  # Flux-dev: the guidance is the model's input, one pass (no CFG rows)
            return host.x0(x, sigma, t["c_crossattn"], t.get("c_y"), guidance=self.guidance_scale)
        if self.guidance_scale != 1.0:
            cc = torch.cat([t["u_crossattn"], t["c_crossattn"]])
            y = torch.cat([t["u_y"], t["c_y"]]) if "c_y" in t else None
            out = host.x0(torch.cat([x, x]), torch.cat([sigma, sigma]), cc, y)
            x0_u, x0_c = out.chunk(2)
            return x0_u + self.guidance_scale * (x0_c - x0_u)
        return host.x0(x, sigma, t["c_crossattn"], t.get("c_y"))


class ComfyTrainingHost:
    """TrainingHost (spo_core.training.host) over ComfyUI's MODEL / CLIP / VAE."""

    def __init__(self, model, clip=None, vae=None, model_name: str | None = None):
        import comfy.model_management

        self.patcher = model
        self.base = model.model
        self.clip = clip
        self.vae = vae
        self.transformer = is_transformer_model(self.base)  # an MMDiT / Flux, not a UNet
        self._table = comfy_flow_table(self.base) if self.transformer else None
        self.arch = self._table.arch if self.transformer else model_arch(model)
        self.is_sdxl = self.arch in ("sdxl", "custom-sdxl")
        self.pooled_as_y = self.is_sdxl or self.transformer  # SD3 and Flux take the pooled text embedding as y
        unet_config = dict(self.base.model_config.unet_config)
        self.distilled_guidance = bool(unet_config.get("guidance_embed", False))
        self.device = comfy.model_management.get_torch_device()
        self.dtype = self.base.get_dtype()
        self.schedule = noise_schedule(self.base)  # a FlowSchedule on CONST models (SD3, Flux, ModelSamplingSD3 patches)
        image_size = int(unet_config.get("image_size", 64) or 64)
        self.default_size = _DEFAULT_SIZE.get(self.arch, 512 if self.transformer else image_size * 8)
        self.latent_channels = int(getattr(self.base.latent_format, "latent_channels", 4))
        self._name = model_name
        self._checkpoint_patched: list[nn.Module] = []
        self._norm_hooks: list = []
        self.replaced_inference_params = 0

    # -- ComfyUI model management ----------------------------------------------------------------
    def ensure_loaded(self) -> None:
        """Have ComfyUI load the UNet fully on its device (it may have offloaded it for CLIP/VAE/scorer)."""
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        self._normalize_parameters()

    def _normalize_parameters(self) -> None:
        """Replace inference tensors among the UNet's parameters by normal copies (autograd needs them)."""
        import comfy.utils

        for name, p in list(self.base.diffusion_model.named_parameters()):
            if p.is_inference():
                comfy.utils.set_attr_param(self.base, f"diffusion_model.{name}", p.detach().clone())
                self.replaced_inference_params += 1

    def x0(self, x: torch.Tensor, sigma: torch.Tensor, crossattn: torch.Tensor, y: torch.Tensor | None,
           guidance: float | None = None) -> torch.Tensor:
        kwargs = {"y": y} if y is not None else {}
        if guidance is not None:
            kwargs["guidance"] = torch.full((x.shape[0],), float(guidance), device=x.device, dtype=torch.float32)
        return self.base.apply_model(x, sigma, c_crossattn=crossattn, **kwargs).to(x.dtype)

    # -- the TrainingHost protocol ---------------------------------------------------------------
    def module_table(self) -> ModuleTable:
        return self._table if self._table is not None else comfy_module_table(self.base, self.arch)

    def lora_root(self) -> LoRARoot:
        self.ensure_loaded()
        if unet_image_model(self.base) == "flux" and not self._norm_hooks:
            self._protect_norm_inputs()
        return LoRARoot(self.base, "ldm", "diffusion_model.")

    def _protect_norm_inputs(self) -> None:
        """ComfyUI's Flux blocks add their residuals in place (`txt += ...`, `x += ...`, inference code) into the
        tensors their LayerNorms saved for backward; while autograd records, each LayerNorm gets a copy of its
        input instead, so the in-place add no longer invalidates what backward needs (removed by `release`)."""
        def clone_input(module, args):
            if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
                return (args[0].clone(), *args[1:])
            return None

        for module in self.base.diffusion_model.modules():
            if isinstance(module, nn.LayerNorm):
                self._norm_hooks.append(module.register_forward_pre_hook(clone_input))

    def denoiser(self, guidance_scale: float) -> ComfyTrainDenoiser:
        return ComfyTrainDenoiser(self, guidance_scale)

    def _encode_one(self, text: str, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.clip.tokenize(text)
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        cond = cond.detach().clone().float()
        y = None
        if self.pooled_as_y:
            if pooled is None:
                raise ConfigError(f"this CLIP gives no pooled output, which an {self.arch} model needs: connect the "
                                  "checkpoint's CLIP")
            y = self.base.encode_adm(pooled_output=pooled.detach().clone().float(), width=width, height=height, crop_w=0,
                                     crop_h=0, target_width=width, target_height=height).detach().clone().float()
        return cond, y

    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str | None = None,
                       height: int | None = None, width: int | None = None) -> TensorConditioning:
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("the prompt list is empty")
        if self.clip is None:
            raise ConfigError("training on prompts needs the CLIP of the checkpoint: connect it to the Train node")
        h, w = height or self.default_size, width or self.default_size
        with torch.no_grad():
            conds = [self._encode_one(p, w, h) for p in prompts]
            neg = self._encode_one(negative_prompt or "", w, h)
        length = math.lcm(*[c.shape[1] for c, _ in conds], neg[0].shape[1])
        tensors = {
            "c_crossattn": torch.cat([_repeat_to(c, length) for c, _ in conds]).to(self.device),
            "u_crossattn": _repeat_to(neg[0], length).repeat(len(prompts), 1, 1).to(self.device),
        }
        if self.pooled_as_y:
            tensors["c_y"] = torch.cat([y for _, y in conds]).to(self.device)
            tensors["u_y"] = neg[1].repeat(len(prompts), 1).to(self.device)
        return TensorConditioning(tensors, {"arch": self.arch})

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ConfigError("scoring samples needs the VAE: connect the checkpoint's VAE to the Train node")
        with torch.no_grad():
            images = self.vae.decode(self.base.process_latent_out(x0.detach().float()))
        return images[..., :3].movedim(-1, 1).float().clone().clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ConfigError("training on images needs the VAE: connect the checkpoint's VAE")
        with torch.no_grad():
            latents = self.vae.encode(images.detach().float().movedim(1, -1).cpu())
        return self.base.process_latent_in(latents.float().clone()).to(self.device)

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.default_size, width or self.default_size
        if h % 8 or w % 8:
            raise ConfigError(f"width and height must be multiples of 8, got {w}x{h}")
        return (batch, self.latent_channels, h // 8, w // 8)

    def feature_module(self, where: str) -> nn.Module:
        if self.transformer:
            raise ConfigError(f"NCP-DPO reads UNet block features; {self.arch} is a rectified-flow transformer")
        unet = self.base.diffusion_model
        if where == "down":
            return unet.input_blocks[-1]
        if where == "mid":
            return unet.middle_block
        raise ConfigError(f"NCP features must come from 'down' or 'mid', got {where!r}")

    def set_gradient_checkpointing(self, enabled: bool, checkpoint_fn: Callable | None = None) -> None:
        """Checkpoint every UNet input/middle/output block (or transformer block) by wrapping its forward."""
        for block in self._checkpoint_patched:
            block.__dict__.pop("forward", None)
        self._checkpoint_patched = []
        if not enabled:
            return
        fn = checkpoint_fn or (lambda f, *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False, **k))
        net = self.base.diffusion_model
        if self.transformer:  # MMDiT joint blocks, Flux double and single blocks
            blocks = [b for name in ("joint_blocks", "double_blocks", "single_blocks") for b in getattr(net, name, [])]
        else:
            blocks = list(net.input_blocks) + [net.middle_block] + list(net.output_blocks)
        in_place = unet_image_model(self.base) == "flux"
        for block in blocks:
            original = block.forward
            if in_place:  # Flux blocks add into their inputs: copy them inside the recomputed region
                original = _with_copied_streams(original)

            def forward(*args, _original=original, **kwargs):
                return fn(_original, *args, **kwargs)

            block.forward = forward
            self._checkpoint_patched.append(block)

    def model_info(self) -> dict[str, str]:
        return {"name": self._name or f"ComfyUI {self.arch} model"}

    def release(self) -> None:
        self.set_gradient_checkpointing(False)
        for handle in self._norm_hooks:
            handle.remove()
        self._norm_hooks = []
