"""Merge a LoRA into a checkpoint, or into live modules: W <- W + strength * delta.

Checkpoints are rewritten tensor by tensor (one tensor in memory at a time): a single-file
checkpoint becomes a new single file with the same keys and dtypes; a diffusers folder
becomes a new folder whose changed components are rewritten as safetensors and whose other
files are copied.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from ..errors import ConfigError, InvalidTensorError, ModelMismatchError, OutputExistsError
from ..progress import CancelFn, ProgressFn, Reporter
from ..safe_io import (SAFETENSORS_SUFFIXES, LazyTensor, atomic_folder, atomic_output, check_exists, check_output_path,
                       name_list, read_safetensors_header, save_safetensors_lazy)
from .checkpoints import CheckpointReader, Location, raw_keys
from .model import LoRA
from .tables import ALL_ARCHS, COMPONENT_NAMES, COMPONENTS, DENOISERS, live_te_name

log = logging.getLogger(__name__)


def _edits(reader: CheckpointReader, lora: LoRA, strength: float) -> dict[tuple[str, str], list]:
    """(file, key) -> [(row slice or None, transpose, delta fn)] for every tensor the LoRA changes."""
    if lora.arch != reader.arch:
        raise ModelMismatchError(f"the LoRA is for {lora.arch} but the checkpoint {reader.path} is {reader.arch}")
    edits: dict[tuple[str, str], list] = defaultdict(list)
    missing = []
    for (comp, name), m in lora.modules.items():
        loc = reader.locations.get((comp, name))
        if loc is None:
            missing.append(f"{comp}:{name}")
            continue
        edits[(loc.file, loc.key)].append((loc, lambda m=m: m.delta() * strength))
    for (comp, name), d in lora.diffs.items():
        for part, table in (("diff", reader.locations), ("diff_b", reader.biases)):
            t = getattr(d, part)
            if t is None:
                continue
            loc = table.get((comp, name))
            if loc is None:
                missing.append(f"{comp}:{name}.{part}")
                continue
            edits[(loc.file, loc.key)].append((loc, lambda t=t: t.float() * strength))
    if missing:
        held = set(reader.components())
        absent = sorted({m.split(":")[0] for m in missing} - held, key=COMPONENTS.index)
        if absent:
            counts = ", ".join(f"{c} ({COMPONENT_NAMES.get(c, c)}): {sum(m.startswith(c + ':') for m in missing)} modules"
                               for c in absent)
            raise ModelMismatchError(
                f"the LoRA also changes {counts}, which {reader.path} does not hold (it has {', '.join(sorted(held))}); "
                f"merge the rest with --only {','.join(c for c in lora.components() if c in held)}")
        raise ModelMismatchError(f"{len(missing)} LoRA modules are not in {reader.path}: {', '.join(missing[:8])}")
    return edits


def _apply(tensor: torch.Tensor, changes: list) -> torch.Tensor:
    """Add each delta into its place: the whole tensor, or its row ranges (fused q/k/v, swapped halves)."""
    out = tensor.float().clone()
    for loc, delta_fn in changes:
        delta = delta_fn()
        if loc.transpose:
            delta = delta.T
        if loc.rows is None:
            out += delta.reshape(out.shape)
            continue
        start = 0
        for a, b in loc.rows:
            target = out[a:b]
            target += delta[start:start + b - a].reshape(target.shape)
            start += b - a
    return out.to(tensor.dtype)


def merged_output_path(checkpoint: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Where a merge is written: a single file always as safetensors (OUT.ckpt -> OUT.safetensors)."""
    from ..model_names import resolve_model

    output = Path(output).expanduser()
    if Path(resolve_model(checkpoint)).is_dir() or output.suffix.lower() in SAFETENSORS_SUFFIXES:
        return output
    return output.with_suffix(".safetensors")


