"""LoRAs between spo_core and ComfyUI: a read LoRA as the key dict ComfyUI's patcher loads,
checked against the model's own LoRA key map first, and a live MODEL/CLIP as a weight
source for extraction.

Every module is named as kohya names it (`lora_unet_...`, `lora_te1_...`); a module that
ComfyUI's key map does not list under that name (e.g. a text-encoder layer outside the
attention/MLP set) falls back to ComfyUI's generic name (`diffusion_model.<ldm path>`,
`text_encoders.clip_l.transformer.<path>`). A module that fits neither, or whose shape differs
from the model's weight, stops the load before anything is patched: ComfyUI itself would only
log "lora key not loaded" and apply the rest.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from spo_core.errors import LoRAFormatError, ModelMismatchError
from spo_core.lora import LoRA, ModuleTable, load_table, read_lora, report, to_webui
from spo_core.lora.naming import kohya_name

from .host import clip_arch, model_arch

log = logging.getLogger(__name__)

_TE_CLIP = {("te1", "sd15"): "clip_l", ("te1", "sdxl"): "clip_l", ("te1", "sd2"): "clip_h", ("te2", "sdxl"): "clip_g"}


# -- reading, cached ---------------------------------------------------------------------------


class FileCache:
    """A small LRU of values derived from files, keyed by (paths, mtimes, sizes, options)."""

    def __init__(self, size: int = 4):
        self.size = size
        self.items: OrderedDict = OrderedDict()

    @staticmethod
    def key(paths: tuple[str, ...], *options) -> tuple:
        stamps = []
        for p in paths:
            st = os.stat(p)
            stamps.append((os.path.realpath(p), st.st_mtime_ns, st.st_size))
        return (tuple(stamps), options)

    def get(self, key):
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def clear(self) -> None:
        self.items.clear()


LORA_CACHE = FileCache(4)


def read_lora_cached(path: str) -> LoRA:
    key = FileCache.key((path,))
    lora = LORA_CACHE.get(key)
    if lora is None:
        lora = read_lora(path)
        LORA_CACHE.put(key, lora)
    return lora


# -- LoRA -> ComfyUI key dict -------------------------------------------------------------------


@dataclass
class ComfyLoRA:
    """The state dict handed to comfy.sd.load_lora_for_models, and what happened on the way."""

    state_dict: dict[str, torch.Tensor]
    unet_modules: int = 0
    te_modules: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def modules(self) -> int:
        return self.unet_modules + self.te_modules


def _key_maps(model, clip) -> tuple[dict[str, str], dict[str, torch.Size]]:
    import comfy.lora

    key_map: dict[str, str] = {}
    shapes: dict[str, torch.Size] = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
        shapes.update({k: v.shape for k, v in model.model.state_dict().items()})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        shapes.update({k: v.shape for k, v in clip.cond_stage_model.state_dict().items()})
    return key_map, shapes


def _generic_name(info, arch: str) -> str | None:
    if info.component == "unet":
        return f"diffusion_model.{info.ldm}" if info.ldm else None
    clip = _TE_CLIP.get((info.component, arch))
    return f"text_encoders.{clip}.transformer.{info.name}" if clip else None


def check_arch(lora: LoRA, model, clip) -> str:
    """Refuse a LoRA made for another base model than the MODEL (and CLIP) it goes into."""
    arch = model_arch(model) if model is not None else clip_arch(clip)
    if arch is None:
        raise ModelMismatchError("this CLIP is not an SD1.5/SD2/SDXL text encoder; connect the checkpoint's CLIP")
    lora.ensure_arch(arch, what=f"this LoRA ({report(lora).summary_line()})")
    te_arch = clip_arch(clip)
    if clip is not None and te_arch is not None and te_arch != arch and any(c != "unet" for c in lora.components()):
        raise ModelMismatchError(f"the CLIP is {te_arch} but the MODEL is {arch}: connect the CLIP of the same checkpoint")
    return arch


def comfy_lora(lora: LoRA, model, clip, arch: str) -> ComfyLoRA:
    """Name every module so that ComfyUI's key map of this model/CLIP takes it (see module docstring)."""
    key_map, shapes = _key_maps(model, clip)
    webui = to_webui(lora)
    family = lora.table.family
    out = ComfyLoRA({})
    dropped_unet = dropped_te = 0
    bad: list[str] = []
    entries = [(info, "lora") for info in (m.info for m in lora.modules.values())]
    entries += [(info, "diff") for info in (d.info for d in lora.diffs.values())]
    for info, _kind in entries:
        if info.component == "unet" and model is None:
            dropped_unet += 1
            continue
        if info.component != "unet" and clip is None:
            dropped_te += 1
            continue
        src = kohya_name(info, family)
        target_name = None
        for name in (src, _generic_name(info, arch)):
            if name is not None and name in key_map:
                target_name = name
                break
        if target_name is None:
            bad.append(f"{info.component}:{info.name} (no weight of this model is called {src})")
            continue
        weight_key = key_map[target_name]
        shape = shapes.get(weight_key)
        if shape is not None and math.prod(shape) != math.prod(info.shape):
            bad.append(f"{info.component}:{info.name}: LoRA made for weight {list(info.shape)}, model has {list(shape)}")
            continue
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha", ".diff", ".diff_b"):
            t = webui.get(src + suffix)
            if t is not None:
                out.state_dict[target_name + suffix] = t
        if info.component == "unet":
            out.unet_modules += 1
        else:
            out.te_modules += 1
    if bad:
        raise ModelMismatchError(
            f"{len(bad)} modules of this LoRA do not exist in the connected model with the same shape, so ComfyUI "
            "would skip them:\n  " + "\n  ".join(bad[:12]) + (f"\n  ... and {len(bad) - 12} more" if len(bad) > 12 else "")
        )
    if dropped_te:
        out.notes.append(f"{dropped_te} text-encoder modules not applied: no CLIP is connected")
    if dropped_unet:
        out.notes.append(f"{dropped_unet} UNet modules not applied: no MODEL is connected")
    return out


