"""Write a LoRA as kohya/webui, diffusers or PEFT.

- webui (default): kohya keys (`lora_unet_*`, `lora_te_*` / `lora_te1_*` / `lora_te2_*`),
  diffusers-style block names for SD1/SD2 and LDM-style for SDXL (as kohya writes them), an
  `alpha` per module, and kohya `ss_*` plus `modelspec.*` metadata so that both A1111 and Forge
  detect the base model. Loads in ComfyUI, the WebUI and diffusers. Flux / SD3: kohya
  sd-scripts' names, the original (BFL / MMDiT) ones with q/k/v fused (`fused.py`), and
  `lora_te1_` (CLIP-L) / `lora_te2_` (CLIP-G) / `lora_te3_` (T5-XXL) for their text encoders.
- comfy: ComfyUI's generic keys, `diffusion_model.<LDM/original name>.lora_down.weight` (+ alpha),
  text encoders under `text_encoders.clip_*.transformer.` (T5: `text_encoders.t5xxl.transformer.`).
- diffusers: `unet.<path>.lora.down.weight` / `text_encoder.<path>...` as diffusers'
  `save_lora_weights` writes; the alpha/rank scale is baked into `up` (that format has no alpha).
  Flux / SD3: `transformer.<path>.lora_A.weight` / `lora_B.weight`, q/k/v split.
- peft: a folder per component (`adapter_config.json` + `adapter_model.safetensors`, text
  encoders in the pipeline's subfolder names: `text_encoder/`, `text_encoder_2/`, `text_encoder_3/`),
  loadable with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ConfigError, InvalidTensorError, LoRAFormatError
from ..safe_io import atomic_folder, name_list, non_finite, save_safetensors
from .fused import diffs_original_layout, to_original_layout
from .model import LoRA
from .naming import comfy_name, diffusers_folder, diffusers_prefix, flatten, kohya_name
from .tables import FLOW_FAMILIES, table_metadata

FORMATS = ("webui", "comfy", "diffusers", "peft")
FORMAT_ALIASES = {"webui": "webui", "kohya": "webui", "a1111": "webui", "comfyui": "webui", "comfy": "comfy",
                  "diffusers": "diffusers", "peft": "peft"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
# modelspec architecture ids as kohya sd-scripts writes them (library/sai_model_spec.py)
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-768-v/lora",
                   "sdxl": "stable-diffusion-xl-v1-base/lora", "sd3": "stable-diffusion-3/lora", "flux": "flux-1/lora"}
_MODELSPEC_BY_ARCH = {"flux-dev": "flux-1-dev/lora", "flux-schnell": "flux-1-schnell/lora",
                      "sd35-medium": "stable-diffusion-3.5-medium/lora", "sd35-large": "stable-diffusion-3.5-large/lora"}
_IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models", "flux": "https://github.com/black-forest-labs/flux",
                   "sd3": "https://github.com/Stability-AI/sd3.5"}


def normalize_format(fmt: str) -> str:
    try:
        return FORMAT_ALIASES[fmt.lower()]
    except KeyError:
        raise ConfigError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}") from None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose fp32, fp16 or bf16") from None


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _single(counter: Counter) -> str:
    return f"{next(iter(counter)):g}" if len(counter) == 1 else "Dynamic"


def kohya_metadata(lora: LoRA, title: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """kohya `ss_*` and SAI `modelspec.*` metadata; the source file's other keys are kept."""
    family = lora.table.family
    meta = {k: v for k, v in lora.metadata.items() if isinstance(v, str)}
    ranks, alphas = lora.ranks(), lora.alphas()
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": _single(ranks) if ranks else "0",
        "ss_network_alpha": _single(alphas) if alphas else "0",
        "ss_base_model_version": _BASE_VERSION[family],
        "ss_v2": str(family == "sd2"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _MODELSPEC_BY_ARCH.get(lora.arch, _MODELSPEC_ARCH[family]),
        "modelspec.implementation": _IMPLEMENTATION.get(family, "diffusers"),
    })
    convs = [m for m in lora.modules.values() if m.info.kind == "conv" and m.info.shape[2] > 1]
    if convs:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(max(m.rank for m in convs)),
                                              "conv_alpha": f"{max(m.alpha for m in convs):g}"})
    meta.update(_own_table(lora))
    if title:
        meta["ss_output_name"] = title
        meta["modelspec.title"] = title
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def _own_table(lora: LoRA) -> dict[str, str]:
    """The custom model's module table (shapes), so the file reads without that model later; for
    Flux dev/schnell (whose tables differ only in the guidance embedder) the architecture id."""
    infos = [m.info for m in lora.modules.values()] + [d.info for d in lora.diffs.values()]
    meta = table_metadata(lora.table, infos)
    if lora.arch in _MODELSPEC_BY_ARCH:
        meta["modelspec.architecture"] = _MODELSPEC_BY_ARCH[lora.arch]
    return meta


