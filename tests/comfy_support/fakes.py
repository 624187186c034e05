"""Stand-in MODEL / CLIP / VAE objects for the contract tests (with the stub `comfy` on sys.path).

A fake MODEL is the stub ModelPatcher over an object that looks like ComfyUI's BaseModel to
the nodes: a `model_config` whose class is named like ComfyUI's (SD15, SDXL) and a state dict
with ComfyUI's key names (`diffusion_model.<LDM path>.weight`). The weights are real tensors
for a handful of modules (or meta tensors of the real shapes), so key maps, shapes and
extraction see what they would see on a real model.
"""

from __future__ import annotations

import torch

from spo_core.lora import load_table

_CONTEXT = {"sd15": 768, "sd2": 1024, "sdxl": 2048}
_CLIP_PREFIX = {("sd15", "te1"): "clip_l", ("sdxl", "te1"): "clip_l", ("sdxl", "te2"): "clip_g"}


def _config_class(name: str):
    return type(name, (), {})


SD15Config = _config_class("SD15")
SDXLConfig = _config_class("SDXL")


class FakeBaseModel:
    def __init__(self, arch: str, tensors: dict[str, torch.Tensor]):
        cfg = (SDXLConfig if arch == "sdxl" else SD15Config)()
        cfg.unet_config = {"model_channels": 320, "context_dim": _CONTEXT[arch], "transformer_depth": [1],
                           "adm_in_channels": 2816 if arch == "sdxl" else None}
        self.model_config = cfg
        self.tensors = tensors

    def state_dict(self):
        return dict(self.tensors)

    def to(self, device):
        return self

    def parameters(self):
        return iter(self.tensors.values())


class FakeClipModel:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self):
        return dict(self.tensors)

    def to(self, device):
        return self

    def parameters(self):
        return iter(self.tensors.values())


class SD1ClipModel(FakeClipModel):
    pass


class SDXLClipModel(FakeClipModel):
    pass


class FakeCLIP:
    def __init__(self, cond_stage_model, patcher):
        self.cond_stage_model = cond_stage_model
        self.patcher = patcher

    def clone(self):
        return FakeCLIP(self.cond_stage_model, self.patcher.clone())

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)


def unet_modules(arch: str, groups=("attn",), block: str | None = None, limit: int | None = None):
    mods = [m for m in load_table(arch).select(("unet",), groups) if block is None or m.name.startswith(block)]
    return mods[:limit] if limit else mods


def te_modules(arch: str, layer: int = 0):
    prefix = f"text_model.encoder.layers.{layer}."
    return [m for m in load_table(arch).select(("te1", "te2")) if m.name.startswith(prefix) and m.kind == "linear"]


def fake_model(arch: str, modules, device: str = "meta", seed: int = 0, scale: float = 0.02):
    """A stub ModelPatcher whose UNet holds `modules` (ModuleInfo) under ComfyUI's key names."""
    from comfy.model_patcher import ModelPatcher

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        key = f"diffusion_model.{m.ldm}.weight"
        tensors[key] = torch.empty(m.shape, device="meta") if device == "meta" else torch.randn(m.shape, generator=g) * scale
    return ModelPatcher(FakeBaseModel(arch, tensors), torch.device("cpu"), torch.device("cpu"))


def fake_clip(arch: str, modules, device: str = "meta", seed: int = 1, scale: float = 0.02) -> FakeCLIP:
    from comfy.model_patcher import ModelPatcher

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        key = f"{_CLIP_PREFIX[(arch, m.component)]}.transformer.{m.name}.weight"
        tensors[key] = torch.empty(m.shape, device="meta") if device == "meta" else torch.randn(m.shape, generator=g) * scale
    inner = (SDXLClipModel if arch == "sdxl" else SD1ClipModel)(tensors)
    return FakeCLIP(inner, ModelPatcher(inner, torch.device("cpu"), torch.device("cpu")))
