"""Latent reward model files: the released LPO layout, and the pack's one-file safetensors.

Released (Kwai-Kolors/LPO): a folder with `unet/` (a diffusers UNet, up blocks included),
`text_encoder/` (+ `text_encoder_2/` for SDXL) and `state_dict.pt` holding
{visual_projection: {weight}, text_projection: {weight} (SD1.5), logit_scale}. Every weight file
is read pickle-free (safetensors) or weights-only (a pickle that needs code is refused unrun).

Pack format: one safetensors file with `unet.*` (no up blocks: the LRM never uses them),
`text_encoder.*` (`text_model.`-prefixed, as transformers 4 saves it, whatever version wrote it),
`text_encoder_2.*`, `visual_projection.weight`, `text_projection.weight`, `logit_scale`, and the
configuration in the metadata (`spo.lrm.config`). `spo scorer convert` writes it (fp16 by default).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..errors import ConfigError, CorruptFileError, ModelMismatchError, WeightsNotFoundError
from ..safe_io import LazyTensor, check_output_path, load_pickle_weights_only, save_safetensors_lazy
from .clip_loading import read_weights
from .lrm_model import LatentRewardModel, LRMConfig

log = logging.getLogger(__name__)

CONFIG_KEY = "spo.lrm.config"
LRM_HINT = ("an LPO latent reward model: a folder with unet/, text_encoder/ and state_dict.pt (github.com/Kwai-Kolors/LPO, "
            "huggingface.co/casiatao/LRM), or a `spo scorer convert` safetensors of one; `world` for the embedded world's")
_DROPPED = ("up_blocks.", "conv_norm_out.", "conv_out.")


def is_released_folder(path: Path) -> bool:
    return path.is_dir() and (path / "unet").is_dir() and (path / "state_dict.pt").is_file()


def is_lrm_source(path: Path) -> bool:
    """A released LRM folder, or a safetensors file with LRM metadata (what `spo scorer convert` takes)."""
    if is_released_folder(path):
        return True
    if path.is_file() and path.suffix == ".safetensors":
        from ..safe_io import read_safetensors_header

        try:
            return CONFIG_KEY in read_safetensors_header(path)[1]
        except Exception:  # unreadable: the SPM converter reports it
            return False
    return False


def _component_weights(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                 "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsNotFoundError(f"{folder} holds no weights (diffusion_pytorch_model.safetensors / model.safetensors / .bin)")


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsNotFoundError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON: {exc}") from exc


def canonical_text_key(key: str) -> str:
    """Text-encoder keys as files hold them (`text_model.` prefix; transformers 5 drops it in CLIPTextModel)."""
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def _fit_keys(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Map file keys onto a live model's: a text encoder's `text_model.` prefix differs between
    transformers versions (`text_encoder.text_model.x` in files, `text_encoder.x` under transformers 5)."""
    out = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        candidates = [k]
        if head in ("text_encoder", "text_encoder_2"):
            bare = rest[len("text_model."):] if rest.startswith("text_model.") else rest
            candidates += [f"{head}.{bare}", f"{head}.text_model.{bare}"]
        out[next((c for c in candidates if c in expected), k)] = v
    return out


def _lrm_config_from_folder(folder: Path, state: dict) -> LRMConfig:
    unet = _config(folder / "unet")
    text = _config(folder / "text_encoder")
    sdxl = unet.get("addition_embed_type") == "text_time" or (folder / "text_encoder_2").is_dir()
    text_2 = _config(folder / "text_encoder_2") if sdxl else None
    vis = state["visual_projection"]["weight"]
    return LRMConfig(arch="sdxl" if sdxl else "sd1", unet=unet, text=text, text_2=text_2, projection_dim=int(vis.shape[0]))


def _read_state_pt(path: Path) -> dict:
    obj = load_pickle_weights_only(path)
    if not isinstance(obj, dict) or "visual_projection" not in obj or "logit_scale" not in obj:
        raise CorruptFileError(f"{path} is not an LRM head (expected visual_projection, text_projection and logit_scale; "
                               f"found {sorted(obj) if isinstance(obj, dict) else type(obj).__name__})")
    state = dict(obj)
    for key in ("visual_projection", "text_projection"):
        value = state.get(key)
        if isinstance(value, torch.Tensor):
            state[key] = {"weight": value}
    return state


def released_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], LRMConfig]:
    """The released folder's tensors under the pack's keys, and the configuration."""
    state = _read_state_pt(folder / "state_dict.pt")
    cfg = _lrm_config_from_folder(folder, state)
    sd: dict[str, torch.Tensor] = {}
    unet_sd, _ = read_weights(_component_weights(folder / "unet"))
    sd.update({f"unet.{k}": v for k, v in unet_sd.items() if not k.startswith(_DROPPED)})
    for sub in ("text_encoder", "text_encoder_2") if cfg.arch == "sdxl" else ("text_encoder",):
        part, _ = read_weights(_component_weights(folder / sub))
        sd.update({f"{sub}.{canonical_text_key(k)}": v for k, v in part.items() if not k.endswith("position_ids")})
    sd["visual_projection.weight"] = state["visual_projection"]["weight"]
    if cfg.arch != "sdxl":
        if "text_projection" not in state:
            raise CorruptFileError(f"{folder / 'state_dict.pt'} has no text_projection (an SD1.5 LRM needs one)")
        sd["text_projection.weight"] = state["text_projection"]["weight"]
    scale = state["logit_scale"]
    sd["logit_scale"] = scale.detach().reshape(()) if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))
    return sd, cfg


