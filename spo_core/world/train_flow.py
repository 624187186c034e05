"""Train the embedded world's rectified-flow model: a tiny SD3 transformer on the base model's latents.

    python -m spo_core.world.train_flow [--steps 3000] [--threads 2] [--out spo_core/world/weights/flow]

On a machine shared with other jobs, run it with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP
threads that wait for a descheduled sibling made each step 3-20x slower there (same results).

The world VAE and text encoder of the shipped base model (`weights/base`) are reused frozen,
so both models read the same latents and the same prompts. Only the `SD3Transformer2DModel`
(`flow_models.FLOW_TRANSFORMER_CONFIG`) is trained, with SD3's recipe: the rectified-flow loss
||v_pred - (noise - x0)||^2 at x_sigma = (1 - sigma) x0 + sigma noise, sigma logit-normal
(mean 0, std 1: most samples at intermediate noise, where the velocity is hardest to predict),
no loss weighting, 10% empty captions for classifier-free guidance, AdamW (warmup, then
cosine decay to 10%) and an EMA of the weights, which is what is shipped. The data is the base
model's: the partly wrong "web" data of `noisy_data`, batch k drawn from seed k. Every `eval_every` steps the EMA model samples
held-out and training prompts (20 Euler steps, CFG `cfg`) and the ground-truth preference is
logged; the log also records the UNet base model's figures on the same prompts and seeds,
sampled as `train_base` evaluates it (DDIM eta 1, 20 steps, CFG 5).

Deterministic: fixed seeds and thread count, deterministic kernels. Everything is written to a
temporary folder next to `--out` and moved into place at the end, so a crash leaves `--out` as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..safe_io import _honour_umask
from ..progress import ProgressFn, Reporter
from . import load_world_pipeline
from .dataset import heldout_eval_set, train_prompts
from .evaluate import gt_stats
from .flow_models import (DEFAULT_CFG, FLOW_DIR, FLOW_SCHEDULER_CONFIG, FLOW_TRANSFORMER_CONFIG, build_flow_scheduler,
                          build_flow_transformer, encode_prompts_for_flow, sample_flow_images)
from .models import count_parameters, optimizer_step, set_determinism
from .noisy_data import DataNoise, training_batch
from .train_base import EMA
from .train_base import evaluate as evaluate_unet_pipeline

log = logging.getLogger(__name__)


@dataclass
class FlowTrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    logit_mean: float = 0.0  # sigma = sigmoid(N(logit_mean, logit_std)), then the scheduler's shift
    logit_std: float = 1.0
    seed: int = 0
    threads: int = 1
    eval_every: int = 500
    eval_prompts: int = 32
    eval_steps: int = 20
    cfg: float = DEFAULT_CFG
    noise: DataNoise = field(default_factory=DataNoise)


def sample_sigmas(n: int, cfg: FlowTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """SD3's logit-normal sigmas, shifted like the sampling schedule (shift s: s u / (1 + (s - 1) u))."""
    u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    shift = float(FLOW_SCHEDULER_CONFIG["shift"])
    return shift * u / (1 + (shift - 1) * u)


