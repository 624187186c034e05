"""Resumable training checkpoints, written atomically and durably.

Layout (one folder per checkpoint, under `<output_dir>/checkpoints/`):

    step-000050/
      state.safetensors   LoRA factors (lora.*), optimizer tensors (optim.*), RNG states (rng.*),
                          the data source's buffered pairs/trajectories (buffer.*)
      state.json          step, config, optimizer param groups and scalars, data order position,
                          grad-scaler state, DDPO reward statistics, buffered items' scalars
      rank-N.safetensors / rank-N.json   the same for process N > 0 (multi-process runs)
      lora.safetensors    the LoRA at this step in kohya/webui format (usable as it is)
    latest                name of the newest complete checkpoint

A checkpoint is assembled in a hidden `.step-000050.partial` folder, every file fsync'ed, and
renamed into place; a run killed at any moment leaves the previous checkpoint intact, and
partial folders are ignored (and cleaned up) when resuming.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, CorruptFileError, FileMissingError
from ..safe_io import load_state_dict, save_safetensors

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))
             and (p / "state.json").is_file() and (p / "state.safetensors").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """'auto'/'latest' -> the newest checkpoint of output_dir (None if there is none: a new run);
    otherwise a checkpoint folder, or a run folder holding checkpoints (an error if it has none)."""
    if resume.lower() in ("auto", "latest", "true", "1", "yes"):
        return latest_checkpoint(output_dir)
    p = Path(resume).expanduser()
    if (p / "state.json").is_file():
        return p
    if p.is_dir():
        inner = latest_checkpoint(p.parent if p.name == CHECKPOINT_DIR else p)
        if inner is not None:
            return inner
    raise FileMissingError(f"{p} is not a training checkpoint (no state.json) nor a run folder with checkpoints")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def begin(output_dir: str | os.PathLike, step: int) -> Path:
    """Create (empty) the partial folder of a new checkpoint."""
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{checkpoint_name(step)}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_state(folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], rank: int = 0) -> None:
    """One process's part of a checkpoint."""
    stem = "state" if rank == 0 else f"rank-{rank}"
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, folder / f"{stem}.safetensors",
                     {"format": "pt"}, overwrite=True, fsync=True)
    path = folder / f"{stem}.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())


def commit(output_dir: str | os.PathLike, tmp: Path, step: int, keep: int) -> Path:
    """Rename the partial folder into place, point `latest` at it, delete old checkpoints."""
    _fsync_dir(tmp)
    root = tmp.parent
    final = root / checkpoint_name(step)
    if final.exists():  # the same step saved again (e.g. after a cancel)
        trash = root / f".{final.name}.old"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    latest_tmp = root / ".latest.partial"
    latest_tmp.write_text(final.name)
    _fsync_file(latest_tmp)
    os.replace(latest_tmp, root / "latest")
    if keep > 0:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".*.partial"):
        if stale.is_dir() and stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(folder: Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    stem = "state" if rank == 0 else f"rank-{rank}"
    st, js = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    if not st.is_file() or not js.is_file():
        raise FileMissingError(f"checkpoint {folder} has no {stem}.safetensors/.json (was it written by {rank + 1}+ processes?)")
    tensors, _ = load_state_dict(st)
    try:
        state = json.loads(js.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{js} is corrupt: {exc}") from exc
    return tensors, state


# -- optimizer state <-> (tensors, JSON) ------------------------------------------------------------


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, vals in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(vals)
    return {"state": state, "param_groups": meta["param_groups"]}


def check_resume_config(saved: dict, current: dict, safe: set[str]) -> None:
    """Refuse to resume with settings that change what the run computes (other than the safe ones)."""
    diffs = [k for k in current if k not in safe and k in saved and saved[k] != current[k]]
    if diffs:
        shown = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in diffs[:8])
        raise ConfigError(
            f"cannot resume: these settings differ from the checkpoint's ({shown}). Resume with the same settings, "
            "or start a new run in another output folder")
