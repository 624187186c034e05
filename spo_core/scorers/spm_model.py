"""SPO's step-aware preference model (SPM) as a module: build, initialise, train, save, load.

The model is PickScore's CLIP with a timestep-modulated vision tower (`CLIPTorch(cfg,
time_conditioned=True)`), wrapped the way SPO's `StepAwarePreferenceModel` wraps it, so its
state dict has exactly the released keys (`model.`-prefixed). It is configurable by any
`CLIPConfigLite`: `clip_h14_config()` for the released ViT-H/14 models, a tiny config for the
demo world's model. The configuration travels with files we write (safetensors metadata, or a
string entry of a .bin); the released .bin files carry none and are CLIP-H (checked by shape).

    model = StepAwarePreferenceModel.from_clip(pickscore_state_dict, cfg)   # identity init: = PickScore
    logits = model(images01, input_ids, timesteps)                            # exp(logit_scale) * cos
    loss = preference_loss(logits_0, logits_1, label_0)                       # PickScore/SPM pairwise loss
    save_spm(model, "spm.safetensors"); load_spm("spm.safetensors")
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, InvalidTensorError, ModelMismatchError, WeightsNotFoundError
from ..safe_io import LazyTensor, atomic_output, check_output_path, name_list, save_safetensors_lazy
from .clip_loading import (CONFIG_METADATA_KEY, assign_weights, check_state_dict, clip_kind_hint, drop_position_ids,
                           find_hf_weights, key_mismatch_message, load_hf_config, read_weights)
from .clip_torch import CLIPConfigLite, CLIPTorch, clip_h14_config
from .preprocess import spm_pixels

log = logging.getLogger(__name__)

SPM_REPO = "huggingface.co/SPO-Diffusion-Models/Step-Aware_Preference_Models"
SPM_FILES = ("sd-v1-5_step-aware_preference_model.bin", "sdxl_step-aware_preference_model.bin")
SPM_HINT = (f"{SPM_FILES[0]} (for SD1.5) or {SPM_FILES[1]} (for SDXL) from {SPM_REPO}, "
            "or a safetensors conversion of one made by `spo scorer convert`")


class StepAwarePreferenceModel(nn.Module):
    """Scores (image, prompt, timestep): exp(logit_scale) * cos(f_V(x, t), f_T(prompt)).

    Images are [B,3,H,W] in [0,1] (decoded predicted-x0 images); they are preprocessed inside
    (`spm_pixels`), differentiably. Timesteps are DDPM timesteps (0..999, 0 = final image)."""

    def __init__(self, cfg: CLIPConfigLite):
        super().__init__()
        self.model = CLIPTorch(cfg, time_conditioned=True)

    @property
    def cfg(self) -> CLIPConfigLite:
        return self.model.cfg

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def image_embeds(self, images: torch.Tensor, timesteps) -> torch.Tensor:
        """L2-normalized image embeddings of [0,1] images at their timesteps."""
        w = self.model.visual_projection.weight
        pixels = spm_pixels(images.to(w.device), self.cfg.vision.image_size).to(w.dtype)
        t = torch.as_tensor(timesteps, dtype=torch.float32, device=w.device)  # fp32: exact timesteps
        f = self.model.image_features(pixels, t)
        return f / f.norm(dim=-1, keepdim=True)

    def text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """L2-normalized text embeddings of CLIP token ids [B,77]."""
        f = self.model.text_features(input_ids.to(self.model.text_projection.weight.device))
        return f / f.norm(dim=-1, keepdim=True)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, timesteps) -> torch.Tensor:
        """Logits [B] (PickScore's scale) for row-aligned images, token ids and timesteps."""
        img = self.image_embeds(images, timesteps).float()
        txt = self.text_embeds(input_ids).float()
        return self.logit_scale.float().exp() * (img * txt).sum(-1)

    @classmethod
    def identity(cls, cfg: CLIPConfigLite, seed: int | None = None) -> "StepAwarePreferenceModel":
        """A new model (random CLIP weights) at SPO's identity initialization of the adaLN."""
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
            if seed is not None:
                torch.manual_seed(seed)
            model = cls(cfg)
            init_adaln_identity(model)
        return model

    @classmethod
    def from_clip(cls, source, cfg: CLIPConfigLite | None = None) -> "StepAwarePreferenceModel":
        """SPO's starting point: a plain CLIP/PickScore's weights, adaLN at identity (the model then
        scores exactly like that CLIP at every timestep).

        `source`: a state dict (transformers CLIPModel names, `position_ids` tolerated), a
        transformers `CLIPModel`, a `CLIPTorch`, or a transformers CLIP folder (PickScore_v1)."""
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source).expanduser()
            if not folder.is_dir():
                raise WeightsNotFoundError(f"CLIP folder not found: {folder}")
            cfg = cfg or load_hf_config(folder)
            source, _ = read_weights(find_hf_weights(folder))
        elif isinstance(source, nn.Module):
            if cfg is None:
                cfg = source.cfg if isinstance(source, CLIPTorch) else CLIPConfigLite.from_transformers(source.config)
            source = source.state_dict()
        if cfg is None:
            raise ConfigError("from_clip(state_dict) needs the CLIP configuration (cfg=...)")
        sd = drop_position_ids(source)
        with torch.device("meta"):
            model = cls(cfg)
        expected = model.state_dict()
        clip_keys = {k[len("model."):] for k in expected if "adaLN" not in k and "t_embedder" not in k}
        missing = sorted(clip_keys - set(sd))
        unexpected = sorted(set(sd) - clip_keys)
        if missing or unexpected:
            raise ModelMismatchError(key_mismatch_message("the CLIP state dict", missing, unexpected,
                                                          clip_kind_hint(missing, unexpected)))
        tensors = {}
        for k, ref in expected.items():
            inner = k[len("model."):]
            if inner in clip_keys:
                if tuple(sd[inner].shape) != tuple(ref.shape):
                    raise ModelMismatchError(f"the CLIP state dict has {inner} of shape {list(sd[inner].shape)}, "
                                             f"the configuration needs {list(ref.shape)}")
                tensors[k] = sd[inner].detach().to("cpu", torch.float32, copy=True)  # never share the source's storage
            else:
                tensors[k] = torch.empty(ref.shape, dtype=torch.float32)
        model.load_state_dict(tensors, assign=True, strict=True)
        init_adaln_identity(model)
        return model

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.set_gradient_checkpointing(enabled)