def lr_factor(step: int, cfg: FlowTrainConfig) -> float:
    """Linear warmup, then a cosine decay to `final_lr_fraction`: a run this short ends before a
    constant rate would settle, and the decay lets the last steps refine instead of jitter."""
    warm = min(1.0, (step + 1) / cfg.warmup)
    progress = min(1.0, max(0, step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return warm * (cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate_flow(transformer, text_encoder, tokenizer, vae, n_prompts: int, steps: int, cfg: float) -> dict:
    """GT statistics on the same held-out and training (prompt, seed) sets as `train_base.evaluate`."""
    pairs = heldout_eval_set(n_prompts, 1)
    caps, seeds = [c for c, _ in pairs], [s for _, s in pairs]
    held = gt_stats(sample_flow_images(transformer, text_encoder, tokenizer, vae, caps, seeds, steps, cfg), caps)
    train_caps = train_prompts()[:: max(1, len(train_prompts()) // n_prompts)][:n_prompts]
    train = gt_stats(sample_flow_images(transformer, text_encoder, tokenizer, vae, train_caps,
                                        list(range(len(train_caps))), steps, cfg), train_caps)
    return {"heldout": held.as_dict(), "train": train.as_dict(), "heldout_line": held.line(), "train_line": train.line()}


def train_flow(cfg: FlowTrainConfig, progress: ProgressFn | None = None):
    """Train the transformer; returns (EMA transformer, history, seconds, UNet base evaluation)."""
    set_determinism(cfg.seed, cfg.threads)
    base = load_world_pipeline()  # the frozen VAE and text encoder, and the UNet to compare with
    vae, text_encoder, tokenizer = base.vae.eval(), base.text_encoder.eval(), base.tokenizer
    vae.requires_grad_(False); text_encoder.requires_grad_(False)
    t_base = time.perf_counter()
    base_eval = evaluate_unet_pipeline(base, cfg.eval_prompts)
    base_eval["elapsed_s"] = time.perf_counter() - t_base
    log.info("UNet base EVAL held-out: %s", base_eval["heldout_line"])
    log.info("UNet base EVAL train:    %s", base_eval["train_line"])
    del base.unet
    scale = float(vae.config.scaling_factor)
    set_determinism(cfg.seed, cfg.threads)  # the weights do not depend on the base evaluation above
    transformer = build_flow_transformer()
    log.info("transformer %.3fM parameters", count_parameters(transformer) / 1e6)
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ema = EMA(transformer, cfg.ema_decay)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    history: list[dict] = []
    rep = Reporter("train flow model", cfg.steps, progress)
    t0 = time.perf_counter()
    transformer.train()
    for step in range(1, cfg.steps + 1):
        x, captions, _ = training_batch(cfg.batch_size, seed=step, noise=cfg.noise)
        drop = torch.rand(len(captions), generator=g) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            post = vae.encode(x * 2 - 1).latent_dist
            x0 = (post.mean + post.std * torch.randn(post.mean.shape, generator=g)) * scale
            hidden, pooled = encode_prompts_for_flow(text_encoder, tokenizer, captions)
        sigma = sample_sigmas(len(x0), cfg, g)
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.reshape(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        v = transformer(xt, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=sigma * 1000,
                        return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        optimizer_step(loss, opt, sched, params)
        ema.update(transformer)
        rep.update(step, loss=loss.item())
        if step % 50 == 0:
            el = time.perf_counter() - t0
            log.info("step %d loss %.4f | %.0fs (%.3fs/step)", step, loss.item(), el, el / step)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            r = evaluate_flow(ema.shadow, text_encoder, tokenizer, vae, cfg.eval_prompts, cfg.eval_steps, cfg.cfg)
            r.update(step=step, loss=loss.item(), elapsed_s=time.perf_counter() - t0)
            history.append(r)
            log.info("step %d EVAL held-out: %s", step, r["heldout_line"])
            log.info("step %d EVAL train:    %s", step, r["train_line"])
    return ema.shadow, history, time.perf_counter() - t0, base_eval


def save_flow(transformer, folder: Path) -> None:
    """`transformer/` (fp16 safetensors) and `scheduler/`, the diffusers folder layout."""
    transformer.to(torch.float16).save_pretrained(str(folder / "transformer"), safe_serialization=True)
    transformer.to(torch.float32)
    build_flow_scheduler().save_pretrained(str(folder / "scheduler"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = FlowTrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--cfg", type=float, default=d.cfg, help="guidance scale of the evaluation samples")
    p.add_argument("--out", type=Path, default=FLOW_DIR)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = FlowTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                          eval_every=args.eval_every, cfg=args.cfg)
    log.info("transformer config %s\nscheduler %s\ntraining %s", json.dumps(FLOW_TRANSFORMER_CONFIG),
             json.dumps(FLOW_SCHEDULER_CONFIG), asdict(cfg))
    wall0 = time.perf_counter()
    transformer, history, seconds, base_eval = train_flow(cfg)
    out = args.out.resolve()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_flow(transformer, tmp)
    weights = tmp / "transformer" / "diffusion_pytorch_model.safetensors"
    final = history[-1]
    record = {
        "config": asdict(cfg), "transformer_config": FLOW_TRANSFORMER_CONFIG, "scheduler_config": FLOW_SCHEDULER_CONFIG,
        "parameters": count_parameters(transformer), "fp16_bytes": weights.stat().st_size,
        "sigma_sampling": f"logit-normal(mean {cfg.logit_mean}, std {cfg.logit_std}), shift {FLOW_SCHEDULER_CONFIG['shift']}",
        "threads": cfg.threads, "train_seconds": seconds, "wall_seconds": time.perf_counter() - wall0,
        "sampling": {"flow": f"FlowMatchEulerDiscreteScheduler, {cfg.eval_steps} Euler steps, CFG {cfg.cfg}",
                     "unet_base": "DDIM eta 1, 20 steps, CFG 5 (train_base.evaluate)"},
        "final": {"flow_heldout": final["heldout"], "flow_train": final["train"],
                  "unet_base_heldout": base_eval["heldout"], "unet_base_train": base_eval["train"]},
        "unet_base_eval": base_eval, "history": history,
    }
    (tmp / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    for path in tmp.rglob("*"):  # the shipped files must be readable by anyone (a writer may create them 0600)
        _honour_umask(path, folder=path.is_dir())
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.replace(old)
    tmp.replace(out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("flow model: held-out %s", final["heldout_line"])
    log.info("UNet base:  held-out %s", base_eval["heldout_line"])
    log.info("saved the flow model to %s after %.0fs of training (%.0fs in all)", out, seconds, record["wall_seconds"])


if __name__ == "__main__":
    main()
