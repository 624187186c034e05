"""LPO's latent reward model as a scorer: it scores latents, not pixels (`input_kind = "latent"`).

`score(latents, prompts, timesteps)`: latents in the VP scale diffusers pipelines use (x_sigma /
sqrt(1 + sigma^2) of the sigma-space sample), timesteps the DDPM timestep the model gives them (in
LPO the timestep of the step that produced the candidate). The resampler, best-of-N, the trainer
and the hosts ask `input_kind` and skip the decode. Text states are cached per prompt.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ..errors import ConfigError, InvalidTensorError
from .backbones import clip_tokenizer, tokenize
from .base import Scorer, normalize_prompts, normalize_timesteps
from .lrm_files import load_lrm
from .lrm_model import LatentRewardModel

_CACHE_LIMIT = 4096


class LRMScorer(Scorer):
    name = "lrm"
    step_aware = True
    differentiable = True
    needs_prompt = True
    input_kind = "latent"

    def __init__(self, model: LatentRewardModel, tokenizer=None, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer if tokenizer is not None else clip_tokenizer()
        # SDXL's second encoder (open_clip's layout) pads with "!" (id 0), as its pipelines do
        self.tokenizer_2 = None
        if model.cfg.arch == "sdxl":
            from ..clip_tokenizer import load_clip_tokenizer

            self.tokenizer_2 = load_clip_tokenizer(pad_token="!")
        self._text_cache: dict[str, tuple] = {}

    @classmethod
    def from_path(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32,
                  tokenizer_path: str | os.PathLike | None = None) -> "LRMScorer":
        model = load_lrm(path, device=device, dtype=dtype)
        return cls(model, clip_tokenizer(tokenizer_path) if tokenizer_path else None, device, dtype)

    @property
    def arch(self) -> str:
        return self.model.cfg.arch

    def modules(self):
        return [self.model]

    def _move(self, device, dtype):
        self.model.to(device=device, dtype=dtype)
        self._text_cache.clear()

    def _ids(self, prompts: list[str]):
        ids = tokenize(self.tokenizer, prompts)
        ids_2 = tokenize(self.tokenizer_2, prompts) if self.tokenizer_2 is not None else None
        return ids, ids_2

    def text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(UNet states, score embedding, SDXL added embeds) per prompt row, cached per distinct prompt."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            ids, ids_2 = self._ids(todo)
            with torch.no_grad():
                states, pooled, added = self.model.encode_text(ids, ids_2)
            if len(self._text_cache) + len(todo) > _CACHE_LIMIT:
                self._text_cache.clear()
            for i, p in enumerate(todo):
                self._text_cache[p] = (states[i], pooled[i], None if added is None else added[i])
        rows = [self._text_cache[p] for p in prompts]
        added = None if rows[0][2] is None else torch.stack([r[2] for r in rows])
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), added

    def score(self, latents: torch.Tensor, prompts: str | Sequence[str] | None = None,
              timesteps: torch.Tensor | int | float | None = None) -> torch.Tensor:
        latents = check_latents(latents, self.model.cfg.unet.get("in_channels", 4))
        b = latents.shape[0]
        prompt_list = normalize_prompts(prompts, b, True, self.name)
        if timesteps is None:
            raise ConfigError("the latent reward model scores a latent at its timestep: give the timesteps")
        ts = normalize_timesteps(timesteps, b).to(self.device)
        states, pooled, added = self.text(prompt_list)
        u_states, _, u_added = self.text([""] * b)
        context = torch.enable_grad() if latents.requires_grad else torch.no_grad()
        with context:
            feats = self.model.features(latents.to(self.device), ts, states, u_states, added, u_added)
            return self.model.scores(self.model.image_embeds(feats), pooled).float()

    def _score(self, images, prompts, timesteps):  # pragma: no cover - score() is overridden
        raise InvalidTensorError("the latent reward model scores latents, not images")


def check_latent_scorer_fits(scorer, family: str | None, cross_attention_dim: int | None, what: str = "the model") -> None:
    """A latent scorer reads the sampling model's own latents and conditioning: refuse one built for
    another architecture (an SDXL LRM on an SD1.5 model), naming both. Pixel scorers pass."""
    model = getattr(scorer, "model", None)
    cfg = getattr(model, "cfg", None)
    if getattr(scorer, "input_kind", "pixels") != "latent" or cfg is None:
        return
    from ..errors import ModelMismatchError

    mine_family = "sdxl" if cfg.arch == "sdxl" else "sd1"
    mine_dim = cfg.unet.get("cross_attention_dim")
    theirs_family = "sdxl" if family == "sdxl" else "sd1"
    if mine_family != theirs_family or (cross_attention_dim and mine_dim and int(mine_dim) != int(cross_attention_dim)):
        label = {"sdxl": "SDXL", "sd1": "SD1.5-family"}
        raise ModelMismatchError(
            f"the latent reward model is built for {label[mine_family]} (cross-attention {mine_dim}) but {what} is "
            f"{label[theirs_family]} (cross-attention {cross_attention_dim}): it reads the model's own latents, so use an "
            "LRM made for this architecture")


def check_latents(latents, channels: int) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise InvalidTensorError(f"a latent scorer takes latents [B,C,h,w], got {getattr(latents, 'shape', type(latents))}")
    if latents.shape[1] != channels:
        raise InvalidTensorError(
            f"a latent scorer got {latents.shape[1]}-channel input but its model takes {channels}-channel latents: "
            "images ([B,3,H,W] pixels) go to pixel scorers (spm, pickscore, ...), latents to lrm")
    if not torch.isfinite(latents.detach()).all():
        raise InvalidTensorError("the latents hold NaN or inf")
    return latents