def apply_lora(model, clip, lora: LoRA, strength_model: float, strength_clip: float,
               allow_partial: bool = False, source: str = "LoRA") -> tuple[object, object, str]:
    """Check, convert and apply a read LoRA through ComfyUI's own patching; returns (MODEL, CLIP, report text)."""
    lora.require_clean(allow_partial=allow_partial, what=source)
    arch = check_arch(lora, model, clip)
    use_clip = clip if strength_clip != 0 else None
    use_model = model if strength_model != 0 else None
    lines = [report(lora, source if os.path.exists(source) else None).to_text(), ""]
    if use_model is None and use_clip is None:
        lines.append("both strengths are 0: nothing applied")
        return model, clip, "\n".join(lines)
    converted = comfy_lora(lora, use_model, use_clip, arch)
    if not converted.state_dict:
        raise LoRAFormatError(f"{source}: nothing to apply to the connected inputs ({'; '.join(converted.notes)})")
    import comfy.sd

    new_model, new_clip = comfy.sd.load_lora_for_models(use_model, use_clip, converted.state_dict, strength_model, strength_clip)
    lines.append(
        f"applied {converted.unet_modules} UNet modules (strength {strength_model:g})"
        + (f" and {converted.te_modules} text-encoder modules (strength {strength_clip:g})" if use_clip is not None else "")
        + f" to a {arch} model"
    )
    lines += converted.notes
    if not lora.is_clean():
        lines.append(f"partial match allowed: {len(lora.unmatched)} keys of the file were not used")
    return (new_model if new_model is not None else model), (new_clip if new_clip is not None else clip), "\n".join(lines)


# -- a live MODEL / CLIP as a weight source (extraction) ------------------------------------------


class ComfyWeightSource:
    """Weights of a ComfyUI MODEL (and CLIP) by canonical module name, with their LoRA patches applied.

    Reads ComfyUI's own key patches (the original weight plus every patch on this clone), so a
    MODEL that is "checkpoint + LoRAs" gives its effective weights whether or not it is loaded.
    """

    def __init__(self, model, clip=None, arch: str | None = None):
        self.arch = arch or model_arch(model)
        if self.arch not in ("sd15", "sd2", "sdxl"):
            raise ModelMismatchError(f"extraction needs a real SD1.5/SD2/SDXL model, this one is {self.arch}")
        self.table: ModuleTable = load_table(self.arch)
        self.model = model
        self.clip = clip
        self._patches: dict[str, dict] = {}

    def _key_patches(self, part: str) -> dict:
        if part not in self._patches:
            if part == "unet":
                self._patches[part] = self.model.get_key_patches("diffusion_model.")
            else:
                self._patches[part] = self.clip.patcher.get_key_patches() if self.clip is not None else {}
        return self._patches[part]

    def _key(self, component: str, name: str) -> str | None:
        info = self.table.get(component, name)
        if info is None:
            return None
        if component == "unet":
            return f"diffusion_model.{info.ldm}.weight" if info.ldm else None
        clip = _TE_CLIP.get((component, self.arch))
        return f"{clip}.transformer.{name}.weight" if clip else None

    def weight(self, component: str, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        key = self._key(component, name)
        if key is None:
            return None
        entry = self._key_patches("unet" if component == "unet" else "te").get(key)
        if entry is None:
            return None
        import comfy.lora

        base, convert = entry[0]
        w = base.to(torch.float32).clone()
        if convert is not None:
            w = convert(w, inplace=True)
        if len(entry) > 1:
            w = comfy.lora.calculate_weight(entry[1:], w, key)
        info = self.table.get(component, name)
        if tuple(w.shape) != info.shape and w.numel() == math.prod(info.shape):
            w = w.reshape(info.shape)
        return w.to(dtype)
