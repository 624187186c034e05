"""Full SD checkpoints, read lazily by canonical module name.

Extraction and merging need the weights of whole models: a diffusers folder (`unet/`,
`text_encoder/`, `text_encoder_2/`), a single-file LDM/SGM checkpoint (`model.diffusion_model.*`,
`cond_stage_model.*`, `conditioner.embedders.*`), or a bare UNet file (diffusers or LDM keys,
as ComfyUI's `diffusion_models` folder holds). `CheckpointReader` maps each canonical module
(component, name) to where its weight lives in those files (OpenCLIP text encoders fuse
q/k/v into one `in_proj_weight`: the reader slices it) and reads one tensor at a time from
memory-mapped safetensors, so an SDXL pair can be processed in little RAM.

Flux.1 / SD3.5 transformers: a diffusers folder (`transformer/`, sharded or not), a bare diffusers
transformer file, or a single file in the original naming (BFL `double_blocks...`, MMDiT
`joint_blocks...`, bare or under `model.diffusion_model.`), whose fused q/k/v weights are read
and written as row ranges.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CorruptFileError, ModelMismatchError
from ..safe_io import _ST_TO_DTYPE, check_exists, is_safetensors, load_pickle_weights_only, open_safetensors
from .tables import ALL_ARCHS, COMPONENTS, FLOW_ARCHS, ModuleTable, canonical_te_name, load_table

log = logging.getLogger(__name__)

_UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_ORIGINAL_FLOW_HEADS = ("double_blocks.", "single_blocks.", "joint_blocks.")  # bare BFL / MMDiT keys
_DIFFUSERS_FLOW_HEADS = ("transformer_blocks.", "single_transformer_blocks.")
_TE_PREFIXES = {  # single-file prefix -> (component, style)
    "cond_stage_model.transformer.": ("te1", "hf"),
    "cond_stage_model.model.": ("te1", "openclip"),
    "conditioner.embedders.0.transformer.": ("te1", "hf"),
    "conditioner.embedders.1.model.": ("te2", "openclip"),
    # SD3 single files that carry their text encoders (ComfyUI's names)
    "text_encoders.clip_l.transformer.": ("te1", "hf"),
    "text_encoders.clip_g.transformer.": ("te2", "hf"),
    "text_encoders.t5xxl.transformer.": ("te3", "t5"),
}
_OPENCLIP_RENAMES = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


@dataclass(frozen=True)
class Location:
    """Where a module's weight lives: file, key, optional row ranges (in the module's row order:
    a slice of fused q/k/v, or the swapped halves of an adaLN), and whether it is transposed."""

    file: str
    key: str
    rows: tuple[tuple[int, int], ...] | None = None
    transpose: bool = False


class _Files:
    """Open safetensors files (memory-mapped) or loaded pickles, one handle per file."""

    def __init__(self) -> None:
        self.handles: dict[str, object] = {}

    def keys(self, path: str) -> list[str]:
        if is_safetensors(path):
            return self._safe(path).keys()
        return list(self._pickle(path))

    def shape(self, path: str, key: str) -> tuple[int, ...]:
        if is_safetensors(path):
            return self._safe(path).shape(key)
        return tuple(self._pickle(path)[key].shape)

    def info(self, path: str, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape without reading the data."""
        if is_safetensors(path):
            entry = self._safe(path).header[key]
            return _ST_TO_DTYPE[entry["dtype"]], tuple(entry["shape"])
        t = self._pickle(path)[key]
        return t.dtype, tuple(t.shape)

    def get(self, path: str, key: str) -> torch.Tensor:
        if is_safetensors(path):
            return self._safe(path).get_tensor(key)
        return self._pickle(path)[key]

    def _safe(self, path: str):
        if path not in self.handles:
            self.handles[path] = open_safetensors(path)
        return self.handles[path]

    def _pickle(self, path: str) -> dict:
        if path not in self.handles:
            obj = load_pickle_weights_only(Path(path))
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise CorruptFileError(f"{path} does not hold a state dict (found {type(obj).__name__})")
            self.handles[path] = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        return self.handles[path]

    def close(self) -> None:
        self.handles.clear()


