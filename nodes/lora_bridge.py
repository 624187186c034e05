"""LoRAs between spo_core and ComfyUI: a read LoRA as the key dict ComfyUI's patcher loads,
checked against the model's own LoRA key map first, and a live MODEL/CLIP as a weight
source for extraction.

Every module is named as kohya names it (`lora_unet_...`, `lora_te1_...`; SD3 / Flux transformers
in their original names with q/k/v fused, as `to_webui` writes them, and their T5 as `lora_te3_`);
a module that ComfyUI's key map does not list under that name (e.g. a text-encoder layer outside
the attention/MLP set) falls back to ComfyUI's generic name (`diffusion_model.<ldm path>`,
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
from spo_core.lora.naming import comfy_clip, comfy_name, kohya_name, original_kohya_name
from spo_core.lora.tables import FLOW_FAMILIES

from .host import clip_arch, model_arch

log = logging.getLogger(__name__)

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


def _generic_name(info, family: str) -> str | None:
    try:
        return comfy_name(info, family)
    except ValueError:
        return None


def target_arch(model) -> str:
    """The architecture of a MODEL as LoRAs name it: sd15/sd2/sdxl/custom-* for UNets, sd35-medium/large,
    flux-dev/schnell or custom-sd3/flux for ComfyUI's rectified-flow transformers."""
    from .comfy_training import training_arch

    return training_arch(model)


def check_arch(lora: LoRA, model, clip) -> str:
    """Refuse a LoRA made for another base model than the MODEL (and CLIP) it goes into."""
    te_arch = clip_arch(clip)
    if model is None:
        if te_arch is None:
            raise ModelMismatchError("this CLIP is not an SD1.5/SD2/SDXL/SD3/Flux text encoder; connect the checkpoint's CLIP")
        if te_arch in FLOW_FAMILIES:  # SD3.5 medium and large (Flux dev and schnell) share their text encoders
            if lora.table.family != te_arch:
                raise ModelMismatchError(f"this LoRA ({report(lora).summary_line()}) is made for {lora.arch} but the "
                                         f"CLIP is {te_arch}'s: connect the text encoders of a {lora.arch} model")
            return lora.arch
    arch = target_arch(model) if model is not None else te_arch
    lora.ensure_arch(arch, what=f"this LoRA ({report(lora).summary_line()})")
    if clip is not None and te_arch is not None and te_arch not in (arch, lora.table.family) \
            and any(c not in ("unet", "transformer") for c in lora.components()):
        raise ModelMismatchError(f"the CLIP is {te_arch} but the MODEL is {arch}: connect the CLIP of the same checkpoint")
    return arch


def _stored_entries(lora: LoRA) -> list[tuple[str, str, str | None, tuple[int, ...], int]]:
    """(kohya prefix, component, ComfyUI generic name, weight shape, modules) of every weight as `to_webui`
    stores it: one per module, except an SD3 / Flux transformer's fused q/k/v (one weight, several modules)."""
    family = lora.table.family
    infos = {(m.info.component, m.info.name): m.info for m in lora.modules.values()}
    infos.update({(d.info.component, d.info.name): d.info for d in lora.diffs.values()})
    out = []
    fused: dict[str, int] = {}
    for info in infos.values():
        if info.component == "transformer":
            fused[info.ldm] = fused.get(info.ldm, 0) + 1
            continue
        out.append((kohya_name(info, family), info.component, _generic_name(info, family), info.shape, 1))
    for ldm, count in fused.items():
        weight = lora.table.group(ldm) or lora.table.from_ldm(ldm)
        out.append((original_kohya_name(ldm), "transformer", f"diffusion_model.{ldm}", tuple(weight.shape), count))
    return out


def comfy_lora(lora: LoRA, model, clip, arch: str) -> ComfyLoRA:
    """Name every module so that ComfyUI's key map of this model/CLIP takes it (see module docstring)."""
    key_map, shapes = _key_maps(model, clip)
    webui = to_webui(lora)
    out = ComfyLoRA({})
    dropped_unet = dropped_te = 0
    bad: list[str] = []
    for src, component, generic, weight_shape, count in _stored_entries(lora):
        denoiser = component in ("unet", "transformer")
        if (model if denoiser else clip) is None:
            if denoiser:
                dropped_unet += count
            else:
                dropped_te += count
            continue
        target_name = next((n for n in (src, generic) if n is not None and n in key_map), None)
        if target_name is None:
            bad.append(f"{component}:{src} (no weight of this model is called {src})")
            continue
        shape = shapes.get(key_map[target_name])
        if shape is not None and math.prod(shape) != math.prod(weight_shape):
            bad.append(f"{component}:{src}: LoRA made for weight {list(weight_shape)}, model has {list(shape)}")
            continue
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha", ".diff", ".diff_b"):
            t = webui.get(src + suffix)
            if t is not None:
                out.state_dict[target_name + suffix] = t
        if denoiser:
            out.unet_modules += count
        else:
            out.te_modules += count
    if bad:
        raise ModelMismatchError(
            f"{len(bad)} modules of this LoRA do not exist in the connected model with the same shape, so ComfyUI "
            "would skip them:\n  " + "\n  ".join(bad[:12]) + (f"\n  ... and {len(bad) - 12} more" if len(bad) > 12 else "")
        )
    denoiser_name = "transformer" if lora.table.family in FLOW_FAMILIES else "UNet"
    if dropped_te:
        out.notes.append(f"{dropped_te} text-encoder modules not applied: no CLIP is connected")
    if dropped_unet:
        out.notes.append(f"{dropped_unet} {denoiser_name} modules not applied: no MODEL is connected")
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
    denoiser_name = "transformer" if lora.table.family in FLOW_FAMILIES else "UNet"
    lines.append(
        f"applied {converted.unet_modules} {denoiser_name} modules (strength {strength_model:g})"
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
        return f"{comfy_clip(component, self.table.family)}.transformer.{name}.weight"

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
