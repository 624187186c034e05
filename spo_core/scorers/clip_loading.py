"""Reading CLIP-family weights into our plain-torch modules without doubling memory.

Weights load memory-mapped where the format allows (safetensors; zip-format torch files via
`torch.load(mmap=True, weights_only=True)`), are checked key by key against a model built on
the meta device, and are then assigned into it (`load_state_dict(assign=True)`), so a 5 GB
checkpoint never needs twice its size in RAM, and a wrong file is reported with the keys
that do not fit instead of loading half.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CorruptFileError, ModelMismatchError, WeightsNotFoundError
from ..safe_io import check_exists, is_safetensors, load_pickle_weights_only, open_safetensors
from .clip_torch import CLIPConfigLite, CLIPTorch

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "spo.clip_config"
HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, string metadata) of a safetensors or weights-only torch file, memory-mapped where possible.

    A top-level {'state_dict': ...} is unwrapped. String values of a torch file are returned as
    metadata (our .bin files carry their configuration that way)."""
    p = check_exists(path, "weights file")
    if p.is_dir():
        raise CorruptFileError(f"{p} is a folder; expected a weights file")
    if is_safetensors(p):
        f = open_safetensors(p)  # tensors are views of the mmapped file
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    obj = load_pickle_weights_only(p, mmap=True)  # legacy (non-zip) files are read whole
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{p} does not hold a state dict (found {type(obj).__name__})")
    metadata = {k: v for k, v in obj.items() if isinstance(v, str)}
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, metadata


def drop_position_ids(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers < 4.31 saved `*.embeddings.position_ids` buffers (arange); we compute them."""
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def _listing(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def key_mismatch_message(what: str, missing: list[str], unexpected: list[str], hint: str = "") -> str:
    msg = f"{what} does not fit the model:"
    if missing:
        msg += f"\n  missing {len(missing)} keys: {_listing(missing)}"
    if unexpected:
        msg += f"\n  unexpected {len(unexpected)} keys: {_listing(unexpected)}"
    return msg + (f"\n  {hint}" if hint else "")


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], what: str, hint: str = "") -> None:
    """Raise ModelMismatchError naming every missing/unexpected key and the first wrong shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ModelMismatchError(key_mismatch_message(what, missing, unexpected, hint))
    bad = [k for k in expected if tuple(sd[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise ModelMismatchError(f"{what}: {len(bad)} tensors have other shapes than the model, e.g. {k}: "
                                 f"{list(sd[k].shape)} in the file vs {list(expected[k].shape)} expected")


def assign_weights(model: nn.Module, sd: dict[str, torch.Tensor], device="cpu", dtype: torch.dtype = torch.float32,
                   what: str = "checkpoint", hint: str = "") -> nn.Module:
    """Check `sd` against `model` (built on meta) and assign its tensors, cast to device/dtype (no copy
    when they already match, so memory-mapped tensors stay mapped)."""
    check_state_dict(model, sd, what, hint)
    converted = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(converted, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def clip_kind_hint(missing: list[str] | set[str], unexpected: list[str] | set[str]) -> str:
    adaln_missing = any("adaLN" in k or "t_embedder" in k for k in missing)
    adaln_extra = any("adaLN" in k or "t_embedder" in k for k in unexpected)
    if adaln_missing and not adaln_extra:
        return "(this is a plain CLIP/PickScore checkpoint, not a step-aware preference model: load it as 'pickscore' or 'clip')"
    if adaln_extra and not adaln_missing:
        return "(this is a step-aware preference model: load it as 'spm')"
    if any(k.startswith(("visual.", "transformer.resblocks")) for k in unexpected):
        return "(this is an open_clip/OpenAI-layout checkpoint; pass it as a file, not as a transformers folder)"
    return ""


def find_hf_weights(folder: Path) -> Path:
    for name in HF_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    if sorted(folder.glob("model-*.safetensors")) or sorted(folder.glob("pytorch_model-*.bin")):
        raise CorruptFileError(f"{folder}: sharded checkpoints are not supported; save it unsharded "
                               "(save_pretrained(..., max_shard_size='20GB'))")
    raise WeightsNotFoundError(f"{folder} holds no {' or '.join(HF_WEIGHT_NAMES)}")


def load_hf_config(folder: Path) -> CLIPConfigLite:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsNotFoundError(f"{folder} has no config.json (a transformers CLIP folder is expected)")
    try:
        d = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{config_path} is not valid JSON: {exc}") from exc
    if d.get("model_type") not in (None, "clip"):
        raise ModelMismatchError(f"{config_path} describes a {d.get('model_type')!r} model, not CLIP")
    return CLIPConfigLite.from_transformers(d)


def load_hf_clip(folder: str | os.PathLike, device="cpu", dtype=torch.float32) -> CLIPTorch:
    """A transformers CLIP folder (config.json + weights), e.g. PickScore_v1 or openai/clip-vit-large-patch14."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WeightsNotFoundError(f"CLIP folder not found: {folder}")
    cfg = load_hf_config(folder)
    weights = find_hf_weights(folder)
    sd, _ = read_weights(weights)
    sd = drop_position_ids(sd)
    with torch.device("meta"):
        model = CLIPTorch(cfg)
    expected = set(model.state_dict())
    hint = clip_kind_hint(expected - set(sd), set(sd) - expected)
    return assign_weights(model, sd, device, dtype, what=str(weights), hint=hint)
