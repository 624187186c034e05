"""Building module tables from models: a diffusers UNet / Flux / SD3 transformer and its text encoders,
live, tiny, or instantiated on the `meta` device from the configs in `spo_core/configs/` (no weight is
loaded). The LDM names of UNet modules follow the original UNet's block arithmetic (tests check them
against diffusers' own single-file converter); the original names of Flux / SD3 modules come from
`flow_names.py`. `python -m spo_core.lora.table_build [ARCH ...]` regenerates the shipped tables.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch

from ..errors import ConfigError
from .tables import ALL_ARCHS, CONFIG_DIR, FAMILY, TABLE_DIR, TE_FOLDERS, ModuleInfo, ModuleTable, canonical_te_name

_TRANSFORMER_CLASSES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}

# resnet submodule names, diffusers -> LDM (ResBlock)
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


# -- the LDM naming rule ----------------------------------------------------------------


def _as_list(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def unet_ldm_prefixes(config: dict) -> dict[str, str]:
    """Map diffusers block prefixes (down_blocks.1.resnets.0, ...) to LDM ones (input_blocks.4.0, ...).

    Follows the original UNetModel's construction order: input_blocks[0] is conv_in, then each
    down block contributes one input block per layer and one for its downsampler; the middle
    block is resnet, attention, resnet; each up block contributes layers+1 output blocks, the
    last of which also holds the upsampler (after the attention, if any).
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    n = len(down_types)
    layers = _as_list(config.get("layers_per_block", 2), n)
    out: dict[str, str] = {}
    idx = 1
    for b, btype in enumerate(down_types):
        for i in range(layers[b]):
            out[f"down_blocks.{b}.resnets.{i}"] = f"input_blocks.{idx}.0"
            if "CrossAttn" in btype:
                out[f"down_blocks.{b}.attentions.{i}"] = f"input_blocks.{idx}.1"
            idx += 1
        if b < n - 1:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1
    out["mid_block.resnets.0"] = "middle_block.0"
    out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = "middle_block.2"
    rev_layers = list(reversed(layers))
    idx = 0
    for b, btype in enumerate(up_types):
        has_attn = "CrossAttn" in btype
        for i in range(rev_layers[b] + 1):
            out[f"up_blocks.{b}.resnets.{i}"] = f"output_blocks.{idx}.0"
            if has_attn:
                out[f"up_blocks.{b}.attentions.{i}"] = f"output_blocks.{idx}.1"
            if i == rev_layers[b] and b < len(up_types) - 1:
                out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{idx}.{2 if has_attn else 1}.conv"
            idx += 1
    return out


def unet_to_ldm(name: str, prefixes: dict[str, str]) -> str | None:
    """The LDM path of a diffusers UNet module path, or None if the module has no LDM twin."""
    if name in _TOP_TO_LDM:
        return _TOP_TO_LDM[name]
    parts = name.split(".")
    for cut in (5, 4, 3):  # longest block prefix first: down_blocks.0.downsamplers.0.conv
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = parts[cut:]
            if ".resnets." in head or head.startswith("mid_block.resnets"):
                tail = ".".join(rest)
                tail = _RESNET_TO_LDM.get(tail, tail)
                return f"{prefixes[head]}.{tail}" if tail else prefixes[head]
            return ".".join([prefixes[head], *rest]) if rest else prefixes[head]
    return None


# -- building tables from live or meta modules -----------------------------------------


def _module_kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Conv2d):
        return "conv"
    if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and getattr(module, "weight", None) is not None:
        return "norm"
    return None


def scan_modules(root: torch.nn.Module, component: str, ldm_prefixes: dict[str, str] | None = None) -> dict[tuple[str, str], ModuleInfo]:
    """List a model's weight-carrying modules (works on meta tensors: only shapes are read)."""
    out = {}
    for name, module in root.named_modules():
        kind = _module_kind(module)
        if kind is None or not name:
            continue
        ldm = unet_to_ldm(name, ldm_prefixes) if ldm_prefixes is not None else None
        if component in ("te1", "te2"):  # CLIP; T5 (te3) names are the same in every file
            name = canonical_te_name(name)
        out[(component, name)] = ModuleInfo(component, name, kind, tuple(module.weight.shape), ldm)
    return out


def table_from_models(arch: str, family: str, unet: torch.nn.Module | None, unet_config: dict | None,
                      text_encoders: Iterable[torch.nn.Module] = ()) -> ModuleTable:
    """A table for any diffusers UNet (+ transformers CLIP text encoders), e.g. a tiny test model."""
    modules: dict[tuple[str, str], ModuleInfo] = {}
    if unet is not None:
        config = dict(unet_config if unet_config is not None else unet.config)
        modules.update(scan_modules(unet, "unet", unet_ldm_prefixes(config)))
    for comp, te in zip(("te1", "te2"), text_encoders):
        if te is not None:
            modules.update(scan_modules(te, comp))
    return ModuleTable(arch, family, modules)


