"""Stage 4 of building the embedded world: train its latent reward model (LPO's LRM).

    python -m spo_core.world.train_lrm [--pairs 6144] [--steps 1500]

Needs the base model (stages 1-2) and, for the side-by-side table, the world SPM (stage 3). The
LRM starts from the base model's own UNet (conv_in, down and mid blocks) and text encoder, and is
trained with LPO's recipe (`spo_core.training.lrm`) on the same GT-labelled pairs the SPM was
(`spm_data.build_pair_pool`, same sizes and seeds): one t per pair from {1, 51, ..., 951},
independent noise, the tie-aware pairwise loss with per-prompt weights. The text encoder stays the
base model's (frozen and not shipped twice: the file names it), so the shipped LRM is about 1 MB.

Which step's weights ship is decided on new pairs of *training* prompts (validation); accuracy is
reported on the SPM's held-out pairs at t = 0/251/501/701/951, each t with the same
noise for the SPM (on the decoded predicted x0 of its one CFG-5 UNet pass) and the LRM (on the
noisy latent itself), beside the ground truth on that predicted x0. Ships `weights/lrm.safetensors`
(fp16) and `weights/lrm.json` (the record).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..progress import ProgressFn
from ..scorers.backbones import clip_tokenizer, tokenize
from ..scorers.lrm_files import save_lrm
from ..scorers.lrm_model import LatentRewardModel, lrm_from_diffusion_model
from ..training.lrm import LPO_TIMESTEPS, LRMBatch, LRMTrainConfig, train_lrm
from . import load_world_pipeline
from .dataset import heldout_prompts
from .models import WEIGHTS_DIR, set_determinism
from .preference import ground_truth
from .spm_data import PairPool, build_pair_pool, noised_predictions
from .train_spm import EVAL_TIMESTEPS, SPM_PATH, SPMTrainConfig

log = logging.getLogger(__name__)

LRM_PATH = WEIGHTS_DIR / "lrm.safetensors"


@dataclass
class WorldLRMConfig:
    pairs: int = 6144  # the SPM's pair pool (same seed: the same pairs)
    eval_pairs: int = 256
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3  # a tiny model learns at a larger rate than LPO's 1e-5 for SD1.5; cosine decay to 10%
    warmup: int = 100
    validation_pairs: int = 256  # new pairs of *training* prompts: which step's weights are kept
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2
    eval_every: int = 250


def pool_batches(pool: PairPool, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(pool), (batch_size,), generator=g)
        sub = pool.subset(idx)
        yield LRMBatch(sub.captions, sub.images, sub.labels)


def encoder(pipe):
    scale = float(pipe.vae.config.scaling_factor)

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return pipe.vae.encode(images.to(pipe.vae.device) * 2 - 1).latent_dist.sample() * scale

    return encode


@torch.no_grad()
def side_by_side_accuracy(lrm: LatentRewardModel, spm, pipe, pool: PairPool, timesteps=EVAL_TIMESTEPS, seed: int = 7,
                          batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Accuracy on the decided pairs at each t, with the same noise for every judge: the LRM on the
    noisy latents x_t, the SPM on the decoded CFG-5 predicted x0 (as in train_spm), and the ground
    truth on that predicted x0. t = 0: clean images (the LRM at timestep 0)."""
    tok = clip_tokenizer()
    decided = pool.labels[:, 0] != 0.5
    sub = pool.subset(torch.nonzero(decided).flatten())
    enc = encoder(pipe)
    scale = float(pipe.vae.config.scaling_factor)
    ab_all = pipe.scheduler.alphas_cumprod
    empty = tokenize(tok, [""])
    out = {}
    for t in timesteps:
        g = torch.Generator().manual_seed(seed + t)
        right = {"lrm": 0, "spm": 0, "gt": 0}
        for i in range(0, len(sub), batch_size):
            part = sub.subset(range(i, min(i + batch_size, len(sub))))
            n = len(part)
            caps2 = [c for c in part.captions for _ in range(2)]
            first = part.labels[:, 0] == 1
            # the SPM and the ground truth: decoded predicted x0 (shared noise per pair, as train_spm measures)
            g_spm = torch.Generator().manual_seed(seed + t)
            pred = part.images if t == 0 else noised_predictions(pipe, part.images, part.captions, torch.full((n,), t), g_spm)
            flat = pred.flatten(0, 1)
            s_spm = spm.score(flat, caps2, torch.full((2 * n,), float(t))).reshape(n, 2)
            gt = ground_truth(flat, caps2).reshape(n, 2)
            # the LRM: the noisy latents themselves, the same shared noise per pair
            lat = pipe.vae.encode(part.images.flatten(0, 1) * 2 - 1).latent_dist.mean * scale
            if t > 0:
                eps = torch.randn((n, *lat.shape[1:]), generator=g).repeat_interleave(2, 0)
                ab = ab_all[t]
                lat = ab.sqrt() * lat + (1 - ab).sqrt() * eps
            s_lrm = lrm(lat, torch.full((2 * n,), float(t)), tokenize(tok, caps2), empty).reshape(n, 2)
            for name, s in (("lrm", s_lrm), ("spm", s_spm), ("gt", gt)):
                right[name] += int(((s[:, 0] > s[:, 1]) == first).sum())
        m = max(1, len(sub))
        out[str(t)] = {"lrm": right["lrm"] / m, "spm": right["spm"] / m, "ground_truth_on_x0": right["gt"] / m,
                       "pairs": len(sub)}
    return out


