"""Which WebUI this is, and its folders, without importing anything heavy."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def is_forge() -> bool:
    """Forge ships `modules_forge` and a `backend` package; A1111 has neither."""
    return importlib.util.find_spec("modules_forge") is not None


def flavor() -> str:
    return "forge" if is_forge() else "a1111"


def models_path() -> Path:
    from modules import paths

    return Path(paths.models_path)


def data_path() -> Path:
    """The WebUI's data folder (`--data-dir`, else its root)."""
    from modules import paths

    value = getattr(paths, "data_path", None)
    return Path(value) if value else models_path().parent


def lora_dir() -> Path:
    """`--lora-dir` (added by the built-in Lora extension's preload), else models/Lora."""
    from modules import shared

    value = getattr(getattr(shared, "cmd_opts", None), "lora_dir", None)
    return Path(value) if value else models_path() / "Lora"


def checkpoint_dirs() -> list[Path]:
    from modules import shared

    dirs = [models_path() / "Stable-diffusion"]
    ckpt_dir = getattr(getattr(shared, "cmd_opts", None), "ckpt_dir", None)
    if ckpt_dir:
        dirs.insert(0, Path(ckpt_dir))
    return dirs


def scorer_dir() -> Path:
    """Where scorer weights live: the `spo_scorer_dir` setting, else models/SPO."""
    from modules import shared

    value = getattr(getattr(shared, "opts", None), "spo_scorer_dir", "") or ""
    return Path(value) if value else models_path() / "SPO"


def same_file(a: os.PathLike, b: os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
