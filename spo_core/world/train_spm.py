"""Stage 3 of building the embedded world: train its step-aware preference model (SPM).

    python -m spo_core.world.train_spm [--pairs 6144] [--clip-steps 800] [--steps 1200]

Needs the base model (stages 1-2). SPO's recipe (spo-method.md §2.3), tiny:

1. a CLIP (`CLIPTorch`, time-conditioned vision tower) is first trained contrastively on
   rendered images and their true captions at t = 0, with each image's caption corrupted in one
   attribute or the relation as a hard negative (NegCLIP), as PickScore starts from a pretrained CLIP;
2. the adaLN is reset to identity and the model is fine-tuned as an SPM on labelled pairs
   (`spm_data`): both images noised at the same t ~ U{0..999}, one CFG-5 pass of the base
   UNet, decoded predicted x0, scored with t as a condition; PickScore's pairwise loss.

The pairwise accuracy on pairs of held-out prompts is logged per timestep (t = 0 is the final
image, t = 951 the first step of a 20-step schedule) next to the ground truth's own accuracy on
the same predicted x0 (how much of the label is still visible at that t). The result ships as
`weights/spm.safetensors` (fp16, configuration in the metadata) and loads with
`spo_core.scorers.SPMScorer.from_path` like the released SPMs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import ProgressFn, Reporter
from ..scorers.backbones import clip_tokenizer, tokenize
from ..scorers.clip_torch import CLIPConfigLite, TextConfig, VisionConfig
from ..scorers.spm_model import StepAwarePreferenceModel, init_adaln_identity, preference_loss, save_spm
from . import load_world_pipeline
from .dataset import heldout_prompts, parse_caption
from .models import WEIGHTS_DIR, optimizer_step, set_determinism
from .noisy_data import DataNoise, corrupt_caption, training_batch
from .preference import ground_truth
from .spm_data import PairPool, build_pair_pool, noised_predictions, spm_batches

log = logging.getLogger(__name__)

SPM_PATH = WEIGHTS_DIR / "spm.safetensors"
EVAL_TIMESTEPS = (0, 251, 501, 701, 951)

SPM_CONFIG = CLIPConfigLite(
    text=TextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu"),
    vision=VisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                        hidden_act="quick_gelu", image_size=32, patch_size=4),
    projection_dim=64,
)

# renders for the CLIP stage: some noise and clutter, so the towers see imperfect images too
CLIP_DATA_NOISE = DataNoise(caption_error=0.0, pixel_noise=0.15, clutter=0.15, gradient=0.15)


@dataclass
class SPMTrainConfig:
    pairs: int = 6144
    eval_pairs: int = 256
    clip_steps: int = 800
    clip_batch: int = 128
    clip_lr: float = 1e-3
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 100
    seed: int = 0
    threads: int = 2
    eval_every: int = 400


def _lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_clip_stage(model: StepAwarePreferenceModel, cfg: SPMTrainConfig, tokenizer, progress: ProgressFn | None = None):
    """Contrastive CLIP training on (render, true caption) batches at t = 0; returns the loss history."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, cfg.clip_steps, cfg.warmup))
    rep = Reporter("SPM: CLIP stage", cfg.clip_steps, progress)
    history = []
    rng = np.random.default_rng(cfg.seed + 17)
    for step in range(1, cfg.clip_steps + 1):
        x, captions, _ = training_batch(cfg.clip_batch, seed=3_000_000 + step, noise=CLIP_DATA_NOISE)
        # NegCLIP-style hard negatives: each image's caption with one attribute or the relation wrong
        negatives = [corrupt_caption(parse_caption(c), rng).text for c in captions]
        img = model.image_embeds(x, torch.zeros(len(x)))
        txt = model.text_embeds(tokenize(tokenizer, captions + negatives))
        logits = model.logit_scale.exp() * img @ txt.T  # [B, 2B]
        # identical captions in a batch are positives for each other
        same = torch.tensor([[a == b for b in captions + negatives] for a in captions], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        b = len(captions)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target[:, :b]))
        optimizer_step(loss, opt, sched, model.parameters())
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        rep.update(step, loss=loss.item())
        if step % 100 == 0:
            history.append({"step": step, "loss": loss.item()})
            log.info("CLIP stage step %d loss %.4f", step, loss.item())
    return history


