"""Module tables: every weight-carrying module of an SD UNet and its text encoders, or of a
Flux / SD3 transformer.

A `ModuleTable` lists, for one architecture, each Linear / Conv2d / norm module by its
canonical name (the diffusers / transformers module path), its LDM/SGM name (UNet only:
`input_blocks.4.1...`, used by ComfyUI, the WebUI and single-file checkpoints), its kind and
its weight shape. Every naming scheme of every LoRA format is derived from these two names
(see `naming.py`), so the tables are the one source of truth.

The tables of the real SD1.5, SD2.x and SDXL models are built from the diffusers configs in
`spo_core/configs/` by instantiating the models on the `meta` device (`table_build.py`), and
shipped in the package as JSON (`tables/*.json.gz`) so that hosts without diffusers (the
WebUI pins transformers 4.30 and has no diffusers) need only torch to use them. The LDM
names follow the block arithmetic of the original UNet; tests check them against diffusers'
own single-file converter.

Flux.1 and SD3.5 transformers (component `transformer`) are built the same way from their
diffusers configs; their original names (BFL / MMDiT, `flow_names.py`) fuse q/k/v (and Flux's
single-block MLP input) into one weight, so a module may carry the row ranges it occupies in
that fused weight (`ldm_rows`), and the table groups such parts (`FusedGroup`). Their text
encoders are numbered as kohya sd-scripts numbers them: te1 CLIP-L, te2 CLIP-G (SD3 only),
te3 T5-XXL (diffusers' `text_encoder_3` in SD3, `text_encoder_2` in Flux).
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

# KNOWN_ARCHS keeps its first meaning (the UNet architectures, whose LDM names tests check against
# diffusers' UNet converter); ALL_ARCHS is every architecture the engine reads and writes.
KNOWN_ARCHS = ("sd15", "sd2", "sdxl")
FLOW_ARCHS = ("sd35-medium", "sd35-large", "flux-dev", "flux-schnell")
ALL_ARCHS = KNOWN_ARCHS + FLOW_ARCHS
FAMILY = {"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sd35-medium": "sd3", "sd35-large": "sd3",
          "flux-dev": "flux", "flux-schnell": "flux"}
FLOW_FAMILIES = ("sd3", "flux")
COMPONENTS = ("unet", "transformer", "te1", "te2", "te3")
TEXT_ENCODERS = ("te1", "te2", "te3")  # CLIP-L (SD2: OpenCLIP-H), CLIP-G, T5-XXL
COMPONENT_NAMES = {"unet": "UNet", "transformer": "transformer", "te1": "CLIP-L", "te2": "CLIP-G", "te3": "T5-XXL"}
# diffusers pipeline subfolder -> component, per family (Flux's T5 is its second text encoder)
TE_FOLDERS = {"sd1": {"text_encoder": "te1"}, "sd2": {"text_encoder": "te1"},
              "sdxl": {"text_encoder": "te1", "text_encoder_2": "te2"},
              "sd3": {"text_encoder": "te1", "text_encoder_2": "te2", "text_encoder_3": "te3"},
              "flux": {"text_encoder": "te1", "text_encoder_2": "te3"}}
DENOISERS = ("unet", "transformer")
@dataclass(frozen=True)
class ModuleInfo:
    """One weight-carrying module. `shape` is the weight's shape: [out, in] or [out, in, kh, kw] or [C]."""

    component: str  # "unet", "transformer", "te1", "te2" or "te3"
    name: str  # canonical diffusers/transformers module path
    kind: str  # "linear", "conv" or "norm"
    shape: tuple[int, ...]
    ldm: str | None = None  # LDM/SGM path (UNet), BFL/MMDiT path (transformer)
    ldm_rows: tuple[tuple[int, int], ...] | None = None  # rows of the (fused) original weight, in our row order

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
        if self.component == "transformer":
            return _transformer_group(n, self.kind)
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
        """The UNet block a module belongs to (down_blocks.1, mid_block, up_blocks.0, top), the
        transformer block (transformer_blocks.3, single_transformer_blocks.0, top) or the TE."""
        parts = self.name.split(".")
        if self.component == "transformer":
            return ".".join(parts[:2]) if parts[0] in ("transformer_blocks", "single_transformer_blocks") else "top"
        if self.component != "unet":
            return self.component
        if parts[0] in ("down_blocks", "up_blocks"):
            return ".".join(parts[:2])
        if parts[0] == "mid_block":
            return "mid_block"
        return "top"


def _transformer_group(name: str, kind: str) -> str:
    """Layer groups of a Flux/SD3 transformer: attn, ff, proj (single-block output), mod (adaLN), embed."""
    if kind == "norm":
        return "norm"
    parts = name.split(".")
    if parts[0] not in ("transformer_blocks", "single_transformer_blocks"):
        return "embed"
    if ".attn." in name or ".attn2." in name:
        return "attn"
    if ".ff." in name or ".ff_context." in name or name.endswith(".proj_mlp"):
        return "ff"
    if name.endswith(".proj_out"):
        return "proj"
    return "mod"


@dataclass(frozen=True)
class FusedGroup:
    """One original weight that holds several table modules (q/k/v, + Flux's proj_mlp), or one
    module with permuted rows; `parts` in row order, `rows` the original weight's row count."""

    component: str
    ldm: str
    parts: tuple[ModuleInfo, ...]
    rows: int

    @property
    def name(self) -> str:
        return self.ldm

    @property
    def kind(self) -> str:
        return self.parts[0].kind

    @property
    def out_features(self) -> int:
        return self.rows

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.parts[0].shape[1:])


