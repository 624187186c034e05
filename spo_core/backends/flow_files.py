"""SD3 / SD3.5 / Flux from single files, as ComfyUI and Forge users keep them: the diffusion model
(`sd3.5_medium.safetensors`, `flux1-dev.safetensors`), its VAE (inside an SD3 checkpoint, or
`ae.safetensors`) and its text encoders (`clip_l`, `clip_g`, `t5xxl_fp16.safetensors`, or inside an SD3
checkpoint under `text_encoders.*`).

Each part is converted by the libraries that own the formats: diffusers' `from_single_file` (its
original -> diffusers converters) against the configs shipped in `spo_core/configs/<arch>/` (or a
diffusers folder given as `config`), transformers for the text encoders' state dicts. Nothing is
downloaded, except T5's tokenizer when no local copy is named (the pipelines' `tokenizer_3` /
`tokenizer_2` folder, or ComfyUI's `comfy/text_encoders/t5_tokenizer`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, ModelMismatchError, require
from ..safe_io import check_exists, open_safetensors

log = logging.getLogger(__name__)

T5_TOKENIZER_HUB = "google/t5-v1_1-xxl"
_MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
_INSIDE = {"te1": "text_encoders.clip_l.transformer.", "te2": "text_encoders.clip_g.transformer.",
           "te3": "text_encoders.t5xxl.transformer."}
_NAMES = {"te1": "CLIP-L", "te2": "CLIP-G", "te3": "T5-XXL"}
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


@dataclass
class FlowFiles:
    """The files beside a single-file SD3/Flux model: text encoders (any order), VAE, T5 tokenizer, configs."""

    text_encoders: list[str] = field(default_factory=list)
    vae: str | None = None
    t5_tokenizer: str | None = None
    config: str | None = None


def _keys(path: Path) -> list[str]:
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return []
    return list(open_safetensors(path).keys())


def flow_file_family(path: str | Path) -> str | None:
    """'sd3' or 'flux' for a single safetensors file holding an SD3/SD3.5 or Flux transformer (original
    MMDiT / BFL names, or diffusers' names), None for anything else."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        return None
    keys = _keys(p)
    bare = set()
    for k in keys:
        for prefix in _MODEL_PREFIXES:
            if k.startswith(prefix):
                bare.add(k[len(prefix):].split(".", 1)[0])
                break
    if bare & {"double_blocks", "single_blocks", "single_transformer_blocks"}:
        return "flux"
    if "joint_blocks" in bare or ("transformer_blocks" in bare and "pos_embed" in bare):
        return "sd3"
    return None


def _config_folder(path: Path, config: str | None) -> tuple[str, Path]:
    """(architecture, configs folder): a given diffusers folder, or the shipped configs of the detected model."""
    if config is not None:
        folder = check_exists(config, "config folder")
        if not (folder / "transformer" / "config.json").is_file():
            raise ConfigError(f"{folder} has no transformer/config.json: give a diffusers folder of this model "
                              "(its configs are enough, no weights)")
        return "custom", folder
    from ..lora.checkpoints import CheckpointReader
    from ..lora.tables import CONFIG_DIR

    try:
        with CheckpointReader(path) as reader:
            arch = reader.arch
    except ModelMismatchError as exc:
        raise ModelMismatchError(f"{exc}. Give its configs with --config DIR (a diffusers folder of the model)") from None
    return arch, CONFIG_DIR / arch


def _te_config(folder: Path, sub: str) -> dict:
    path = folder / sub / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no {sub}/config.json")
    return json.loads(path.read_text())


def _te_sources(family: str, folder: Path, model: Path, files: list[str]) -> dict[str, tuple[Path, str]]:
    """component -> (file, key prefix) of each text encoder: inside the checkpoint, or one of `files`
    (T5 by its blocks; CLIPs by their width against the configs, in the order given when widths tie)."""
    from ..lora.tables import TE_FOLDERS

    wanted = {comp: sub for sub, comp in TE_FOLDERS[family].items()}
    found: dict[str, tuple[Path, str]] = {}
    inside = _keys(model)
    for comp, prefix in _INSIDE.items():
        if comp in wanted and any(k.startswith(prefix) for k in inside):
            found[comp] = (model, prefix)
    clips: list[tuple[Path, int]] = []
    for name in files:
        f = check_exists(name, "text encoder file")
        reader = open_safetensors(f) if f.suffix.lower() in (".safetensors", ".sft") else None
        keys = list(reader.keys()) if reader is not None else []
        q = next((k for k in keys if k.endswith("self_attn.q_proj.weight")), None)
        if any(k.endswith("SelfAttention.q.weight") for k in keys):
            if "te3" not in wanted:
                raise ConfigError(f"{f.name} is a T5 text encoder; this {family} model does not use one")
            if "te3" in found:
                raise ConfigError(f"two T5 text encoders: {found['te3'][0].name} and {f.name}")
            found["te3"] = (f, "")
        elif q is not None:
            clips.append((f, int(reader.shape(q)[0])))
        else:
            raise ConfigError(f"{f.name} is not a CLIP or T5 text encoder in transformers' layout (a safetensors file "
                              "with text_model.encoder.layers.* or encoder.block.* keys)")
    widths = {comp: int(_te_config(folder, wanted[comp]).get("hidden_size", 0)) for comp in ("te1", "te2") if comp in wanted}
    for f, width in clips:
        free = [c for c in ("te1", "te2") if c in widths and c not in found and widths[c] == width]
        if not free:
            have = ", ".join(f"{_NAMES[c]} {w}" for c, w in widths.items())
            raise ConfigError(f"{f.name} is a CLIP text encoder of width {width}; this model's are {have}"
                              + (" (both already given)" if all(c in found for c in widths) else ""))
        found[free[0]] = (f, "")
    required = ("te1", "te3") if family == "flux" else ("te1", "te2")
    missing = [c for c in required if c not in found]
    if missing:
        need = " and ".join(f"{_NAMES[c]} ({'clip_l' if c == 'te1' else 'clip_g' if c == 'te2' else 't5xxl_fp16'}"
                            ".safetensors)" for c in missing)
        raise ConfigError(f"{model.name} needs its text encoders: give {need} with `spo sample --text-encoders "
                          "FILE,FILE` (spo train and the app take SD3/Flux models as diffusers folders)")
    if family == "sd3" and "te3" not in found:
        log.warning("no T5-XXL given: SD3 runs on its two CLIPs alone (as diffusers does without text_encoder_3); "
                    "give t5xxl_fp16.safetensors with --text-encoders for the full prompt encoder")
    return found


def _load_text_encoder(folder: Path, sub: str, source: tuple[Path, str], dtype: torch.dtype):
    """A transformers CLIP / T5 encoder from a state dict in a file (under a key prefix), via from_pretrained."""
    transformers = require("transformers", "text encoders", "scorers")
    raw = _te_config(folder, sub)
    cls_name = (raw.get("architectures") or ["CLIPTextModel"])[0]
    config_cls = transformers.T5Config if cls_name == "T5EncoderModel" else transformers.CLIPTextConfig
    config = config_cls(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype")})
    path, prefix = source
    reader = open_safetensors(path)
    sd = {}
    for key in reader.keys():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if "scale_weight" in name or name == "scaled_fp8":
            raise ConfigError(f"{path.name} is a scaled-fp8 file (ComfyUI's *_scaled): not supported here; use the "
                              "fp16 or plain fp8 (e4m3fn) file")
        t = reader.get_tensor(key)
        sd[name] = t.to(dtype) if t.dtype in _FP8 else t
    if cls_name == "T5EncoderModel":  # one of the two tied embedding copies is often left out of the file
        for a, b in (("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight", "shared.weight")):
            if a not in sd and b in sd:
                sd[a] = sd[b]
    try:
        model, info = getattr(transformers, cls_name).from_pretrained(None, config=config, state_dict=sd, torch_dtype=dtype,
                                                                      output_loading_info=True)
    except (RuntimeError, ValueError) as exc:
        raise ModelMismatchError(f"{path.name} does not fit this model's {sub} ({cls_name}): {str(exc).splitlines()[0]}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise ModelMismatchError(f"{path.name} lacks {len(missing)} weights of this model's {sub} ({cls_name}), e.g. "
                                 f"{', '.join(sorted(missing)[:4])}")
    return model.eval()


def _t5_tokenizer(spec: str | None):
    transformers = require("transformers", "T5's tokenizer", "scorers")
    source = spec or T5_TOKENIZER_HUB
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"T5's tokenizer could not be loaded from {source} ({str(exc).splitlines()[0][:160]}). Give a local copy "
            "with --t5-tokenizer DIR: the tokenizer_3 folder of an SD3.5 download, tokenizer_2 of a Flux one, or "
            "ComfyUI's comfy/text_encoders/t5_tokenizer") from None


def _part(path: Path, keep) -> dict[str, torch.Tensor]:
    """The tensors of one part of a checkpoint (keys for which `keep(key)` gives the part's key, else None), read
    one by one from the memory-mapped file: converting a part never loads the others (an SD3 file's T5 is 9 GB)."""
    reader = open_safetensors(path)
    out = {}
    for key in reader.keys():
        name = keep(key)
        if name is not None:
            out[name] = reader.get_tensor(key)
    return out


_NOT_TRANSFORMER = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")


def _transformer(model: Path, cls, folder: Path, dtype: torch.dtype):
    from .diffusers_backend import quiet_load

    sd = _part(model, lambda k: None if k.startswith(_NOT_TRANSFORMER) else k)
    return quiet_load(cls.from_single_file, sd, config=str(folder), subfolder="transformer", torch_dtype=dtype,
                      local_files_only=True)


def _vae(model: Path, vae: str | None, folder: Path, dtype: torch.dtype):
    diffusers = require("diffusers", "rectified-flow models", "diffusers")
    from .diffusers_backend import quiet_load

    if vae:
        source = str(check_exists(vae, "VAE file"))
    else:
        prefix = "first_stage_model."
        source = _part(model, lambda k: k[len(prefix):] if k.startswith(prefix) else None)  # the checkpoint's own
        if not source:
            raise ConfigError(f"{model.name} holds no VAE: give it with --vae FILE (Flux: ae.safetensors; SD3.5: the "
                              "checkpoint's own, or diffusion_pytorch_model.safetensors of its vae folder)")
    return quiet_load(diffusers.AutoencoderKL.from_single_file, source, config=str(folder), subfolder="vae",
                      torch_dtype=dtype, local_files_only=True)


def load_flow_files(model: str | Path, files: FlowFiles | None = None, device="cpu", dtype: torch.dtype = torch.float32):
    """A FlowBackend over a diffusers StableDiffusion3Pipeline / FluxPipeline assembled from single files."""
    diffusers = require("diffusers", "rectified-flow models", "diffusers")
    from ..clip_tokenizer import load_clip_tokenizer
    from .flow_backend import FlowBackend

    files = files or FlowFiles()
    path = check_exists(model, "model file")
    family = flow_file_family(path)
    if family is None:
        raise ConfigError(f"{path.name} holds no SD3/SD3.5 or Flux transformer")
    arch, folder = _config_folder(path, files.config)
    cls = diffusers.FluxTransformer2DModel if family == "flux" else diffusers.SD3Transformer2DModel
    transformer = _transformer(path, cls, folder, dtype)
    vae = _vae(path, files.vae, folder, dtype)
    from ..lora.tables import TE_FOLDERS

    subs = {comp: sub for sub, comp in TE_FOLDERS[family].items()}
    sources = _te_sources(family, folder, path, list(files.text_encoders))
    enc = {comp: _load_text_encoder(folder, subs[comp], src, dtype) for comp, src in sources.items()}
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    t5_tok = _t5_tokenizer(files.t5_tokenizer) if "te3" in enc else None
    if family == "flux":
        pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=enc["te1"], tokenizer=load_clip_tokenizer(),
                                      text_encoder_2=enc["te3"], tokenizer_2=t5_tok, transformer=transformer)
    else:
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=enc["te1"], tokenizer=load_clip_tokenizer(),
            text_encoder_2=enc["te2"], tokenizer_2=load_clip_tokenizer(pad_token="!"), text_encoder_3=enc.get("te3"),
            tokenizer_3=t5_tok)
    pipe.set_progress_bar_config(disable=True)
    log.info("assembled a %s pipeline (%s) from %s", family, arch, ", ".join(
        sorted({path.name, *(s[0].name for s in sources.values())} | ({Path(files.vae).name} if files.vae else set()))))
    return FlowBackend.from_pipeline(pipe, device=device, dtype=dtype)