@torch.no_grad()
def init_adaln_identity(model: StepAwarePreferenceModel | CLIPTorch) -> None:
    """SPO's `init_adaln_paras`: adaLN weights and biases 0 except the two gate slices' biases = 1
    (each layer is then exactly the plain CLIP layer), final adaLN 0, timestep MLP weights
    N(0, 0.02) (biases 0)."""
    clip = model.model if isinstance(model, StepAwarePreferenceModel) else model
    d = clip.cfg.vision.hidden_size
    for layer in clip.vision_model.encoder.layers:
        lin = layer.adaLN_modulation[1]
        lin.weight.zero_()
        lin.bias.zero_()
        lin.bias[2 * d: 3 * d] = 1  # gate_msa
        lin.bias[5 * d:] = 1  # gate_mlp
    clip.vision_model.adaLN_modulation[1].weight.zero_()
    clip.vision_model.adaLN_modulation[1].bias.zero_()
    for i in (0, 2):
        nn.init.normal_(clip.t_embedder.mlp[i].weight, std=0.02)
        clip.t_embedder.mlp[i].bias.zero_()


def preference_loss(logits_0: torch.Tensor, logits_1: torch.Tensor, label_0: torch.Tensor,
                    label_1: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """PickScore's / SPO's pairwise loss (`spm_criterion.py`, no in-batch negatives).

    Per pair: label_0 * CE([l0, l1], 0) + label_1 * CE([l0, l1], 1), plus log(0.5) for ties so
    that a perfect tie scores 0; weighted by `weights` (SPO: 1 / examples per prompt,
    normalized to sum 1; default: uniform), summed. label_0 is 1 (image 0 preferred), 0 or 0.5."""
    label_0 = torch.as_tensor(label_0, dtype=torch.float32, device=logits_0.device)
    label_1 = 1 - label_0 if label_1 is None else torch.as_tensor(label_1, dtype=torch.float32, device=logits_0.device)
    log_p = torch.log_softmax(torch.stack([logits_0.float(), logits_1.float()], dim=-1), dim=-1)
    loss = -(label_0 * log_p[:, 0] + label_1 * log_p[:, 1]) + (label_0 == label_1).float() * math.log(0.5)
    w = torch.ones_like(loss) if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=loss.device)
    return (loss * w / w.sum()).sum()


# ---------------------------------------------------------------- files