@dataclass
class ModuleTable:
    """All weight-carrying modules of one architecture, indexed by canonical and LDM names."""

    arch: str  # one of ALL_ARCHS, or a free name for custom (tiny) models
    family: str  # sd1 / sd2 / sdxl / sd3 / flux: decides naming, fusing and metadata
    modules: dict[tuple[str, str], ModuleInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_ldm = {m.ldm: m for m in self.modules.values() if m.ldm and m.ldm_rows is None}
        members: dict[tuple[str, str], list[ModuleInfo]] = {}
        for m in self.modules.values():
            if m.ldm and m.ldm_rows is not None:
                members.setdefault((m.component, m.ldm), []).append(m)
        self.groups: dict[str, FusedGroup] = {}
        for (comp, ldm), parts in members.items():
            parts.sort(key=lambda m: min(a for a, _ in m.ldm_rows))
            rows = max(b for m in parts for _, b in m.ldm_rows)
            self.groups[ldm] = FusedGroup(comp, ldm, tuple(parts), rows)

    def get(self, component: str, name: str) -> ModuleInfo | None:
        return self.modules.get((component, name))

    def from_ldm(self, ldm_name: str) -> ModuleInfo | None:
        """The module stored 1:1 under this LDM/original name (None for fused weights: see `group`)."""
        return self._by_ldm.get(ldm_name)

    def group(self, ldm_name: str) -> FusedGroup | None:
        return self.groups.get(ldm_name)

    def modules_at(self, ldm_name: str) -> list[ModuleInfo]:
        """Every module whose weight lives in the original weight `ldm_name` (one, or a fused group's parts)."""
        one = self._by_ldm.get(ldm_name)
        if one is not None:
            return [one]
        g = self.groups.get(ldm_name)
        return list(g.parts) if g else []

    @property
    def denoiser(self) -> str:
        """The component that denoises: `unet` (SD1/SD2/SDXL) or `transformer` (SD3, Flux)."""
        return "transformer" if self.family in FLOW_FAMILIES else "unet"

    def components(self) -> list[str]:
        return sorted({c for c, _ in self.modules}, key=COMPONENTS.index)

    def select(self, components: Iterable[str] = ("unet",), groups: Iterable[str] | None = None, kinds=("linear", "conv")) -> list[ModuleInfo]:
        comps, grps = set(components), set(groups) if groups is not None else None
        return [
            m for m in self.modules.values()
            if m.component in comps and m.kind in kinds and (grps is None or m.group in grps or (m.component in TEXT_ENCODERS and "te" in grps))
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
            "modules": [_module_json(m) for m in self.modules.values()],
        }

    @classmethod
    def from_json(cls, data: dict) -> "ModuleTable":
        mods = {}
        for row in data["modules"]:
            comp, name, kind, shape, ldm = row[:5]
            rows = tuple(tuple(r) for r in row[5]) if len(row) > 5 and row[5] is not None else None
            mods[(comp, name)] = ModuleInfo(comp, name, kind, tuple(shape), ldm, rows)
        return cls(data["arch"], data["family"], mods)


def _module_json(m: ModuleInfo) -> list:
    """[component, name, kind, shape, ldm] (+ row ranges for fused parts: SD tables stay as they were)."""
    row = [m.component, m.name, m.kind, list(m.shape), m.ldm]
    if m.ldm_rows is not None:
        row.append([list(r) for r in m.ldm_rows])
    return row


# -- text-encoder names ------------------------------------------------------------------


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


@functools.lru_cache(maxsize=None)
def load_table(arch: str) -> ModuleTable:
    """The shipped table of a real architecture (one of ALL_ARCHS)."""
    if arch not in ALL_ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ALL_ARCHS)}")
    path = TABLE_DIR / f"{arch}.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return ModuleTable.from_json(json.load(f))


def resolve_table(arch_or_table: "str | ModuleTable") -> ModuleTable:
    if isinstance(arch_or_table, ModuleTable):
        return arch_or_table
    return load_table(arch_or_table)


TABLE_METADATA_KEY = "spo_module_table"


def table_metadata(table: ModuleTable, infos: Iterable[ModuleInfo]) -> dict[str, str]:
    """For a LoRA of a custom model (not SD1.5/SD2/SDXL): the shapes of its modules, as file metadata,
    so every tool can read the file later without being given the model."""
    if table.arch in ALL_ARCHS:
        return {}
    mods = sorted({(m.component, m.name): m for m in infos}.values(), key=lambda m: (m.component, m.name))
    data = {"arch": table.arch, "family": table.family, "modules": [_module_json(m) for m in mods]}
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
        for row in data["modules"]:
            comp, name, kind, shape, ldm = row[:5]
            rows = row[5] if len(row) > 5 else None
            if (comp not in COMPONENTS or kind not in ("linear", "conv", "norm") or not isinstance(name, str)
                    or not all(type(d) is int and d > 0 for d in shape) or not (ldm is None or isinstance(ldm, str))
                    or len(row) > 6 or not (rows is None or _valid_rows(rows, shape))):
                return None
        return ModuleTable.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _valid_rows(rows, shape) -> bool:
    """Row ranges of a fused part: non-empty int pairs covering exactly the module's rows."""
    try:
        total = sum(b - a for a, b in rows)
        return bool(rows) and all(type(a) is int and type(b) is int and 0 <= a < b for a, b in rows) and total == shape[0]
    except (TypeError, ValueError):
        return False


def require_same_family(lora_table: ModuleTable, model_table: ModuleTable, what: str = "this LoRA") -> None:
    if lora_table.arch != model_table.arch:
        raise ModelMismatchError(
            f"{what} is for {lora_table.arch} but the model is {model_table.arch}; "
            f"use a LoRA made for {model_table.arch}"
        )
