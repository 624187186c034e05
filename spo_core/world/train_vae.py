"""Stage 1 of building the embedded world: train its AutoencoderKL (32x32x3 <-> 8x8x4).

    python -m spo_core.world.train_vae [--steps 3000] [--out spo_core/world/weights/base]

Data: rendered scenes, a third of them with pixel noise, clutter or shading (so the
autoencoder can also represent imperfect images). Loss: L1 + MSE on pixels in [-1, 1] plus
KL 1e-6 (SD's VAE recipe without the perceptual and GAN terms, which flat synthetic images do
not need). The latent scaling factor (SD: 0.18215) is set so encoded latents have unit
variance. Deterministic: fixed seed, one CPU thread, deterministic kernels.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..progress import ProgressFn, Reporter
from .dataset import heldout_eval_set, render_batch
from .models import BASE_DIR, VAE_CONFIG, build_vae, count_parameters, optimizer_step, set_determinism
from .noisy_data import DataNoise, training_batch
from .preference import ground_truth

log = logging.getLogger(__name__)

VAE_DATA_NOISE = DataNoise(caption_error=0.0, pixel_noise=0.12, clutter=0.12, gradient=0.12)


@dataclass
class VAETrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    kl_weight: float = 1e-6
    init_logvar: float = -6.0
    final_lr_fraction: float = 0.05
    seed: int = 0
    threads: int = 2
    eval_every: int = 250


def lr_factor(step: int, cfg: "VAETrainConfig") -> float:
    """Linear warmup, then cosine decay to `final_lr_fraction` of the peak."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * frac))


def evaluation_images(n: int = 128) -> tuple[torch.Tensor, list[str]]:
    pairs = heldout_eval_set(min(n, 192), 1)
    caps = [c for c, _ in pairs]
    return render_batch(caps, [s for _, s in pairs]), caps


@torch.no_grad()
def reconstruction_report(vae, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    vae.eval()
    rec = (vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    vae.train()
    gt_rec, gt_ref = ground_truth(rec, captions), ground_truth(images, captions)
    return {"mse": float((rec - images).square().mean()), "gt_rec": float(gt_rec.mean()), "gt_ref": float(gt_ref.mean())}


def train_vae(cfg: VAETrainConfig, progress: ProgressFn | None = None):
    """Train the world's VAE; returns (vae, history)."""
    set_determinism(cfg.seed, cfg.threads)
    vae = build_vae()
    with torch.no_grad():  # start with a small posterior std: the KL term is tiny anyway, and
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = cfg.init_logvar  # early latent noise only blurs
    log.info("VAE: %.3fM parameters", count_parameters(vae) / 1e6)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    eval_x, eval_caps = evaluation_images()
    g = torch.Generator().manual_seed(cfg.seed)
    rep = Reporter("train VAE", cfg.steps, progress)
    history: list[dict] = []
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x, _, _ = training_batch(cfg.batch_size, seed=1_000_000 + step, noise=VAE_DATA_NOISE)
        x = x * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        rec_loss = (rec - x).abs().mean() + (rec - x).square().mean()
        kl = post.kl().mean()  # summed over latent elements, as SD's VAE loss does
        loss = rec_loss + cfg.kl_weight * kl
        optimizer_step(loss, opt, sched, vae.parameters())
        rep.update(step, loss=loss.item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            r = reconstruction_report(vae, eval_x, eval_caps)
            r.update(step=step, loss=loss.item(), kl=kl.item(), elapsed_s=time.perf_counter() - t0)
            history.append(r)
            log.info("step %d loss %.4f kl %.1f | eval mse %.5f GT rec %.3f (originals %.3f) | %.0fs",
                     step, loss.item(), kl.item(), r["mse"], r["gt_rec"], r["gt_ref"], r["elapsed_s"])
    vae.eval()
    return vae, history


@torch.no_grad()
def latent_scaling_factor(vae, n: int = 1024, seed: int = 5) -> float:
    """1 / std of the posterior-mean latents of training images (SD's convention)."""
    lat = []
    for i in range(0, n, 128):
        x, _, _ = training_batch(128, seed=seed * 10_000 + i, noise=DataNoise(caption_error=0.0))
        lat.append(vae.encode(x * 2 - 1).latent_dist.mean)
    return float(1.0 / torch.cat(lat).std())


def save_vae(vae, out: Path, history: list[dict], cfg: VAETrainConfig, seconds: float) -> None:
    scale = latent_scaling_factor(vae)
    vae.register_to_config(scaling_factor=round(scale, 5))
    (out / "vae").mkdir(parents=True, exist_ok=True)
    vae.to(torch.float16).save_pretrained(str(out / "vae"), safe_serialization=True)
    vae.to(torch.float32)
    record = {"config": asdict(cfg), "scaling_factor": scale, "seconds": seconds, "history": history,
              "parameters": count_parameters(vae), "threads": cfg.threads}
    (out / "vae" / "training_log.json").write_text(json.dumps(record, indent=1))
    log.info("saved the VAE to %s (scaling factor %.5f)", out / "vae", scale)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=VAETrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=VAETrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=VAETrainConfig.lr)
    p.add_argument("--seed", type=int, default=VAETrainConfig.seed)
    p.add_argument("--threads", type=int, default=VAETrainConfig.threads)
    p.add_argument("--out", type=Path, default=BASE_DIR)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = VAETrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads)
    log.info("VAE config %s; training %s", json.dumps(VAE_CONFIG), asdict(cfg))
    t0 = time.perf_counter()
    vae, history = train_vae(cfg)
    save_vae(vae, args.out, history, cfg, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
