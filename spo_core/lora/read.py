"""Read a LoRA in any format, detect its format and base architecture.

The file's keys are matched against the module tables of SD1.5, SD2.x, SDXL, SD3.5 and Flux.1
(or a table the caller gives, e.g. of a tiny test model); the table under which most modules match with
consistent shapes wins, with the file's own metadata (`ss_base_model_version`,
`modelspec.architecture`) as the tie-breaker. Every key that matches nothing is kept in
`LoRA.unmatched`, every matched module that cannot be used in `LoRA.problems`: nothing is
dropped silently. A Flux/SD3 LoRA stored in a fused layout (`qkv`, `linear1`) is split into the
diffusers modules exactly (`fused.py`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..errors import LoRAFormatError, ModelMismatchError
from ..safe_io import check_exists, check_finite, load_state_dict
from .fused import split_diff, split_group
from .model import DiffModule, LoRA, LoRAModule
from .naming import alias_map, split_key, unsupported_algorithm
from .tables import ALL_ARCHS, FAMILY, FusedGroup, ModuleInfo, ModuleTable, load_table, resolve_table, table_from_metadata

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# subfolder -> component; a Flux adapter's text_encoder_2 (T5) is moved to te3 once the table is known
PEFT_SUBFOLDERS = {"": "unet", "unet": "unet", "transformer": "transformer", "text_encoder": "te1", "text_encoder_2": "te2",
                   "text_encoder_3": "te3"}
# first path parts of a Flux/SD3 transformer's modules: a root PEFT adapter holding them is a transformer's
_TRANSFORMER_HEADS = ("transformer_blocks.", "single_transformer_blocks.", "time_text_embed.", "context_embedder.",
                      "x_embedder.", "pos_embed.", "norm_out.", "proj_out.")


def _root_component(keys) -> str:
    """A root-level PEFT adapter is a UNet's, or a transformer's when its modules say so."""
    for k in keys:
        bare = k[len("base_model.model."):] if k.startswith("base_model.model.") else k
        if bare.startswith(_TRANSFORMER_HEADS):
            return "transformer"
    return "unet"


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, dict]]:
    """(state dict, metadata, peft configs by component) of a LoRA file or PEFT folder."""
    p = check_exists(path, "LoRA file")
    if p.is_dir():
        return _load_peft_folder(p)
    sd, metadata = load_state_dict(p)
    peft_configs = {}
    sidecar = p.parent / PEFT_CONFIG
    if sidecar.is_file() and p.name in PEFT_WEIGHTS:
        peft_configs[_root_component(sd)] = json.loads(sidecar.read_text())
    return sd, metadata, peft_configs


def _load_peft_folder(folder: Path):
    sd: dict[str, torch.Tensor] = {}
    configs: dict[str, dict] = {}
    metadata: dict[str, str] = {}
    found = False
    for sub, comp in PEFT_SUBFOLDERS.items():
        d = folder / sub if sub else folder
        cfg = d / PEFT_CONFIG
        weights = next((d / w for w in PEFT_WEIGHTS if (d / w).is_file()), None)
        if not cfg.is_file() or weights is None or (sub in ("unet", "transformer") and configs.get(comp)):
            continue
        found = True
        part, meta = load_state_dict(weights)
        metadata.update(meta)
        if sub == "":
            comp = _root_component(part)
        configs[comp] = json.loads(cfg.read_text())
        prefix = (sub or comp) + "."  # unet. / transformer. / text_encoder*. as diffusers names them
        for k, v in part.items():
            key = k[len("base_model.model."):] if k.startswith("base_model.model.") else k
            sd[prefix + key] = v
    if not found:
        raise LoRAFormatError(f"{folder} is a folder but holds no PEFT adapter ({PEFT_CONFIG} + {PEFT_WEIGHTS[0]})")
    return sd, metadata, configs


def metadata_arch(metadata: Mapping[str, str]) -> str | None:
    """The base architecture a file's metadata claims, if any."""
    v = (metadata.get("ss_base_model_version") or "").lower()
    spec = (metadata.get("modelspec.architecture") or "").lower()
    if v.startswith("sdxl") or "stable-diffusion-xl" in spec:
        return "sdxl"
    if v.startswith("sd_v2") or metadata.get("ss_v2") == "True" or "stable-diffusion-v2" in spec:
        return "sd2"
    if v.startswith("sd_v1") or "stable-diffusion-v1" in spec:
        return "sd15"
    for marker, arch in (("flux-1-dev", "flux-dev"), ("flux-1-schnell", "flux-schnell"),
                         ("stable-diffusion-3.5-large", "sd35-large"), ("stable-diffusion-3.5-medium", "sd35-medium")):
        if marker in spec:
            return arch
    return None


