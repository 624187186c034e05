"""Module tables: every weight-carrying module of an SD UNet and its text encoders.

A `ModuleTable` lists, for one architecture, each Linear / Conv2d / norm module by its
canonical name (the diffusers / transformers module path), its LDM/SGM name (UNet only:
`input_blocks.4.1...`, used by ComfyUI, the WebUI and single-file checkpoints), its kind and
its weight shape. Every naming scheme of every LoRA format is derived from these two names
(see `naming.py`), so the tables are the one source of truth.

The tables of the real SD1.5, SD2.x and SDXL models are built from the diffusers configs in
`spo_core/configs/` by instantiating the models on the `meta` device (`build_table`), and
shipped in the package as JSON (`tables/*.json.gz`) so that hosts without diffusers (the
WebUI pins transformers 4.30 and has no diffusers) need only torch to use them. The LDM
names follow the block arithmetic of the original UNet; tests check them against diffusers'
own single-file converter.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..errors import ConfigError, ModelMismatchError

TABLE_DIR = Path(__file__).parent / "tables"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

KNOWN_ARCHS = ("sd15", "sd2", "sdxl")
FAMILY = {"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
COMPONENTS = ("unet", "te1", "te2")

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


@dataclass(frozen=True)
class ModuleInfo:
    """One weight-carrying module. `shape` is the weight's shape: [out, in] or [out, in, kh, kw] or [C]."""

    component: str  # "unet", "te1" or "te2"
    name: str  # canonical diffusers/transformers module path
    kind: str  # "linear", "conv" or "norm"
    shape: tuple[int, ...]
    ldm: str | None = None  # LDM/SGM path (UNet only)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """Input size of the flattened weight (in * kh * kw for convs)."""
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def group(self) -> str:
        """Which kind of layer, for reports and target sets: attn, ff, proj, resnet, conv, embed, norm, te."""
        n = self.name
        if self.component != "unet":
            return "te"
        if self.kind == "norm":
            return "norm"
        if ".attn1." in n or ".attn2." in n:
            return "attn"
        if ".ff." in n:
            return "ff"
        if n.endswith("proj_in") or n.endswith("proj_out"):
            return "proj"
        if ".resnets." in n:
            return "resnet"
        if "embedding" in n:
            return "embed"
        return "conv"  # conv_in/out, samplers

    @property
    def block(self) -> str:
        """The UNet block a module belongs to (down_blocks.1, mid_block, up_blocks.0, top) or the TE."""
        if self.component != "unet":
            return self.component
        parts = self.name.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            return ".".join(parts[:2])
        if parts[0] == "mid_block":
            return "mid_block"
        return "top"


@dataclass
class ModuleTable:
    """All weight-carrying modules of one architecture, indexed by canonical and LDM names."""

    arch: str  # sd15 / sd2 / sdxl, or a free name for custom (tiny) models
    family: str  # sd1 / sd2 / sdxl: decides kohya naming and metadata
    modules: dict[tuple[str, str], ModuleInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_ldm = {m.ldm: m for m in self.modules.values() if m.ldm}

    def get(self, component: str, name: str) -> ModuleInfo | None:
        return self.modules.get((component, name))

    def from_ldm(self, ldm_name: str) -> ModuleInfo | None:
        return self._by_ldm.get(ldm_name)

    def components(self) -> list[str]:
        return sorted({c for c, _ in self.modules}, key=COMPONENTS.index)

    def select(self, components: Iterable[str] = ("unet",), groups: Iterable[str] | None = None, kinds=("linear", "conv")) -> list[ModuleInfo]:
        comps, grps = set(components), set(groups) if groups is not None else None
        return [
            m for m in self.modules.values()
            if m.component in comps and m.kind in kinds and (grps is None or m.group in grps or (m.component != "unet" and "te" in grps))
        ]

    @property
    def cross_attention_dim(self) -> int | None:
        for m in self.modules.values():
            if m.component == "unet" and m.name.endswith("attn2.to_k"):
                return m.shape[1]
        return None

    # -- serialization -------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "arch": self.arch,
            "family": self.family,
            "modules": [[m.component, m.name, m.kind, list(m.shape), m.ldm] for m in self.modules.values()],
        }

    @classmethod
    def from_json(cls, data: dict) -> "ModuleTable":
        mods = {}
        for comp, name, kind, shape, ldm in data["modules"]:
            mods[(comp, name)] = ModuleInfo(comp, name, kind, tuple(shape), ldm)
        return cls(data["arch"], data["family"], mods)


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
        if component != "unet":
            name = canonical_te_name(name)
        out[(component, name)] = ModuleInfo(component, name, kind, tuple(module.weight.shape), ldm)
    return out


