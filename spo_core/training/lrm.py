"""Training a latent reward model (LPO's LRM) on preference pairs.

LPO's recipe (Kwai-Kolors/LPO lrm_15, frontier.md 1b): start from the diffusion model's own UNet
and text encoder; for each pair draw one timestep t from {1, 51, ..., 951}, VAE-encode both images,
noise them at that t with *independent* noise, score both noisy latents at t, and minimise the
tie-aware pairwise cross-entropy -sum_j y_j log softmax(s_0, s_1)_j, each pair weighted by
1 / (the number of pairs of its prompt in the batch), normalised. Pairs come as images (any
source: the world's GT-labelled pool, a Pick-a-Pic style folder) with labels (1,0), (0,1) or
(0.5,0.5).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..progress import ProgressFn, Reporter

log = logging.getLogger(__name__)

LPO_TIMESTEPS = tuple(range(1, 952, 50))  # 1, 51, ..., 951: LPO's candidate_timesteps


@dataclass
class LRMBatch:
    captions: list[str]
    images: torch.Tensor  # [B,2,3,H,W] in [0,1]
    labels: torch.Tensor  # [B,2]


@dataclass
class LRMTrainConfig:
    steps: int = 1000
    lr: float = 1e-5
    weight_decay: float = 0.3  # LPO's optimiser default
    warmup: int = 500
    cosine: bool = False  # decay to 10% over the run after the warmup (LPO: constant)
    max_grad_norm: float = 1.0
    train_text_encoder: bool = True  # LPO trains it; the world's LRM keeps the base one (shared, not shipped twice)
    seed: int = 0
    eval_every: int = 0


def lrm_pair_loss(s0: torch.Tensor, s1: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor,
                  captions: Sequence[str] | None = None) -> torch.Tensor:
    """LPO's `pair` criterion: the tie-aware cross-entropy of softmax(s0, s1) against (y0, y1), each pair
    weighted by 1/n(prompt) normalised over the batch (equal weight per prompt, not per pair)."""
    logits = torch.stack([s0, s1], dim=1).float()
    target = torch.stack([y0, y1], dim=1).float().to(logits.device)
    per_pair = -(target * F.log_softmax(logits, dim=1)).sum(1)
    if captions is None:
        return per_pair.mean()
    counts = Counter(captions)
    w = torch.tensor([1.0 / counts[c] for c in captions], device=logits.device)
    return (per_pair * (w / w.sum())).sum()


def noisy_pair_latents(latents: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator,
                       timesteps: Sequence[int] = LPO_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,2,C,h,w] clean latents -> (x_t [B,2,...], t [B]): one t per pair from `timesteps`,
    independent noise for each image (DDPM's add_noise)."""
    b = latents.shape[0]
    choices = torch.as_tensor(list(timesteps), dtype=torch.long)
    t = choices[torch.randint(len(choices), (b,), generator=generator)]
    eps = torch.randn(latents.shape, generator=generator).to(latents)
    ab = alphas_cumprod[t].to(latents).reshape(b, 1, 1, 1, 1)
    return ab.sqrt() * latents + (1 - ab).sqrt() * eps, t


def train_lrm(model, encode_images: Callable[[torch.Tensor], torch.Tensor], alphas_cumprod: torch.Tensor,
              batches: Iterator[LRMBatch], cfg: LRMTrainConfig, tokenizer, progress: ProgressFn | None = None,
              evaluate: Callable[[int], dict] | None = None) -> list[dict]:
    """Train `model` (a LatentRewardModel) in place; returns the history (loss, and `evaluate(step)` results).

    `encode_images`: [N,3,H,W] in [0,1] -> VP latents (VAE encode * scaling factor)."""
    from ..scorers.backbones import tokenize

    if cfg.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {cfg.steps}")
    model.train()
    if not cfg.train_text_encoder:
        for te in (model.text_encoder, model.text_encoder_2):
            if te is not None:
                te.requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    def factor(s: int) -> float:
        if s < cfg.warmup:
            return (s + 1) / max(cfg.warmup, 1)
        if not cfg.cosine:
            return 1.0
        progress = min(1.0, (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(cfg.seed)
    empty = tokenize(tokenizer, [""])
    rep = Reporter("LRM training", cfg.steps, progress)
    history: list[dict] = []
    for step in range(1, cfg.steps + 1):
        batch = next(batches)
        n = len(batch.captions)
        with torch.no_grad():
            flat = encode_images(batch.images.flatten(0, 1)).float()  # [2N, C, h, w]
        x_t, t = noisy_pair_latents(flat.reshape(n, 2, *flat.shape[1:]), alphas_cumprod, g)
        caps2 = [c for c in batch.captions for _ in range(2)]
        ids = tokenize(tokenizer, caps2)
        scores = model(x_t.flatten(0, 1), t.repeat_interleave(2), ids, empty).reshape(n, 2)
        loss = lrm_pair_loss(scores[:, 0], scores[:, 1], batch.labels[:, 0], batch.labels[:, 1], batch.captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        value = float(loss.detach())
        rep.update(step, loss=value)
        record = {"step": step, "loss": value}
        if evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            model.eval()
            record["accuracy"] = evaluate(step)
            model.train()
            if not cfg.train_text_encoder:
                for te in (model.text_encoder, model.text_encoder_2):
                    if te is not None:
                        te.eval()
        history.append(record)
    model.eval()
    return history