def accuracy_line(acc: dict) -> str:
    return " ".join(f"t={t}: LRM {a['lrm']:.0%} SPM {a['spm']:.0%} (GT {a['ground_truth_on_x0']:.0%})" for t, a in acc.items())


def train_world_lrm(cfg: WorldLRMConfig, pipe, progress: ProgressFn | None = None):
    from ..scorers import load_scorer

    set_determinism(cfg.seed, cfg.threads)
    torch.use_deterministic_algorithms(False)
    t0 = time.perf_counter()
    spm_defaults = SPMTrainConfig()
    pool = build_pair_pool(pipe, cfg.pairs, seed=spm_defaults.seed, progress=progress)
    eval_pool = build_pair_pool(pipe, cfg.eval_pairs, seed=spm_defaults.seed + 1000, prompts=heldout_prompts(),
                                progress=progress)
    pool_seconds = time.perf_counter() - t0
    log.info("pairs: train %s, eval %s (%.0fs)", pool.label_counts(), eval_pool.label_counts(), pool_seconds)
    validation_pool = build_pair_pool(pipe, cfg.validation_pairs, seed=2000, progress=progress)  # training prompts
    model = lrm_from_diffusion_model(pipe.unet, pipe.text_encoder, seed=cfg.seed)
    spm = load_scorer("spm", str(SPM_PATH))
    before = side_by_side_accuracy(model.eval(), spm, pipe, eval_pool)
    log.info("before training: %s", accuracy_line(before))
    t_train = time.perf_counter()
    train_cfg = LRMTrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, cosine=True,
                               train_text_encoder=False, seed=cfg.seed + 1, eval_every=cfg.eval_every)
    best = {"score": -1.0, "step": 0, "state": None}

    def evaluate(step: int) -> dict:
        """Which weights to keep is decided on new pairs of training prompts; the held-out pairs only report."""
        val = side_by_side_accuracy(model, spm, pipe, validation_pool)
        score = sum(a["lrm"] for a in val.values()) / len(val)
        if score > best["score"]:
            best.update(score=score, step=step, state={k: v.detach().clone() for k, v in model.state_dict().items()})
        acc = side_by_side_accuracy(model, spm, pipe, eval_pool)
        log.info("LRM step %d: validation (training prompts) mean %.1f%%; held-out: %s", step, 100 * score, accuracy_line(acc))
        return {"held_out": acc, "validation": val, "validation_mean": score}

    history = train_lrm(model, encoder(pipe), pipe.scheduler.alphas_cumprod, pool_batches(pool, cfg.batch_size, cfg.seed),
                        train_cfg, clip_tokenizer(), progress, evaluate)
    train_seconds = time.perf_counter() - t_train
    model.load_state_dict(best["state"])
    kept = next(h["accuracy"] for h in history if h["step"] == best["step"])
    log.info("kept the weights of step %d (best validation mean %.1f%%)", best["step"], 100 * best["score"])
    record = {"config": asdict(cfg), "timesteps": list(LPO_TIMESTEPS), "pairs": pool.label_counts(),
              "eval_pairs": eval_pool.label_counts(), "validation_pairs": validation_pool.label_counts(),
              "accuracy_before": before, "kept_step": best["step"],
              "history": [h for h in history if "accuracy" in h or h["step"] % 50 == 0],
              "accuracy": kept["held_out"], "pool_seconds": pool_seconds, "train_seconds": train_seconds,
              "threads": cfg.threads}
    return model, record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = WorldLRMConfig()
    for name in ("pairs", "eval_pairs", "validation_pairs", "steps", "batch_size", "seed", "threads", "eval_every", "warmup"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--out", type=Path, default=LRM_PATH)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = WorldLRMConfig(**{k: getattr(args, k) for k in ("pairs", "eval_pairs", "validation_pairs", "steps", "batch_size",
                                                           "seed", "threads", "eval_every", "warmup", "lr")})
    pipe = load_world_pipeline()
    model, record = train_world_lrm(cfg, pipe)
    save_lrm(model, args.out, dtype=torch.float16, overwrite=True, shared_text_encoder="world")
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    log.info("saved the LRM to %s (pairs %.0fs, training %.0fs)", args.out, record["pool_seconds"], record["train_seconds"])


if __name__ == "__main__":
    main()