def file_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], LRMConfig]:
    sd, metadata = read_weights(path)
    raw = metadata.get(CONFIG_KEY)
    if not raw:
        raise ModelMismatchError(f"{path} is not a latent reward model file (no {CONFIG_KEY} in its metadata); "
                                 f"expected {LRM_HINT}")
    try:
        return sd, LRMConfig.from_json(raw)
    except (ValueError, TypeError) as exc:
        raise CorruptFileError(f"{path}: its {CONFIG_KEY} metadata is not a valid LRM configuration ({exc})") from exc


def resolve_lrm_path(path: str | os.PathLike) -> Path:
    from ..model_names import WORLD_LRM, is_world

    if is_world(path):
        return WORLD_LRM
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsNotFoundError(f"latent reward model not found: {p}; expected {LRM_HINT}")
    if p.is_dir() and not is_released_folder(p):
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise WeightsNotFoundError(f"{p} is neither a released LRM folder (unet/ + state_dict.pt) nor a folder holding one "
                                   f"LRM .safetensors file; expected {LRM_HINT}")
    return p


def lrm_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LRMConfig]:
    p = resolve_lrm_path(path)
    return released_state_dict(p) if p.is_dir() else file_state_dict(p)


def load_lrm(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> LatentRewardModel:
    """An LRM from a released folder, a pack file, or `world`; built on meta, weights assigned (no copy)."""
    sd, cfg = lrm_state_dict(path)
    if cfg.text_encoder_source == "world":
        sd = {**sd, **_world_text_encoder()}
    with torch.device("meta"):
        model = LatentRewardModel(cfg)
    sd = _fit_keys(sd, set(model.state_dict()))
    missing = sorted(set(model.state_dict()) - set(sd))
    unexpected = sorted(set(sd) - set(model.state_dict()))
    if missing or unexpected:
        raise ModelMismatchError(f"{path}: the file does not fit the LRM it describes ({len(missing)} missing, e.g. "
                                 f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})")
    bad = [k for k, v in model.state_dict().items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise ModelMismatchError(f"{path}: {bad[0]} has shape {list(sd[bad[0]].shape)}, the LRM expects "
                                 f"{list(model.state_dict()[bad[0]].shape)}")
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True, strict=True)
    _materialize_buffers(model, device)
    return model.eval().requires_grad_(False)


def _materialize_buffers(model: torch.nn.Module, device) -> None:
    """Buffers not in state dicts (CLIP's position_ids) are still on `meta` after an assign-load: rebuild them."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name != "position_ids":
                raise ModelMismatchError(f"the LRM's buffer {name} is not in the file and cannot be rebuilt")
            module._buffers[name] = torch.arange(buf.shape[-1], device=device).expand(buf.shape).clone()


def _world_text_encoder() -> dict[str, torch.Tensor]:
    from ..model_names import WORLD_MODEL

    sd, _ = read_weights(_component_weights(WORLD_MODEL / "text_encoder"))
    return {f"text_encoder.{canonical_text_key(k)}": v for k, v in sd.items() if not k.endswith("position_ids")}


def save_lrm(model: LatentRewardModel, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16,
             overwrite: bool = False, shared_text_encoder: str | None = None, extra: dict[str, str] | None = None) -> Path:
    """The pack's one-file format. `shared_text_encoder="world"` leaves the (frozen) text encoder out:
    it is the world's base encoder, loaded from there."""
    import dataclasses

    cfg = dataclasses.replace(model.cfg, text_encoder_source=shared_text_encoder or "own")
    items = []
    for key, value in model.state_dict().items():
        if key.startswith("text_encoder.") and shared_text_encoder:
            continue
        if key.startswith(("text_encoder.", "text_encoder_2.")):
            head, _, rest = key.partition(".")
            key = f"{head}.{canonical_text_key(rest)}"
        items.append((key, value.detach()))
    specs = [_lazy(k, v, dtype) for k, v in items]
    meta = {CONFIG_KEY: cfg.to_json(), "spo.scorer": "lrm", "format": "pt", **(extra or {})}
    return save_safetensors_lazy(specs, path, meta, overwrite=overwrite)


def _lazy(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> LazyTensor:
    out = dtype if dtype is not None and t.is_floating_point() and name != "logit_scale" else t.dtype
    return LazyTensor(name, out, tuple(t.shape), lambda: t.to(out).cpu())


def convert_lrm(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = torch.float16,
                overwrite: bool = False) -> Path:
    """A released LRM folder (or any LRM file) -> the pack's one-file safetensors, written one tensor at a time."""
    p = resolve_lrm_path(src)
    check_output_path(dst, [p])
    sd, cfg = lrm_state_dict(p)
    with torch.device("meta"):
        reference = LatentRewardModel(cfg)
    expected = {k if not k.startswith(("text_encoder.", "text_encoder_2.")) else
                k.split(".", 1)[0] + "." + canonical_text_key(k.split(".", 1)[1]) for k in reference.state_dict()}
    if cfg.text_encoder_source == "world":
        expected = {k for k in expected if not k.startswith("text_encoder.")}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ModelMismatchError(f"{p}: {len(missing)} tensors missing (e.g. {missing[:3]}), {len(unexpected)} "
                                 f"unexpected (e.g. {unexpected[:3]}) for the LRM its configs describe")
    if dtype is not None and dtype != torch.float32:
        big = [k for k, v in sd.items() if v.is_floating_point() and v.numel() and float(v.abs().max()) > torch.finfo(dtype).max]
        if big:
            raise ConfigError(f"{len(big)} tensors of {p} exceed {dtype}'s range (e.g. {big[0]}); convert to fp32 or bf16")
    specs = [_lazy(k, sd[k], dtype) for k in sorted(sd)]
    meta = {CONFIG_KEY: cfg.to_json(), "spo.scorer": "lrm", "format": "pt", "spo.source": p.name}
    return save_safetensors_lazy(specs, dst, meta, overwrite=overwrite)