def merge_into_checkpoint(
    checkpoint: str | os.PathLike,
    lora: LoRA,
    output: str | os.PathLike,
    strength: float = 1.0,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    inputs: tuple = (),
) -> Path:
    """Write `checkpoint` with `lora` merged at `strength` to `output` (same layout as the input);
    returns the path written (see `merged_output_path`).

    Safe by construction: an output that is, contains or lies inside the checkpoint (or any of
    `inputs`, e.g. the LoRA file) is refused before anything is read; the new file or folder is
    built beside the old output and swapped in only when complete; a merge that would write NaN
    or inf (a non-finite strength, a delta beyond the checkpoint dtype's range) writes nothing and
    names the tensors.
    """
    if not math.isfinite(strength):
        raise ConfigError(f"strength must be a finite number, got {strength}")
    from ..model_names import resolve_model

    source = check_exists(resolve_model(checkpoint), "checkpoint")
    output = merged_output_path(source, output)
    check_output_path(output, [source, *inputs], folder=source.is_dir())
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; pass overwrite (--overwrite) to replace it")
    reader = CheckpointReader(source, arch=lora.table if lora.arch not in ALL_ARCHS else None)
    edits = _edits(reader, lora, strength)
    files = raw_keys(reader)
    reporter = Reporter("merge", sum(len(k) for k in files.values()), progress, cancel)
    done = 0
    overflowed: list[str] = []

    def write_file(src: str, dst: Path) -> None:
        nonlocal done
        specs = []
        meta = {}
        if src.endswith((".safetensors", ".sft")):
            _, meta = read_safetensors_header(src)
        for key in files[src]:
            dtype, shape = reader.files.info(src, key)
            changes = edits.get((src, key))

            def produce(key=key, changes=changes):
                nonlocal done
                done += 1
                if done % 50 == 0:
                    reporter.update(done, key)
                t = reader.files.get(src, key)
                if not changes:
                    return t
                merged = _apply(t, changes)
                if not torch.isfinite(merged).all():
                    overflowed.append(key)
                return merged

            specs.append(LazyTensor(key, dtype, shape, produce))
        save_safetensors_lazy(specs, dst, meta or None, overwrite=True)

    def refuse_overflow() -> None:
        if overflowed:
            raise InvalidTensorError(
                f"merging at strength {strength:g} would write NaN or inf into {len(overflowed)} tensors of {source} "
                f"(beyond their dtype's range): {name_list(overflowed)}. Nothing was written; lower the strength, "
                "or merge into an fp32 checkpoint")

    try:
        if reader.path.is_dir():
            changed = {f for f, _ in edits}
            with atomic_folder(output, overwrite=overwrite) as tmp:
                for src in sorted(reader.path.rglob("*")):
                    if src.is_dir():
                        continue
                    dst = tmp / src.relative_to(reader.path)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if str(src) in changed:
                        write_file(str(src), dst.with_suffix(".safetensors") if dst.suffix == ".bin" else dst)
                    else:
                        shutil.copy2(src, dst)
                refuse_overflow()
        else:
            with atomic_output(output, overwrite=overwrite) as tmp:
                write_file(str(reader.path), tmp)
                refuse_overflow()
    finally:
        reader.close()
    reporter.update(reporter.total, "done")
    return output


@torch.no_grad()
def merge_into_modules(modules: dict[str, torch.nn.Module], lora: LoRA, strength: float = 1.0) -> int:
    """Add the LoRA into live modules in place: `modules` maps component -> root module
    (a diffusers UNet or Flux/SD3 transformer, transformers text encoders). Returns the number of modules changed."""
    count = 0
    for (comp, name), m in lora.modules.items():
        root = modules.get(comp)
        if root is None:
            continue
        live = name if comp in DENOISERS else live_te_name(name, root)
        target = root.get_submodule(live)
        target.weight += (m.delta(dtype=torch.float32, device=target.weight.device) * strength).to(target.weight.dtype).reshape(target.weight.shape)
        count += 1
    for (comp, name), d in lora.diffs.items():
        root = modules.get(comp)
        if root is None:
            continue
        target = root.get_submodule(name if comp in DENOISERS else live_te_name(name, root))
        if d.diff is not None:
            target.weight += (d.diff.float() * strength).to(target.weight)
        if d.diff_b is not None and target.bias is not None:
            target.bias += (d.diff_b.float() * strength).to(target.bias)
        count += 1
    return count


__all__ = ["merge_into_checkpoint", "merge_into_modules", "merged_output_path", "Location"]
