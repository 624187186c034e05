"""`world`: the one model name the pack resolves itself, to the embedded tiny world's files.

Every place that takes a model, scorer weights or prompts accepts `world` (unless a file or
folder of that name exists): `--model world` is the shipped base model, `--scorer-weights world`
its step-aware preference model (or latent reward model, with `--scorer lrm`), `--prompts world` its training prompts. Kept free of heavy
imports, so the LoRA engine can use it inside the WebUI's environment.
"""

from __future__ import annotations

import os
from pathlib import Path

WORLD = "world"
FLOW_WORLD = "world-flow"
WORLD_WEIGHTS = Path(__file__).resolve().parent / "world" / "weights"
WORLD_MODEL = WORLD_WEIGHTS / "base"
WORLD_SPM = WORLD_WEIGHTS / "spm.safetensors"
WORLD_LRM = WORLD_WEIGHTS / "lrm.safetensors"


def is_world(spec: str | os.PathLike | None) -> bool:
    """True when `spec` names the embedded world (and no file or folder of that name is meant)."""
    return spec is not None and str(spec).strip().lower() == WORLD and not Path(str(spec)).exists()


def is_flow_world(spec: str | os.PathLike | None) -> bool:
    """True when `spec` names the embedded world's rectified-flow model (`world-flow`)."""
    return spec is not None and str(spec).strip().lower() == FLOW_WORLD and not Path(str(spec)).exists()


def is_any_world(spec: str | os.PathLike | None) -> bool:
    """`world` or `world-flow`: either of the embedded world's models (its SPM and prompts serve both)."""
    return is_world(spec) or is_flow_world(spec)


def resolve_model(spec: str | os.PathLike) -> str | os.PathLike:
    """The world's base model folder for `world`, anything else unchanged."""
    return str(WORLD_MODEL) if is_world(spec) else spec


def resolve_scorer_weights(scorer: str, spec: str | os.PathLike | None) -> str | os.PathLike | None:
    """The world's SPM (`spm`) or latent reward model (`lrm`) for `world`, anything else unchanged."""
    if is_world(spec):
        if scorer not in ("spm", "lrm"):
            from .errors import ConfigError

            raise ConfigError(f"'world' weights exist for the spm and lrm scorers only, not for {scorer!r}")
        return str(WORLD_SPM if scorer == "spm" else WORLD_LRM)
    return spec
