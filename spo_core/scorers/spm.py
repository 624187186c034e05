"""SPO's step-aware preference model as a scorer.

Scores the decoded predicted-x0 image of each candidate at its timestep t (0 for final
images): `exp(logit_scale) * cos(f_V(x, t), f_T(prompt))`, PickScore's scale. Text embeddings
are cached per prompt (a pool repeats each prompt k times, and every step reuses them); the
image path stays differentiable for DRaFT/ReFL-style use.
"""

from __future__ import annotations

import os

import torch

from .backbones import clip_tokenizer, tokenize
from .base import Scorer
from .spm_model import StepAwarePreferenceModel, load_spm

_CACHE_LIMIT = 4096


class SPMScorer(Scorer):
    name = "spm"
    step_aware = True
    differentiable = True
    needs_prompt = True

    def __init__(self, model: StepAwarePreferenceModel, tokenizer=None, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer if tokenizer is not None else clip_tokenizer()
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_path(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32,
                  tokenizer_path: str | os.PathLike | None = None) -> "SPMScorer":
        """A released .bin, a `spo scorer convert` safetensors, or a folder holding one."""
        model = load_spm(path, device=device, dtype=dtype)
        tokenizer = clip_tokenizer(tokenizer_path) if tokenizer_path else None
        return cls(model, tokenizer, device, dtype)

    def modules(self):
        return [self.model]

    def _move(self, device, dtype):
        self.model.to(device=device, dtype=dtype)
        self._text_cache.clear()

    def input_ids(self, prompts: list[str]) -> torch.Tensor:
        """CLIP token ids [B,77] as in SPO's training (padded to 77 with the end token)."""
        return tokenize(self.tokenizer, prompts)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            with torch.no_grad():
                f = self.model.text_embeds(self.input_ids(todo)).float()
            if len(self._text_cache) + len(todo) > _CACHE_LIMIT:
                self._text_cache.clear()
            self._text_cache.update(zip(todo, f))
        return torch.stack([self._text_cache[p] for p in prompts])

    def _score(self, images, prompts, timesteps):
        img = self.model.image_embeds(images, timesteps).float()
        return self.model.logit_scale.detach().float().exp() * (img * self.text_embeds(prompts)).sum(-1)