def _component_files(folder: Path, sub: str) -> list[Path]:
    d = folder / sub
    if not d.is_dir():
        return []
    for stem in ("diffusion_pytorch_model", "model"):
        index = d / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [d / s for s in shards]
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
            if (d / name).is_file():
                return [d / name]
    return []


def _is_t5_folder(folder: Path) -> bool:
    """A text-encoder subfolder holding T5 (Flux's text_encoder_2, SD3's text_encoder_3)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "t5"
    except (OSError, ValueError):
        return False


class CheckpointReader:
    """Weights of a full SD model by canonical (component, module) name; see the module docstring."""

    def __init__(self, path: str | os.PathLike, arch: str | ModuleTable | None = None):
        from ..model_names import resolve_model

        self.path = check_exists(resolve_model(path), "checkpoint")
        self.files = _Files()
        self.locations: dict[tuple[str, str], Location] = {}
        self.biases: dict[tuple[str, str], Location] = {}
        self._raw: dict[str, list[str]] = {}
        if self.path.is_dir():
            self._index_folder()
        else:
            self._index_single_file(str(self.path))
        self.table = self._resolve_table(arch)

    # -- indexing -------------------------------------------------------------------------
    def _index_folder(self) -> None:
        found = False
        for sub, comp in (("unet", "unet"), ("transformer", "transformer"), ("text_encoder", "te1"), ("text_encoder_2", "te2"),
                          ("text_encoder_3", "te3")):
            t5 = _is_t5_folder(self.path / sub)
            comp = "te3" if t5 else comp  # Flux's text_encoder_2 is T5
            for f in _component_files(self.path, sub):
                found = True
                for key in self.files.keys(str(f)):
                    name = key if comp in ("unet", "transformer") or t5 else canonical_te_name(key)
                    self._add(comp, name, str(f), key, style="diffusers")
        if not found:
            raise CorruptFileError(f"{self.path} is a folder but not a diffusers model (no unet/, transformer/ or text_encoder/ weights)")

    def _index_single_file(self, path: str) -> None:
        keys = self.files.keys(path)
        if not keys:
            raise CorruptFileError(f"{path} holds no tensors")
        self._ldm_unet: dict[str, str] = {}
        for key in keys:
            for prefix in _UNET_PREFIXES:
                if key.startswith(prefix):
                    self._ldm_unet[key[len(prefix):]] = key
                    break
            else:
                for prefix, (comp, style) in _TE_PREFIXES.items():
                    if key.startswith(prefix):
                        self._add_te(comp, style, key[len(prefix):], path, key)
                        break
        if not self._ldm_unet:
            # a bare UNet: diffusers keys (down_blocks...) or LDM keys without prefix
            if any(k.startswith(("down_blocks.", "mid_block.", "conv_in.")) for k in keys):
                for key in keys:
                    self._add("unet", key, path, key, style="diffusers")
            elif any(k.startswith(_DIFFUSERS_FLOW_HEADS) for k in keys):
                for key in keys:
                    self._add("transformer", key, path, key, style="diffusers")
            elif any(k.startswith(("input_blocks.", "middle_block.") + _ORIGINAL_FLOW_HEADS) for k in keys):
                self._ldm_unet = {k: k for k in keys}
        self._single_file = path

    def _add(self, comp: str, param_key: str, file: str, key: str, style: str) -> None:
        module, _, param = param_key.rpartition(".")
        if param == "weight":
            self.locations[(comp, module)] = Location(file, key)
        elif param == "bias":
            self.biases[(comp, module)] = Location(file, key)

    def _add_te(self, comp: str, style: str, sub_key: str, file: str, key: str) -> None:
        if style == "t5":
            self._add(comp, sub_key, file, key, style)
            return
        if style == "hf":
            self._add(comp, canonical_te_name(sub_key), file, key, style)
            return
        # OpenCLIP layout (SD2 te1, SDXL te2)
        if sub_key == "text_projection":
            self.locations[(comp, "text_projection")] = Location(file, key, transpose=True)
            return
        if sub_key.startswith("ln_final."):
            self._add(comp, "text_model.final_layer_norm." + sub_key.split(".")[-1], file, key, style)
            return
        if not sub_key.startswith("transformer.resblocks."):
            return
        parts = sub_key.split(".")
        layer, rest = parts[2], ".".join(parts[3:])
        base = f"text_model.encoder.layers.{layer}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            shape = self.files.shape(file, key)
            if not shape or shape[0] % 3:
                raise CorruptFileError(f"{file}: {key} has shape {list(shape)}, not three stacked q/k/v projections")
            width = shape[0] // 3
            target = self.locations if rest.endswith("weight") else self.biases
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                target[(comp, base + "self_attn." + proj)] = Location(file, key, rows=((i * width, (i + 1) * width),))
            return
        module, _, param = rest.rpartition(".")
        module = _OPENCLIP_RENAMES.get(module, module)
        self._add(comp, base + module + "." + param, file, key, style)

    def _resolve_table(self, arch) -> ModuleTable:
        if isinstance(arch, ModuleTable):
            table = arch
        else:
            table = load_table(arch) if arch else self._detect()
            if arch is None and self.path.is_dir() and self._misfit(table):
                table = self._folder_table(table)
        ldm = getattr(self, "_ldm_unet", None)
        if ldm:
            for param_key, key in ldm.items():
                module, _, param = param_key.rpartition(".")
                target = self.locations if param == "weight" else self.biases if param == "bias" else None
                if target is None:
                    continue
                for info in table.modules_at(module):
                    target[(info.component, info.name)] = Location(self._single_file, key, rows=info.ldm_rows)
        return table

    def _misfit(self, table: ModuleTable) -> str | None:
        """The first indexed module whose weight shape differs from the table's, described; None if all fit."""
        for (comp, name), loc in self.locations.items():
            info = table.get(comp, name)
            if info is None or loc.rows is not None:
                continue
            shape = self.files.shape(loc.file, loc.key)
            if math.prod(shape) != math.prod(info.shape):
                return f"{comp}:{name} has shape {list(shape)}, {table.arch} has {list(info.shape)}"
        return None

    def _folder_table(self, detected: ModuleTable) -> ModuleTable:
        """A diffusers folder of a custom (e.g. tiny) model: its own table, from its configs."""
        if not any((self.path / sub / "config.json").is_file() for sub in ("unet", "transformer")):
            raise ModelMismatchError(f"{self.path} is not a model of {', '.join(ALL_ARCHS)} ({self._misfit(detected)}) "
                                     "and has no unet/ or transformer/ config.json to read its own layout from")
        from .table_build import table_from_config_folder

        try:
            return table_from_config_folder(self.path)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CorruptFileError(f"{self.path}: cannot build the model's layout from its configs ({exc})") from exc

    def _detect_flow(self) -> ModuleTable | None:
        """The Flux/SD3 architecture whose every module is in this checkpoint with its shape (None: not one)."""
        have_diffusers = any(c == "transformer" for c, _ in self.locations)
        ldm = getattr(self, "_ldm_unet", None) or {}
        if not have_diffusers and not any(k.startswith(_ORIGINAL_FLOW_HEADS) for k in ldm):
            return None
        for arch in FLOW_ARCHS:
            table = load_table(arch)  # the transformer decides; text encoders are optional in these files
            if all(self._fits_module(table, info) for info in table.modules.values() if info.component == "transformer"):
                return table
        if self.path.is_dir():
            return load_table(FLOW_ARCHS[0])  # a custom transformer folder: its own table is built from its config
        raise ModelMismatchError(f"{self.path}: a Flux/SD3 transformer, but not one of {', '.join(FLOW_ARCHS)} "
                                 "(its modules or their shapes differ); give the model's own table (a diffusers folder "
                                 "with transformer/config.json)")

    def _fits_module(self, table: ModuleTable, info) -> bool:
        loc = self.locations.get((info.component, info.name))
        if loc is not None:
            return math.prod(self.files.shape(loc.file, loc.key)) == math.prod(info.shape)
        key = (getattr(self, "_ldm_unet", None) or {}).get(f"{info.ldm}.weight")
        if key is None:
            return False
        shape = self.files.shape(self._single_file, key)
        rows = table.groups[info.ldm].rows if info.ldm_rows else info.shape[0]
        return bool(shape) and shape[0] == rows and math.prod(shape[1:]) == info.in_features

    def _detect(self) -> ModuleTable:
        """The real architecture whose UNet/TE (or transformer) shapes fit this checkpoint."""
        flow = self._detect_flow()
        if flow is not None:
            return flow
        probes = {
            "unet-ctx": ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "input_blocks.4.1.transformer_blocks.0.attn2.to_k"),
        }
        ctx = None
        diff_name, ldm_name = probes["unet-ctx"]
        loc = self.locations.get(("unet", diff_name))
        if loc is None and getattr(self, "_ldm_unet", None):
            key = self._ldm_unet.get(ldm_name + ".weight")
            loc = Location(self._single_file, key) if key else None
        if loc is not None:
            shape = self.files.shape(loc.file, loc.key)
            ctx = shape[-1] if shape else None
        by_ctx = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
        if ctx in by_ctx:
            return load_table(by_ctx[ctx])
        if ("te2", "text_model.encoder.layers.0.self_attn.q_proj") in self.locations:
            return load_table("sdxl")
        q = self.locations.get(("te1", "text_model.encoder.layers.0.self_attn.q_proj"))
        if q is not None:
            shape = self.files.shape(q.file, q.key)
            width = (q.rows[0][1] - q.rows[0][0]) if q.rows else (shape[0] if shape else None)
            return load_table({768: "sd15", 1024: "sd2"}.get(width, "sd15"))
        raise ModelMismatchError(
            f"{self.path}: cannot tell which model this is (no UNet, transformer or text encoder keys found); "
            f"known: {', '.join(ALL_ARCHS)}"
        )

    # -- access ---------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.table.arch

    def has(self, component: str, name: str) -> bool:
        return (component, name) in self.locations

    def components(self) -> list[str]:
        return sorted({c for c, _ in self.locations}, key=COMPONENTS.index)

    def _read(self, loc: Location) -> torch.Tensor:
        t = self.files.get(loc.file, loc.key)
        if loc.rows is not None:
            chunks = [t[a:b] for a, b in loc.rows]
            t = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return t.T if loc.transpose else t

    def weight(self, component: str, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The module's weight in the table's shape (conv 1x1 <-> linear reshaped), or None."""
        loc = self.locations.get((component, name))
        if loc is None:
            return None
        t = self._read(loc)
        info = self.table.get(component, name)
        if info is not None and tuple(t.shape) != info.shape:
            if t.numel() != torch.Size(info.shape).numel():
                raise ModelMismatchError(f"{self.path}: {component}:{name} has shape {list(t.shape)}, expected {list(info.shape)} for {self.arch}")
            t = t.reshape(info.shape)
        return t.to(dtype)

    def iter_modules(self, components=("unet",), kinds=("linear", "conv")) -> Iterator[tuple]:
        for info in self.table.modules.values():
            if info.component in components and info.kind in kinds and self.has(info.component, info.name):
                yield info

    def close(self) -> None:
        self.files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def raw_keys(reader: CheckpointReader) -> dict[str, list[str]]:
    """Every file of the checkpoint and its keys (for merge: everything is copied)."""
    files = sorted({loc.file for loc in list(reader.locations.values()) + list(reader.biases.values())})
    if not reader.path.is_dir():
        files = [str(reader.path)]
    return {f: reader.files.keys(f) for f in files}