def _fits(info: ModuleInfo, down: torch.Tensor | None, up: torch.Tensor | None) -> bool:
    if down is None or up is None or down.ndim < 2 or up.ndim < 2:
        return False
    r = down.shape[0]
    return up.shape[1] == r and up.shape[0] == info.out_features and math.prod(down.shape[1:]) == info.in_features


def _normalize(info: ModuleInfo, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring factors to kohya's shape convention for this module's kind."""
    r = down.shape[0]
    if info.kind == "conv":
        _, cin, kh, kw = info.shape
        return down.reshape(r, cin, kh, kw), up.reshape(info.out_features, r, 1, 1)
    return down.reshape(r, info.in_features), up.reshape(info.out_features, r)


def _fold_mid(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """Fold a LyCORIS/LoCon Tucker core into down: [r,r,kh,kw] o [r,in,1,1] -> [r,in,kh,kw] (exact)."""
    d = down.reshape(down.shape[0], -1)
    return torch.einsum("omyx,mi->oiyx", mid.float(), d.float()).to(down.dtype)


def _peft_alpha(configs: dict[str, dict], comp: str, name: str, rank: int) -> float | None:
    """The alpha peft itself gives module `name`: the first `alpha_pattern` key that matches the
    end of the name wins (peft's `get_pattern_key`), else `lora_alpha`; rsLoRA folded in."""
    cfg = configs.get(comp)
    if not cfg:
        return None
    alpha = float(cfg.get("lora_alpha", cfg.get("r", rank)))
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({pattern})$", name)
        except re.error as exc:
            raise LoRAFormatError(f"adapter_config.json: alpha_pattern key {pattern!r} is not a valid regex ({exc})") from exc
        if hit:
            alpha = float(value)
            break
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return scaling * rank


def _format_label(prefix_key: str, scheme: str, info: ModuleInfo | FusedGroup) -> str:
    if info.component == "transformer":
        if prefix_key.startswith(("lora_unet_", "lora_transformer_")):
            return "kohya"
        if prefix_key.startswith("transformer."):
            return "diffusers"  # what Flux/SD3 pipelines' save_lora_weights writes (PEFT suffixes)
    if prefix_key.startswith("lora_unet_") and info.ldm and prefix_key.startswith("lora_unet_" + info.ldm.replace(".", "_")):
        return "kohya-ldm"
    if prefix_key.startswith(("lora_unet_", "lora_te")):
        return "kohya"
    if prefix_key.startswith(("diffusion_model.", "model.diffusion_model.", "text_encoders.")):
        return "comfy"
    if prefix_key.startswith("lycoris_"):
        return "lycoris"
    return scheme or "unknown"


def _match(sd: Mapping[str, torch.Tensor], table: ModuleTable):
    """Sort a state dict's keys by module and part; keys naming no module, or a module twice, are kept aside."""
    amap = alias_map(table)
    parts: dict[ModuleInfo | FusedGroup, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    unmatched, labels, twice = [], Counter(), []
    for key, tensor in sd.items():
        hit = split_key(key, amap)
        if hit is None or unsupported_algorithm(key):
            unmatched.append(key)
            continue
        info, part, scheme = hit
        slot = parts[info]
        if part in slot:
            twice.append((info, slot[part][0], key))
            continue
        slot[part] = (key, tensor)
        if part != "alpha":
            labels[_format_label(key, scheme, info)] += 1
    return parts, unmatched, labels, twice


def _score(table: ModuleTable, parts) -> tuple[int, int]:
    fitting = 0
    for info, p in parts.items():
        down, up = p.get("down", (None, None))[1], p.get("up", (None, None))[1]
        if down is not None and "mid" in p:
            down = _fold_mid(down, p["mid"][1])
        if "down" in p and _fits(info, down, up):
            fitting += 1
        elif "diff" in p and tuple(p["diff"][1].shape) == info.shape:
            fitting += 1
    return fitting, len(parts)


def _family_of(candidate: str | ModuleTable) -> str | None:
    return candidate.family if isinstance(candidate, ModuleTable) else FAMILY.get(candidate)


def _flow_family_hint(keys: Iterable[str]) -> str | None:
    """'flux' / 'sd3' when a key names a block only that family has (BFL double/single blocks, diffusers'
    single_transformer_blocks, MMDiT joint blocks), so reading can try that family's tables first."""
    for key in keys:
        if "double_blocks" in key or "single_blocks" in key or "single_transformer_blocks" in key:
            return "flux"
        if "joint_blocks" in key:
            return "sd3"
    return None


def _best_table(sd: Mapping[str, torch.Tensor], tables: list[ModuleTable], claimed: str | None, sample: list[str]):
    """(best (rank, table, parts, unmatched, labels, twice, tables compared), tied archs): the table under which
    most modules fit, then most match, then the one the metadata claims. A table none of a spread sample of
    keys names cannot win: its full match is skipped."""
    if len(tables) > 1:
        tables = [t for t in tables if any(split_key(k, alias_map(t)) for k in sample)] or tables
    best, ties = None, []
    for table in tables:
        parts, unmatched, labels, twice = _match(sd, table)
        fitting, matched = _score(table, parts)
        rank = (fitting, matched, table.arch == claimed)
        if best is None or rank > best[0]:
            best, ties = (rank, table, parts, unmatched, labels, twice, tables), []
        elif rank == best[0] and fitting:
            ties.append(table.arch)
    return best, ties


def read_lora(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    arch: str | ModuleTable | None = None,
    metadata: Mapping[str, str] | None = None,
    candidates: Iterable[str | ModuleTable] = ALL_ARCHS,
    check_values: bool = True,
) -> LoRA:
    """Read a LoRA file, PEFT folder or state dict.

    `arch` forces the architecture (a name or a table); otherwise the best matching of
    `candidates` is chosen. Raises LoRAFormatError when nothing matches and
    InvalidTensorError on NaN/inf (with `check_values`); partial matches come back with
    `unmatched` / `problems` filled in, for the caller to report or refuse.
    """
    peft_configs: dict[str, dict] = {}
    name = "state dict"
    if isinstance(source, Mapping):
        sd, meta = dict(source), dict(metadata or {})
    else:
        name = str(source)
        sd, meta, peft_configs = load_lora_file(source)
        meta.update(metadata or {})
    if not sd:
        raise LoRAFormatError(f"{name} holds no tensors")

    own = table_from_metadata(meta) if arch is None else None
    claimed = metadata_arch(meta)
    sample = list(sd)[:: max(1, len(sd) // 48)]
    best = None
    if arch is not None:
        best, ties = _best_table(sd, [resolve_table(arch)], claimed, sample)
    else:
        candidates = list(candidates)
        hint = _flow_family_hint(sample)
        if hint is not None:  # the other families' tables cannot fit more of a file whose every key this one names
            first = [resolve_table(c) for c in candidates if _family_of(c) == hint] + ([own] if own is not None else [])
            if first:
                best, ties = _best_table(sd, first, claimed, sample)
                if best[3] or not best[0][0]:  # keys left over, or nothing fits: compare with every table
                    best = None
        if best is None:
            tables = [resolve_table(c) for c in candidates] + ([own] if own is not None else [])
            best, ties = _best_table(sd, tables, claimed, sample)
    (fitting, matched, _), table, parts, unmatched, labels, twice, tables = best
    if table.family == "flux" and "te2" in peft_configs:  # Flux's second text encoder is T5
        peft_configs["te3"] = peft_configs.pop("te2")
    if arch is not None and fitting == 0 and table.arch in ALL_ARCHS:
        _refuse_other_arch(sd, meta, table, name)
    algorithms = unsupported_algorithms(sd)
    if matched == 0 and algorithms:
        raise LoRAFormatError(_unsupported_message(name, algorithms))
    if matched == 0:
        sample = "\n  ".join(sorted(sd)[:12])
        raise LoRAFormatError(
            f"{name}: no key matches a known LoRA naming scheme of "
            f"{', '.join(t.arch for t in tables)} ({len(sd)} keys), e.g.:\n  {sample}\n"
            "Supported: kohya/webui (lora_unet_*, lora_te*_), diffusers (unet.*.lora.down.weight), "
            "PEFT (lora_A/lora_B), old diffusers processors, ComfyUI (diffusion_model.*). "
            "LoHa/LoKr/DoRA/OFT files are not supported."
        )

    lora = LoRA(table, metadata=dict(meta), unmatched=sorted(unmatched))
    for info, first, second in twice:
        lora.problems.append(f"module {info.component}:{info.name} is stored twice, as {first} and as {second} "
                             "(two naming schemes in one file): remove one copy")
    doubled = {(info.component, info.name) for info, _, _ in twice}
    for label, keys in algorithms.items():
        message = f"{len(keys)} {label} keys (e.g. {keys[0]}): {label} is not supported, only LoRA and LoCon"
        # DoRA rescales whole weights: its modules must not be used as plain LoRAs, even partially
        (lora.problems if label == "DoRA" else lora.notes).append(message)
    lora.source_format = labels.most_common(1)[0][0] if labels else "unknown"
    if len(labels) > 1:
        lora.notes.append("mixed naming schemes: " + ", ".join(f"{k} ({v})" for k, v in labels.most_common()))
    if fitting == 0 and arch is None:
        lora.notes.append(
            f"the key names follow a known layout but no module's shapes fit {', '.join(t.arch for t in tables)}: "
            "a LoRA for another (custom or tiny) model; inspect it against that model (spo lora inspect --model DIR)")
    elif claimed and claimed != table.arch:
        lora.notes.append(f"metadata says {claimed} but the keys and shapes fit {table.arch}")
    if ties:
        lora.notes.append(f"the modules fit {table.arch} and {', '.join(ties)} equally (they differ only in modules "
                          f"this LoRA does not touch): read as {table.arch}; force another with --arch")
    assumed_alpha = 0
    for info, p in parts.items():
        comp, mname = info.component, info.name
        if (comp, mname) in doubled:
            continue
        if isinstance(info, FusedGroup) and "up" in p and p["up"][1].ndim >= 1 and p["up"][1].shape[0] != info.rows:
            lora.problems.append(_unsplittable(info, p["up"][0], p["up"][1].shape[0]))
            continue
        if "diff" in p or "diff_b" in p:
            diff = p.get("diff", (None, None))[1]
            diff_b = p.get("diff_b", (None, None))[1]
            if diff is not None and tuple(diff.shape) != info.shape:
                lora.problems.append(f"{p['diff'][0]}: shape {list(diff.shape)} != weight {list(info.shape)}")
                continue
            found = split_diff(info, diff, diff_b) if isinstance(info, FusedGroup) else [DiffModule(info, diff, diff_b)]
            for d in found:
                lora.diffs[(d.info.component, d.info.name)] = d
            if "down" not in p and "up" not in p:
                continue
        if "dora_scale" in p:
            continue  # refused as a whole above
        if "down" not in p or "up" not in p:
            have = next(iter(p.values()))[0]
            lora.problems.append(f"{have}: module {comp}:{mname} has no {'up' if 'down' in p else 'down'} weight")
            continue
        down, up = p["down"][1], p["up"][1]
        if not (down.is_floating_point() and up.is_floating_point()):
            lora.problems.append(f"{p['down'][0]}: factors of dtype {down.dtype} / {up.dtype}, not floating point")
            continue
        if down.ndim >= 1 and down.shape[0] == 0:
            lora.problems.append(f"{p['down'][0]}: module {comp}:{mname} has rank 0 (an empty factor)")
            continue
        if "mid" in p:
            down = _fold_mid(down, p["mid"][1])
        if not _fits(info, down, up):
            lora.problems.append(
                f"{p['down'][0]}: shapes down {list(down.shape)} / up {list(up.shape)} do not fit "
                f"{comp}:{mname} with weight {list(info.shape)}"
            )
            continue
        if not isinstance(info, FusedGroup):
            down, up = _normalize(info, down, up)
        rank = down.shape[0]
        if "alpha" in p:
            key, value = p["alpha"]
            if value.numel() != 1 or value.dtype == torch.bool:
                lora.problems.append(f"{key}: alpha must be one number, found {value.dtype} of shape {list(value.shape)}")
                continue
            alpha = float(value.float().item())
            if not math.isfinite(alpha):
                lora.problems.append(f"{key}: alpha is {alpha}")
                continue
            if alpha == 0:
                alpha = float(rank)  # kohya: alpha 0 / None means alpha = rank
        else:
            alpha = _peft_alpha(peft_configs, comp, mname, rank)
            if alpha is None:
                alpha = float(rank)
                assumed_alpha += 1
        if isinstance(info, FusedGroup):
            _add_split(lora, info, split_group(info, down.reshape(rank, -1), up.reshape(info.rows, rank), alpha), p["down"][0])
        elif (comp, mname) in lora.modules:
            lora.problems.append(f"module {comp}:{mname} is stored twice: as {p['down'][0]} and inside a fused weight")
        else:
            lora.modules[(comp, mname)] = LoRAModule(info, down, up, alpha)
    if assumed_alpha:
        lora.notes.append(f"{assumed_alpha} modules have no alpha: assumed alpha = rank (scale 1), as every loader does")
    if not lora.modules and not lora.diffs and algorithms:
        raise LoRAFormatError(_unsupported_message(name, algorithms))
    if check_values:
        tensors = {f"{c}:{n}.down": m.down for (c, n), m in lora.modules.items()}
        tensors.update({f"{c}:{n}.up": m.up for (c, n), m in lora.modules.items()})
        tensors.update({f"{c}:{n}.diff": d.diff for (c, n), d in lora.diffs.items() if d.diff is not None})
        check_finite(tensors, name)
        lora.values_checked = True
    return lora


def _unsplittable(group: FusedGroup, key: str, rows: int) -> str:
    names = ", ".join(p.name.rsplit(".", 1)[-1] for p in group.parts)
    return (f"{key}: fused weight {group.ldm} has {rows} output rows but its parts ({names}) have {group.rows} "
            "together, so it cannot be split into them")


def _add_split(lora: LoRA, group: FusedGroup, modules: list[LoRAModule], key: str) -> None:
    """Add a fused weight's parts; a part the file also stores under its own name is a problem, not overwritten."""
    for m in modules:
        slot = (m.info.component, m.info.name)
        if slot in lora.modules:
            lora.problems.append(f"module {slot[0]}:{slot[1]} is stored twice: on its own and inside {key}")
            del lora.modules[slot]
            continue
        lora.modules[slot] = m


def _refuse_other_arch(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], forced: ModuleTable, name: str) -> None:
    """A LoRA read against a given model that fits none of it but fits a known architecture: name both."""
    for other in ALL_ARCHS:
        if other == forced.arch:
            continue
        fitting, _ = _score(load_table(other), _match(sd, load_table(other))[0])
        if fitting:
            raise ModelMismatchError(f"{name} is a LoRA for {other} but the model is {forced.arch}: its layers have "
                                     f"other names and sizes, so it cannot be used with it. Use a LoRA made for {forced.arch}")


def unsupported_algorithms(sd: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """LyCORIS / DoRA algorithms a state dict uses that are not plain LoRA: label -> keys."""
    found: dict[str, list[str]] = defaultdict(list)
    for key in sd:
        label = unsupported_algorithm(key, dora=True)
        if label:
            found[label].append(key)
    return dict(found)


def _unsupported_message(name: str, algorithms: dict[str, list[str]]) -> str:
    labels = " + ".join(sorted(algorithms))
    count = sum(len(keys) for keys in algorithms.values())
    example = next(iter(algorithms.values()))[0]
    return (f"{name} is a {labels} file ({count} {labels} keys, e.g. {example}): {labels} is not supported; "
            "only LoRA and LoCon files can be read, converted or merged")


def detect_arch(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """The architecture whose table fits a LoRA state dict best."""
    return read_lora(sd, metadata=metadata, check_values=False).arch


__all__ = ["read_lora", "load_lora_file", "detect_arch", "metadata_arch", "load_table"]
