"""open_clip models from local files: HPS v2 checkpoints, OpenAI CLIP archives, open_clip state dicts.

- With a `model_name` (e.g. "ViT-H-14" for HPS), the architecture is open_clip's config of
  that name and the file must fit it exactly (strict).
- Without one, the file is read as an OpenAI CLIP (the JIT archive `ViT-L-14.pt` or its state
  dict): sizes are inferred from the shapes and QuickGELU is used, as OpenAI trained it.
  (Building an OpenAI model with open_clip's plain "ViT-L-14" config would silently use GELU.)

Pickled files load weights-only. OpenAI's `.pt` files are TorchScript archives, which
`torch.jit.load` reads without unpickling Python objects; only their state dict is used.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import torch

from ..errors import ModelMismatchError, require
from ..safe_io import check_exists, load_state_dict

log = logging.getLogger(__name__)


_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's archives, not weights


def is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def read_open_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    p = check_exists(path, "CLIP weights file")
    if is_torchscript_archive(p):
        sd = dict(torch.jit.load(str(p), map_location="cpu").state_dict())
        sd = {k: v for k, v in sd.items() if not k.endswith("attn_mask")}  # a buffer, rebuilt by open_clip
    else:
        sd, _ = load_state_dict(p)  # weights-only; unwraps {'state_dict': ...}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _fill_meta_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers left on meta after assigning weights: open_clip's causal text mask."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name != "attn_mask" or buf.ndim != 2:
                raise RuntimeError(f"unexpected meta buffer {name}")
            n = buf.shape[0]
            module._buffers[name] = torch.full((n, n), float("-inf")).triu_(1)


def load_open_clip_model(path: str | os.PathLike, model_name: str | None = None, device="cpu",
                         dtype: torch.dtype = torch.float32):
    """(open_clip CLIP model in eval mode, its tokenizer) from a local file."""
    open_clip = require("open_clip", "open_clip-format CLIP and HPS scorers", "scorers")
    sd = read_open_clip_state_dict(path)
    if model_name is None:
        if "visual.proj" not in sd or "visual.conv1.weight" not in sd:
            raise ModelMismatchError(f"{path} is not an OpenAI-layout ViT CLIP; pass model_name "
                                     "(an open_clip architecture such as ViT-H-14) for other open_clip checkpoints")
        try:
            from open_clip.model import build_model_from_openai_state_dict

            model = build_model_from_openai_state_dict(dict(sd), cast_dtype=None)
            model.float().load_state_dict({k: v for k, v in sd.items() if k not in _OPENAI_EXTRAS})  # undo its fp16 rounding
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ModelMismatchError(f"{path} does not fit an OpenAI CLIP ({str(exc)[:300]}); for other open_clip "
                                     "checkpoints pass model_name (the open_clip architecture, e.g. ViT-H-14)") from exc
        tokenizer = open_clip.get_tokenizer("ViT-L-14-quickgelu")
    else:
        if model_name not in open_clip.list_models():
            raise ModelMismatchError(f"open_clip has no architecture {model_name!r}; choose one of open_clip.list_models()")
        try:
            model = open_clip.create_model(model_name, pretrained=None, device="meta")
            model.load_state_dict(sd, strict=True, assign=True)
            _fill_meta_buffers(model)
        except RuntimeError as exc:
            raise ModelMismatchError(f"{path} is not an open_clip {model_name} checkpoint: {str(exc)[:600]}") from exc
        tokenizer = open_clip.get_tokenizer(model_name)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, tokenizer