def canonical_te_name(name: str) -> str:
    """transformers 5 flattened CLIPTextModel (`encoder.layers...`); LoRA files use `text_model.encoder...`."""
    if name.startswith("text_model.") or name.startswith("text_projection"):
        return name
    return "text_model." + name


def live_te_name(canonical: str, text_encoder: torch.nn.Module) -> str:
    """The module path of a canonical text-encoder name inside a live (possibly flattened) model."""
    if canonical.startswith("text_model.") and not hasattr(text_encoder, "text_model"):
        return canonical[len("text_model."):]
    return canonical


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


def table_for_pipeline(pipe, arch: str | None = None) -> ModuleTable:
    """Table of a loaded diffusers pipeline (its UNet and text encoders)."""
    family = "sdxl" if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time" else "sd1"
    tes = [getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)]
    return table_from_models(arch or f"custom-{family}", family, pipe.unet, dict(pipe.unet.config), [t for t in tes if t is not None])


def build_table(arch: str) -> ModuleTable:
    """Build a real architecture's table from the shipped diffusers configs on the meta device."""
    return table_from_config_folder(CONFIG_DIR / arch, arch, FAMILY[arch])


def table_from_config_folder(folder: Path, arch: str | None = None, family: str | None = None) -> ModuleTable:
    """The table of a diffusers model folder (its unet/ and text_encoder*/ configs, built on `meta`):
    how custom and tiny models get exact names and shapes without loading a weight."""
    from ..errors import require

    diffusers = require("diffusers", "building module tables", "diffusers")
    transformers = require("transformers", "building module tables", "scorers")
    with open(folder / "unet" / "config.json") as f:
        unet_config = json.load(f)
    tes = []
    for comp, cls in (("text_encoder", transformers.CLIPTextModel), ("text_encoder_2", transformers.CLIPTextModelWithProjection)):
        path = folder / comp / "config.json"
        if path.is_file():
            with open(path) as f:
                cfg = {k: v for k, v in json.load(f).items() if k not in ("architectures", "model_type", "torch_dtype")}
            with torch.device("meta"):
                tes.append(cls(transformers.CLIPTextConfig(**cfg)))
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(unet_config)
    if family is None:
        family = "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd1"
    return table_from_models(arch or f"custom-{family}", family, unet, unet_config, tes)


@functools.lru_cache(maxsize=None)
def load_table(arch: str) -> ModuleTable:
    """The shipped table of a real architecture (sd15, sd2, sdxl)."""
    if arch not in KNOWN_ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(KNOWN_ARCHS)}")
    path = TABLE_DIR / f"{arch}.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return ModuleTable.from_json(json.load(f))


def write_table(table: ModuleTable, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump(table.to_json(), f, separators=(",", ":"))


def resolve_table(arch_or_table: "str | ModuleTable") -> ModuleTable:
    if isinstance(arch_or_table, ModuleTable):
        return arch_or_table
    return load_table(arch_or_table)


TABLE_METADATA_KEY = "spo_module_table"


def table_metadata(table: ModuleTable, infos: Iterable[ModuleInfo]) -> dict[str, str]:
    """For a LoRA of a custom model (not SD1.5/SD2/SDXL): the shapes of its modules, as file metadata,
    so every tool can read the file later without being given the model."""
    if table.arch in KNOWN_ARCHS:
        return {}
    mods = sorted({(m.component, m.name): m for m in infos}.values(), key=lambda m: (m.component, m.name))
    data = {"arch": table.arch, "family": table.family,
            "modules": [[m.component, m.name, m.kind, list(m.shape), m.ldm] for m in mods]}
    return {TABLE_METADATA_KEY: json.dumps(data, separators=(",", ":"))}


def table_from_metadata(metadata: dict[str, str]) -> ModuleTable | None:
    """The module table a LoRA file carries for its custom model, or None (absent or malformed)."""
    raw = metadata.get(TABLE_METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        if data.get("family") not in FAMILY.values() or not isinstance(data.get("arch"), str):
            return None
        for comp, name, kind, shape, ldm in data["modules"]:
            if (comp not in COMPONENTS or kind not in ("linear", "conv", "norm") or not isinstance(name, str)
                    or not all(type(d) is int and d > 0 for d in shape) or not (ldm is None or isinstance(ldm, str))):
                return None
        return ModuleTable.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def require_same_family(lora_table: ModuleTable, model_table: ModuleTable, what: str = "this LoRA") -> None:
    if lora_table.arch != model_table.arch:
        raise ModelMismatchError(
            f"{what} is for {lora_table.arch} but the model is {model_table.arch}; "
            f"use a LoRA made for {model_table.arch}"
        )


if __name__ == "__main__":  # regenerate the shipped tables: python -m spo_core.lora.tables
    for a in KNOWN_ARCHS:
        t = build_table(a)
        write_table(t, TABLE_DIR / f"{a}.json.gz")
        print(a, len(t.modules), "modules")