def spm_config_for(sd: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> CLIPConfigLite:
    """The configuration a file's own metadata gives, else CLIP-H (the released files), checked by shape."""
    if CONFIG_METADATA_KEY in metadata:
        try:
            return CLIPConfigLite.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        except (TypeError, KeyError, ValueError) as exc:
            raise ModelMismatchError(f"{what}: unreadable '{CONFIG_METADATA_KEY}' metadata: {exc}") from exc
    probe = sd.get("model.vision_model.embeddings.patch_embedding.weight")
    if probe is not None and tuple(probe.shape) != (1280, 3, 14, 14):
        raise ModelMismatchError(
            f"{what}: its vision tower (patch embedding {list(probe.shape)}) is not CLIP ViT-H/14, and the file carries "
            f"no '{CONFIG_METADATA_KEY}' metadata that would say its size; save models of other sizes with save_spm")
    return clip_h14_config()


def find_spm_file(path: str | os.PathLike) -> Path:
    """The SPM weights file at `path` (a file, or a folder holding one), or a WeightsNotFoundError that says what to get."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsNotFoundError(f"step-aware preference model not found: {p}. Download {SPM_HINT}.")
    if p.is_dir():
        cands = [p / n for n in SPM_FILES if (p / n).is_file()]
        cands += sorted(c for c in p.glob("*.safetensors") if "preference" in c.name or "spm" in c.name.lower())
        if not cands:
            raise WeightsNotFoundError(f"{p} holds no step-aware preference model. Download {SPM_HINT}.")
        p = cands[0]
    return p


def _spm_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], CLIPConfigLite]:
    """The file's tensors under `model.` keys (position_ids dropped) and its configuration."""
    sd, metadata = read_weights(path)
    sd = drop_position_ids(sd)
    if sd and not any(k.startswith("model.") for k in sd):
        sd = {"model." + k: v for k, v in sd.items()}  # the inner CLIP model saved alone
    return sd, spm_config_for(sd, metadata, str(path))


def _spm_hint(sd_keys: set[str], expected: set[str]) -> str:
    inner = {k[len("model."):] for k in expected}
    have = {k[len("model."):] for k in sd_keys}
    hint = clip_kind_hint(inner - have, have - inner)
    return hint or f"expected {SPM_HINT}"


def load_spm(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> StepAwarePreferenceModel:
    """Load a released SPM .bin (weights-only, memory-mapped) or a safetensors SPM (memory-mapped).

    Every key must be there (a missing one is named); `position_ids` buffers are tolerated."""
    p = find_spm_file(path)
    sd, cfg = _spm_state_dict(p)
    with torch.device("meta"):
        model = StepAwarePreferenceModel(cfg)
    hint = _spm_hint(set(sd), set(model.state_dict()))
    return assign_weights(model, sd, device, dtype, what=str(p), hint=hint)


def spm_metadata(cfg: CLIPConfigLite, **extra: str) -> dict[str, str]:
    return {CONFIG_METADATA_KEY: json.dumps(cfg.to_dict()), "spo.scorer": "spm", "format": "pt", **extra}


def save_spm(model: StepAwarePreferenceModel, path: str | os.PathLike, dtype: torch.dtype | None = None,
             overwrite: bool = False) -> Path:
    """Write an SPM with the released key names; safetensors (configuration in the metadata),
    or for .bin/.pt a weights-only torch file with the configuration as a string entry."""
    items = [(k, v.detach()) for k, v in model.state_dict().items()]
    p = Path(path).expanduser()
    if p.suffix.lower() in (".bin", ".pt", ".pth"):
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).cpu().contiguous() for k, v in items}
        with atomic_output(p, overwrite=overwrite) as tmp:
            torch.save({**tensors, CONFIG_METADATA_KEY: json.dumps(model.cfg.to_dict())}, tmp)
        return p
    specs = [_lazy(k, v, dtype) for k, v in items]
    return save_safetensors_lazy(specs, p, spm_metadata(model.cfg), overwrite=overwrite)


def _lazy(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> LazyTensor:
    out = dtype if dtype is not None and t.is_floating_point() else t.dtype
    return LazyTensor(name, out, tuple(t.shape), lambda: t.to(out))


def convert_spm_file(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = torch.float16,
                     overwrite: bool = False) -> Path:
    """A released pickled SPM (or any SPM file) -> safetensors in `dtype`: fp16 halves 5.22 GB to ~2.6 GB,
    and later loads are memory-mapped and pickle-free. Keys stay as released (`model.` prefix).

    Streams one tensor at a time from the memory-mapped source, so the peak memory is one tensor,
    after checking the whole key set and every shape."""
    p = find_spm_file(src)
    check_output_path(dst, [p])
    sd, cfg = _spm_state_dict(p)
    with torch.device("meta"):
        reference = StepAwarePreferenceModel(cfg)
    check_state_dict(reference, sd, str(p), _spm_hint(set(sd), set(reference.state_dict())))
    specs = [_lazy(k, sd[k], dtype) for k in reference.state_dict()]
    if dtype is not None and dtype != torch.float32:
        too_big = [k for k in reference.state_dict() if sd[k].is_floating_point() and sd[k].numel()
                   and float(sd[k].abs().max()) > torch.finfo(dtype).max]
        if too_big:
            raise InvalidTensorError(f"{len(too_big)} tensors of {p} hold values beyond {dtype}'s range and would be "
                                     f"written as inf: {name_list(too_big)}; convert to fp32 or bf16 instead")
    return save_safetensors_lazy(specs, dst, spm_metadata(cfg, **{"spo.source": p.name}), overwrite=overwrite)