def table_from_transformer(arch: str, family: str, transformer: torch.nn.Module,
                           text_encoders: dict[str, torch.nn.Module] | None = None) -> ModuleTable:
    """A table for a diffusers Flux / SD3 transformer (live, meta or tiny), with original names, and its
    text encoders by component (te1 / te2 / te3) when given."""
    from .flow_names import original_names

    modules = scan_modules(transformer, "transformer")
    shapes = {name: info.shape for (_, name), info in modules.items() if info.kind != "norm"}
    names = original_names(family, shapes)
    for key, info in modules.items():
        if info.name in names:
            ldm, rows = names[info.name]
            modules[key] = replace(info, ldm=ldm, ldm_rows=rows)
    for comp, te in (text_encoders or {}).items():
        if te is not None:
            modules.update(scan_modules(te, comp))
    return ModuleTable(arch, family, modules)


def table_for_pipeline(pipe, arch: str | None = None) -> ModuleTable:
    """Table of a loaded diffusers pipeline (its UNet and text encoders, or its Flux/SD3 transformer)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and type(transformer).__name__ in _TRANSFORMER_CLASSES:
        family = _TRANSFORMER_CLASSES[type(transformer).__name__]
        tes = {comp: getattr(pipe, folder, None) for folder, comp in TE_FOLDERS[family].items()}
        return table_from_transformer(arch or f"custom-{family}", family, transformer, tes)
    family = "sdxl" if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time" else "sd1"
    tes = [getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)]
    return table_from_models(arch or f"custom-{family}", family, pipe.unet, dict(pipe.unet.config), [t for t in tes if t is not None])


def build_table(arch: str) -> ModuleTable:
    """Build a real architecture's table from the shipped diffusers configs on the meta device."""
    return table_from_config_folder(CONFIG_DIR / arch, arch, FAMILY[arch])


def table_from_config_folder(folder: Path, arch: str | None = None, family: str | None = None) -> ModuleTable:
    """The table of a diffusers model folder (its unet/ or transformer/ config and its text_encoder*/
    configs, built on `meta`): how custom and tiny models get exact names and shapes without loading
    a weight."""
    from ..errors import require

    diffusers = require("diffusers", "building module tables", "diffusers")
    transformer_config = folder / "transformer" / "config.json"
    if transformer_config.is_file() and not (folder / "unet" / "config.json").is_file():
        with open(transformer_config) as f:
            config = json.load(f)
        cls_name = config.get("_class_name")
        if cls_name not in _TRANSFORMER_CLASSES:
            raise ConfigError(f"{transformer_config}: transformer class {cls_name!r} is not supported; "
                              f"known: {', '.join(_TRANSFORMER_CLASSES)}")
        family = family or _TRANSFORMER_CLASSES[cls_name]
        with torch.device("meta"):
            model = getattr(diffusers, cls_name).from_config(config)
        return table_from_transformer(arch or f"custom-{family}", family, model, _meta_text_encoders(folder, family))
    with open(folder / "unet" / "config.json") as f:
        unet_config = json.load(f)
    if family is None:
        family = "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd1"
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(unet_config)
    tes = _meta_text_encoders(folder, family)
    return table_from_models(arch or f"custom-{family}", family, unet, unet_config, [tes.get("te1"), tes.get("te2")])


def _meta_text_encoders(folder: Path, family: str) -> dict[str, torch.nn.Module]:
    """The folder's text encoders (CLIP with or without projection, T5 encoder) on `meta`, by component."""
    from ..errors import require

    transformers = require("transformers", "building module tables", "scorers")
    out = {}
    for sub, comp in TE_FOLDERS.get(family, {}).items():
        path = folder / sub / "config.json"
        if not path.is_file():
            continue
        with open(path) as f:
            raw = json.load(f)
        cls_name = (raw.get("architectures") or ["CLIPTextModel"])[0]
        cfg = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype")}
        config = transformers.T5Config(**cfg) if cls_name == "T5EncoderModel" else transformers.CLIPTextConfig(**cfg)
        with torch.device("meta"):
            out[comp] = getattr(transformers, cls_name)(config)
    return out


def write_table(table: ModuleTable, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump(table.to_json(), f, separators=(",", ":"))


if __name__ == "__main__":  # regenerate the shipped tables: python -m spo_core.lora.table_build [ARCH ...]
    import sys

    for a in sys.argv[1:] or ALL_ARCHS:
        t = build_table(a)
        write_table(t, TABLE_DIR / f"{a}.json.gz")
        print(a, len(t.modules), "modules")