@torch.no_grad()
def pairwise_accuracy(model: StepAwarePreferenceModel, pipe, pool: PairPool, tokenizer, timesteps=EVAL_TIMESTEPS,
                      seed: int = 7, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Accuracy on the decided pairs of `pool` at each t: the SPM's and the ground truth's own,
    both judging the same decoded predicted x0 (fixed noise per t)."""
    decided = pool.labels[:, 0] != 0.5
    sub = pool.subset(torch.nonzero(decided).flatten())
    out = {}
    for t in timesteps:
        g = torch.Generator().manual_seed(seed + t)
        right = right_gt = 0
        for i in range(0, len(sub), batch_size):
            part = sub.subset(range(i, min(i + batch_size, len(sub))))
            n = len(part)
            pred = part.images if t == 0 else noised_predictions(pipe, part.images, part.captions, torch.full((n,), t), g)
            flat = pred.flatten(0, 1)
            caps2 = [c for c in part.captions for _ in range(2)]
            ts = torch.full((2 * n,), t)
            logits = model(flat, tokenize(tokenizer, caps2), ts).reshape(n, 2)
            first = part.labels[:, 0] == 1
            right += int(((logits[:, 0] > logits[:, 1]) == first).sum())
            gt = ground_truth(flat, caps2).reshape(n, 2)
            right_gt += int(((gt[:, 0] > gt[:, 1]) == first).sum())
        out[str(t)] = {"spm": right / max(1, len(sub)), "ground_truth_on_x0": right_gt / max(1, len(sub)), "pairs": len(sub)}
    return out


def accuracy_line(acc: dict) -> str:
    return " ".join(f"t={t}: {a['spm']:.0%} (GT {a['ground_truth_on_x0']:.0%})" for t, a in acc.items())


def train_spm(cfg: SPMTrainConfig, pipe, progress: ProgressFn | None = None):
    """Both stages; returns (model, record)."""
    set_determinism(cfg.seed, cfg.threads)
    torch.use_deterministic_algorithms(False)  # scaled-dot-product attention backward on CPU is not flagged deterministic
    tokenizer = clip_tokenizer()
    model = StepAwarePreferenceModel.identity(SPM_CONFIG, seed=cfg.seed).train()
    t0 = time.perf_counter()
    clip_history = train_clip_stage(model, cfg, tokenizer, progress)
    init_adaln_identity(model)  # SPO starts the SPM from a CLIP with the time modulation at identity
    log.info("CLIP stage done in %.0fs; building pairs", time.perf_counter() - t0)
    pool = build_pair_pool(pipe, cfg.pairs, seed=cfg.seed, progress=progress)
    held = heldout_prompts()
    eval_pool = build_pair_pool(pipe, cfg.eval_pairs, seed=cfg.seed + 1000, prompts=held, progress=progress)
    log.info("pairs: train %s, eval %s (%.0fs)", pool.label_counts(), eval_pool.label_counts(), time.perf_counter() - t0)
    before = pairwise_accuracy(model.eval(), pipe, eval_pool, tokenizer)
    log.info("SPM before fine-tuning (held-out): %s", accuracy_line(before))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, cfg.steps, cfg.warmup))
    rep = Reporter("SPM: preference stage", cfg.steps, progress)
    history = []
    batches = spm_batches(pipe, pool, cfg.batch_size, seed=cfg.seed + 1)
    for step in range(1, cfg.steps + 1):
        b = next(batches)
        n = len(b.captions)
        caps2 = [c for c in b.captions for _ in range(2)]
        logits = model(b.predicted.flatten(0, 1), tokenize(tokenizer, caps2), b.timesteps.repeat_interleave(2)).reshape(n, 2)
        loss = preference_loss(logits[:, 0], logits[:, 1], b.labels[:, 0], b.labels[:, 1])
        optimizer_step(loss, opt, sched, model.parameters())
        rep.update(step, loss=loss.item())
        if step % 100 == 0:
            log.info("SPM step %d loss %.4f | %.0fs", step, loss.item(), time.perf_counter() - t0)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = pairwise_accuracy(model.eval(), pipe, eval_pool, tokenizer)
            model.train()
            history.append({"step": step, "loss": loss.item(), "accuracy": acc, "elapsed_s": time.perf_counter() - t0})
            log.info("SPM step %d held-out accuracy: %s", step, accuracy_line(acc))
    model.eval()
    record = {"config": asdict(cfg), "model": SPM_CONFIG.to_dict(), "clip_stage": clip_history,
              "pairs": pool.label_counts(), "eval_pairs": eval_pool.label_counts(), "accuracy_before": before,
              "history": history, "seconds": time.perf_counter() - t0, "threads": cfg.threads}
    return model, record


def in_distribution_accuracy(model: StepAwarePreferenceModel, pipe, n_pairs: int = 256, seed: int = 2000) -> dict:
    """Pairwise accuracy on fresh pairs of *training* prompts (new seeds): the prompts SPO trains
    on, so the signal the trainer actually gets (the held-out accuracy measures generalization)."""
    pool = build_pair_pool(pipe, n_pairs, seed=seed)
    return pairwise_accuracy(model.eval(), pipe, pool, clip_tokenizer())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = SPMTrainConfig()
    for name in ("pairs", "clip_steps", "steps", "batch_size", "seed", "threads", "eval_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--out", type=Path, default=SPM_PATH)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = SPMTrainConfig(**{k: getattr(args, k) for k in ("pairs", "clip_steps", "steps", "batch_size", "seed", "threads",
                                                           "eval_every")})
    pipe = load_world_pipeline()
    model, record = train_spm(cfg, pipe)
    record["accuracy_train_prompts"] = in_distribution_accuracy(model, pipe)
    log.info("SPM accuracy on new pairs of training prompts: %s", accuracy_line(record["accuracy_train_prompts"]))
    save_spm(model, args.out, dtype=torch.float16, overwrite=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    log.info("saved the SPM to %s after %.0fs", args.out, record["seconds"])


if __name__ == "__main__":
    main()
