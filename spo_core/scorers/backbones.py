"""One interface over the CLIP models the scorers run on: our plain-torch CLIP (transformers
folders: PickScore_v1, openai/clip-vit-large-patch14, ...) and open_clip models (HPS v2, OpenAI
archives, open_clip state dicts).

A backbone gives projected (unnormalized) image embeddings of normalized pixels and text
embeddings of prompts; text embeddings are cached per prompt, since a candidate pool repeats
each prompt k times and a sampling run asks for the same prompts at every step.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from ..clip_tokenizer import load_clip_tokenizer
from ..errors import WeightsNotFoundError
from .clip_loading import load_hf_clip
from .clip_torch import CLIPTorch

log = logging.getLogger(__name__)

_CACHE_LIMIT = 4096


class ClipBackbone(ABC):
    """Embeddings of one CLIP model; subclasses define `_image`, `_text` and `module`."""

    module: nn.Module
    image_size: int
    embed_dim: int

    def __init__(self) -> None:
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalized float32 embeddings of normalized pixels [B,3,S,S] (differentiable)."""
        f = self._image(pixels.to(self.device, self.dtype)).float()
        return f / f.norm(dim=-1, keepdim=True)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalized float32 embeddings of prompts, computed once per distinct prompt."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            with torch.no_grad():
                f = self._text(todo).float()
            if len(self._text_cache) + len(todo) > _CACHE_LIMIT:
                self._text_cache.clear()
            self._text_cache.update(zip(todo, f / f.norm(dim=-1, keepdim=True)))
        return torch.stack([self._text_cache[p] for p in prompts])

    def logit_scale(self) -> torch.Tensor:
        return self.module.logit_scale.detach().float().exp()

    def to(self, device=None, dtype=None) -> None:
        self.module.to(device=device, dtype=dtype)
        self._text_cache.clear()

    @abstractmethod
    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image features of normalized pixels."""

    @abstractmethod
    def _text(self, prompts: list[str]) -> torch.Tensor:
        """Projected text features of prompts."""


class TorchClipBackbone(ClipBackbone):
    """Our `CLIPTorch` with transformers' CLIP tokenizer (77 tokens, padded with the end token)."""

    def __init__(self, model: CLIPTorch, tokenizer):
        super().__init__()
        self.module = model
        self.tokenizer = tokenizer
        self.image_size = model.cfg.vision.image_size
        self.embed_dim = model.cfg.projection_dim

    def _image(self, pixels):
        return self.module.image_features(pixels)

    def _text(self, prompts):
        return self.module.text_features(tokenize(self.tokenizer, prompts).to(self.device))


class OpenClipBackbone(ClipBackbone):
    """An open_clip CLIP with open_clip's tokenizer."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.module = model
        self.tokenizer = tokenizer
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(model.visual.output_dim)

    def _image(self, pixels):
        return self.module.encode_image(pixels)

    def _text(self, prompts):
        return self.module.encode_text(self.tokenizer(prompts).to(self.device))


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(folder: str | None):
    return load_clip_tokenizer(folder, max_length=77)


_tokenize_lock = threading.Lock()


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP token ids [B,77], padded and truncated as in CLIP training. Serialized: a shared fast
    tokenizer mutates its padding/truncation state per call ("Already borrowed" across threads)."""
    with _tokenize_lock:
        return tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


def clip_tokenizer(folder: str | os.PathLike | None = None):
    """The CLIP tokenizer of `folder` (default: the bundled BPE), built once per process (~1 s each)."""
    return _cached_tokenizer(str(Path(folder).expanduser().resolve()) if folder else None)


def folder_tokenizer(folder: Path, tokenizer_path: str | os.PathLike | None = None):
    """The tokenizer a model folder ships (vocab.json + merges.txt or tokenizer.json), else the bundled CLIP BPE."""
    if tokenizer_path:
        return clip_tokenizer(tokenizer_path)
    has = ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or (folder / "tokenizer.json").is_file()
    if has:
        try:
            return clip_tokenizer(folder)
        except Exception as exc:  # e.g. a tokenizer.json-only folder under transformers 4's slow tokenizer
            log.warning("cannot read the tokenizer in %s (%s); using the bundled CLIP BPE, which CLIP models share", folder, exc)
    return clip_tokenizer(None)


def load_clip_backbone(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32,
                       model_name: str | None = None, tokenizer_path: str | os.PathLike | None = None,
                       what: str = "CLIP model") -> ClipBackbone:
    """A transformers CLIP folder -> our plain-torch CLIP; a file -> open_clip (see open_clip_loading)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsNotFoundError(f"{what} not found: {p}")
    if p.is_dir():
        return TorchClipBackbone(load_hf_clip(p, device, dtype), folder_tokenizer(p, tokenizer_path))
    from .open_clip_loading import load_open_clip_model

    model, tokenizer = load_open_clip_model(p, model_name, device, dtype)
    return OpenClipBackbone(model, tokenizer)