def _original_layout(lora: LoRA, prefix: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Flux/SD3 in their original names, fused weights fused: kohya (`lora_unet_`) or ComfyUI (`diffusion_model.`)."""
    def key(name: str) -> str:
        return prefix + (flatten(name) if prefix == "lora_unet_" else name)

    out: dict[str, torch.Tensor] = {}
    for s in to_original_layout(lora):
        out[f"{key(s.name)}.lora_down.weight"] = _cast(s.down, dtype)
        out[f"{key(s.name)}.lora_up.weight"] = _cast(s.up, dtype)
        out[f"{key(s.name)}.alpha"] = torch.tensor(float(s.alpha), dtype=torch.float32)
    for name, diff, diff_b in diffs_original_layout(lora):
        if diff is not None:
            out[f"{key(name)}.diff"] = _cast(diff, dtype)
        if diff_b is not None:
            out[f"{key(name)}.diff_b"] = _cast(diff_b, dtype)
    return out


def to_webui(lora: LoRA, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya/webui state dict (names as kohya writes them for the LoRA's family)."""
    family = lora.table.family
    out = _original_layout(lora, "lora_unet_", dtype) if family in FLOW_FAMILIES else {}
    out.update(_per_module(lora, lambda info: kohya_name(info, family), dtype))
    return out


def to_comfy(lora: LoRA, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI's generic format: `diffusion_model.<LDM/original name>` (fused for Flux/SD3), kohya suffixes."""
    family = lora.table.family

    def name(info) -> str:
        try:
            return comfy_name(info, family)
        except ValueError as exc:
            raise LoRAFormatError(f"cannot write the comfy format: {exc}; write webui/kohya instead") from None

    out = _original_layout(lora, "diffusion_model.", dtype) if family in FLOW_FAMILIES else {}
    out.update(_per_module(lora, name, dtype))
    return out


def _per_module(lora: LoRA, name_of, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Modules stored one key prefix each (every SD module; a Flux/SD3 LoRA's text encoders), kohya suffixes."""
    out: dict[str, torch.Tensor] = {}
    for m in lora.modules.values():
        if m.info.component == "transformer":
            continue  # written fused by _original_layout
        name = name_of(m.info)
        out[f"{name}.lora_down.weight"] = _cast(m.down, dtype)
        out[f"{name}.lora_up.weight"] = _cast(m.up, dtype)
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    for d in lora.diffs.values():
        if d.info.component == "transformer":
            continue
        name = name_of(d.info)
        if d.diff is not None:
            out[f"{name}.diff"] = _cast(d.diff, dtype)
        if d.diff_b is not None:
            out[f"{name}.diff_b"] = _cast(d.diff_b, dtype)
    return out


def _require_no_diffs(lora: LoRA, fmt: str) -> None:
    if lora.diffs:
        names = ", ".join(f"{c}:{n}" for c, n in list(lora.diffs)[:5])
        raise LoRAFormatError(
            f"the {fmt} format cannot hold full weight differences (.diff/.diff_b) of {len(lora.diffs)} "
            f"modules ({names}...); write it as webui/kohya instead"
        )


def _baked(m, dtype):
    """(down, up) with the alpha/rank scale folded into up, for formats without alpha."""
    up = m.up if m.scale == 1.0 else (m.up.float() * m.scale).to(m.up.dtype)
    return _cast(m.down, dtype), _cast(up, dtype)


def to_diffusers(lora: LoRA, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """diffusers layout: `unet.<path>.lora.down.weight` (as the SPO release),
    `text_encoder.<path>.lora_linear_layer.down.weight`, and `transformer.<path>.lora_A.weight`
    (Flux/SD3: what their pipelines' `save_lora_weights` writes; their text encoders likewise under
    `text_encoder.` / `text_encoder_2.`, T5 under `text_encoder_3.` (SD3) or `text_encoder_2.` (Flux)).

    One suffix per component on purpose: diffusers decides how to convert a UNet state dict
    from its first key only, so mixing `.lora.down` and `.lora_A` would drop modules.
    """
    _require_no_diffs(lora, "diffusers")
    out = {}
    for m in lora.modules.values():
        down, up = _baked(m, dtype)
        prefix = diffusers_prefix(m.info, lora.table.family)
        if m.info.component == "transformer" or lora.table.family in FLOW_FAMILIES:
            out[f"{prefix}.lora_A.weight"] = down
            out[f"{prefix}.lora_B.weight"] = up
            continue
        part = "lora" if m.info.component == "unet" else "lora_linear_layer"
        out[f"{prefix}.{part}.down.weight"] = down
        out[f"{prefix}.{part}.up.weight"] = up
    return out


def to_peft(lora: LoRA, dtype: torch.dtype | None = None) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """Per component (unet or transformer, te1, te2, te3): (PEFT adapter state dict, adapter_config.json content)."""
    _require_no_diffs(lora, "peft")
    out = {}
    for comp in lora.components():
        mods = [m for (c, _), m in lora.modules.items() if c == comp]
        ranks = Counter(m.rank for m in mods)
        alphas = Counter(m.alpha for m in mods)
        r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
        sd = {}
        for m in mods:
            sd[f"base_model.model.{m.info.name}.lora_A.weight"] = _cast(m.down, dtype)
            sd[f"base_model.model.{m.info.name}.lora_B.weight"] = _cast(m.up, dtype)
        config = {
            "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
            "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "target_modules": sorted(m.info.name for m in mods),
            "rank_pattern": {re.escape(m.info.name): m.rank for m in mods if m.rank != r},
            "alpha_pattern": {re.escape(m.info.name): m.alpha for m in mods if m.alpha != alpha},
            "base_model_name_or_path": None, "inference_mode": True,
        }
        out[comp] = (sd, config)
    return out


def _refuse_non_finite(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None, path: Path, lora: LoRA) -> None:
    """Refuse an output holding NaN or inf. A LoRA checked when read is finite, and so is every view of its
    tensors (a fused weight's rows, an unchanged factor): only the tensors this write computed (casts, baked
    scales, fused concatenations, alphas) are checked, so an inf here is a value the output dtype cannot hold."""
    checked = lora.checked_storages()
    fresh = {k: t for k, t in tensors.items() if t.untyped_storage().data_ptr() not in checked} if checked else tensors
    bad = non_finite(fresh)
    if not bad:
        return
    if dtype is not None and dtype != torch.float32:
        largest = torch.finfo(dtype).max
        raise InvalidTensorError(
            f"{path}: {len(bad)} tensors hold values beyond {str(dtype).replace('torch.', '')}'s range (+-{largest:g}) "
            f"and would be written as inf: {name_list(bad)}. Keep fp32, or use bf16")
    raise InvalidTensorError(f"{path}: {len(bad)} tensors would be written with NaN or inf: {name_list(bad)}")


def save_lora(
    lora: LoRA,
    path: str | os.PathLike,
    fmt: str = "webui",
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    title: str | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `lora` in `fmt` (webui/kohya, comfy, diffusers, peft) atomically; returns the path written.

    For peft, `path` is a folder, built beside its place and swapped in whole (an old adapter's
    text-encoder folders never survive into the new one). Refuses an existing output unless
    `overwrite`, and tensors the output dtype cannot hold (written as inf otherwise).
    """
    fmt = normalize_format(fmt)
    dt = resolve_dtype(dtype)
    path = Path(path)
    if fmt == "webui":
        tensors = to_webui(lora, dt)
        _refuse_non_finite(tensors, dt, path, lora)
        return save_safetensors(tensors, path, kohya_metadata(lora, title or path.stem, extra_metadata), overwrite=overwrite)
    if fmt == "comfy":
        tensors = to_comfy(lora, dt)
        _refuse_non_finite(tensors, dt, path, lora)
        return save_safetensors(tensors, path, kohya_metadata(lora, title or path.stem, extra_metadata), overwrite=overwrite)
    if fmt == "diffusers":
        meta = {k: str(v) for k, v in (extra_metadata or {}).items()}
        meta.update(_own_table(lora))
        meta["format"] = "pt"
        tensors = to_diffusers(lora, dt)
        _refuse_non_finite(tensors, dt, path, lora)
        return save_safetensors(tensors, path, meta, overwrite=overwrite)
    parts = to_peft(lora, dt)
    for sd, _ in parts.values():
        _refuse_non_finite(sd, dt, path, lora)
    with atomic_folder(path, overwrite=overwrite) as tmp:
        for comp, (sd, config) in parts.items():
            folder = tmp if comp in ("unet", "transformer") else tmp / diffusers_folder(comp, lora.table.family)
            folder.mkdir(exist_ok=True)
            save_safetensors(sd, folder / "adapter_model.safetensors", {"format": "pt", **_own_table(lora)}, overwrite=True)
            (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path
