"""Stage 2 of building the embedded world: train its text encoder and UNet (SD's recipe, tiny).

    python -m spo_core.world.train_base [--steps 4000] [--out spo_core/world/weights/base]

Needs stage 1's VAE in `<out>/vae` (python -m spo_core.world.train_vae). The text encoder
(CLIPTextModel, from scratch) and the UNet are trained together with the epsilon-prediction
loss on VAE latents, min-SNR-5 loss weights, 10% empty captions (for classifier-free
guidance), AdamW and an EMA of the weights, which is what is shipped. The data is the world's
partly wrong "web" data (`noisy_data.DataNoise`: 20% misleading captions, 10% each noisy,
cluttered and shaded images), so the model learns to make the mistakes the ground truth
penalises. Every `eval_every` steps the EMA model samples held-out prompts with SPO's settings
(DDIM eta 1, 20 steps, CFG 5) and the ground-truth preference is logged.

Deterministic: fixed seeds, one CPU thread by default, deterministic kernels; batch k's data
comes from seed k, so a resumed run continues exactly.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..clip_tokenizer import load_clip_tokenizer
from ..errors import FileMissingError, require
from ..progress import ProgressFn, Reporter
from .dataset import heldout_eval_set, heldout_prompts, train_prompts
from .evaluate import gt_stats, sample_images
from .models import (BASE_DIR, TEXT_CONFIG, UNET_CONFIG, build_scheduler, build_text_encoder, build_unet,
                     count_parameters, optimizer_step, set_determinism)
from .noisy_data import DataNoise, training_batch

log = logging.getLogger(__name__)


@dataclass
class BaseTrainConfig:
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0  # 0 disables min-SNR weighting
    seed: int = 0
    threads: int = 1
    eval_every: int = 500
    eval_prompts: int = 32
    checkpoint_every: int = 250
    snapshot_every: int = 500
    noise: DataNoise = field(default_factory=DataNoise)


def world_vocabulary(tokenizer) -> list[int]:
    """Token ids of every word of the grammar, plus BOS/EOS."""
    caps = train_prompts() + heldout_prompts()
    ids = tokenizer(caps, padding=False, truncation=True).input_ids
    return sorted({i for row in ids for i in row} | {tokenizer.bos_token_id, tokenizer.eos_token_id})


def encode_text(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    """Last hidden states [B,77,hidden], exactly as StableDiffusionPipeline.encode_prompt computes them."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


class EMA:
    """Exponential moving average of a module's parameters (warmed up like diffusers' EMAModel)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.shadow.parameters(), module.parameters()):
            e.lerp_(p.detach(), 1 - d)


def _pipeline(vae, text_encoder, tokenizer, unet):
    diffusers = require("diffusers", "the embedded world", "diffusers")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_vae(out: Path):
    diffusers = require("diffusers", "the embedded world", "diffusers")
    if not (out / "vae" / "config.json").is_file():
        raise FileMissingError(f"{out / 'vae'} holds no VAE; run stage 1 first: python -m spo_core.world.train_vae --out {out}")
    from ..backends.diffusers_backend import quiet_load

    return quiet_load(diffusers.AutoencoderKL.from_pretrained, str(out / "vae"), torch_dtype=torch.float32,
                       local_files_only=True).eval()


def evaluate(pipe, n_prompts: int) -> dict:
    pairs = heldout_eval_set(n_prompts, 1)
    caps, seeds = [c for c, _ in pairs], [s for _, s in pairs]
    held = gt_stats(sample_images(pipe, caps, seeds), caps)
    train_caps = train_prompts()[:: max(1, len(train_prompts()) // n_prompts)][:n_prompts]
    train = gt_stats(sample_images(pipe, train_caps, list(range(len(train_caps)))), train_caps)
    return {"heldout": held.as_dict(), "train": train.as_dict(), "heldout_line": held.line(), "train_line": train.line()}


def train_base(cfg: BaseTrainConfig, out: Path, work: Path | None = None, progress: ProgressFn | None = None):
    """Train text encoder + UNet; returns (pipeline with the EMA weights, history)."""
    set_determinism(cfg.seed, cfg.threads)
    vae = load_vae(out).requires_grad_(False)
    scale = float(vae.config.scaling_factor)
    tokenizer = load_clip_tokenizer()
    text_encoder = build_text_encoder(vocab_ids=world_vocabulary(tokenizer))
    unet = build_unet()
    log.info("UNet %.3fM, text encoder %.3fM parameters (%.3fM outside the token embedding), VAE %.3fM",
             count_parameters(unet) / 1e6, count_parameters(text_encoder) / 1e6,
             (count_parameters(text_encoder) - text_encoder.get_input_embeddings().weight.numel()) / 1e6,
             count_parameters(vae) / 1e6)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    alphas_cumprod = build_scheduler().alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    history: list[dict] = []
    start, elapsed_before = 1, 0.0
    ckpt = work / "checkpoint.pt" if work else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)  # our own file, written below
        unet.load_state_dict(state["unet"]); text_encoder.load_state_dict(state["text"])
        ema_unet.shadow.load_state_dict(state["ema_unet"]); ema_text.shadow.load_state_dict(state["ema_text"])
        ema_unet.updates = ema_text.updates = state["step"]
        opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"]); g.set_state(state["gen"])
        start, history, elapsed_before = state["step"] + 1, state["history"], state["elapsed"]
        log.info("resumed from %s at step %d", ckpt, start)
    rep = Reporter("train base model", cfg.steps, progress)
    t0 = time.perf_counter() - elapsed_before
    unet.train(); text_encoder.train()
    for step in range(start, cfg.steps + 1):
        x, captions, _ = training_batch(cfg.batch_size, seed=step, noise=cfg.noise)
        drop = torch.rand(len(captions), generator=g) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            post = vae.encode(x * 2 - 1).latent_dist
            z0 = (post.mean + post.std * torch.randn(post.mean.shape, generator=g)) * scale
        t = torch.randint(0, len(alphas_cumprod), (len(z0),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        ab = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        pred = unet(zt, t, encoder_hidden_states=encode_text(text_encoder, tokenizer, captions)).sample
        per_sample = F.mse_loss(pred, eps, reduction="none").mean((1, 2, 3))
        w = (snr[t].clamp(max=cfg.min_snr_gamma) / snr[t]) if cfg.min_snr_gamma > 0 else torch.ones_like(per_sample)
        loss = (w * per_sample).mean()
        optimizer_step(loss, opt, sched, params)
        ema_unet.update(unet); ema_text.update(text_encoder)
        rep.update(step, loss=loss.item())
        if step % 50 == 0:
            log.info("step %d loss %.4f | %.0fs", step, loss.item(), time.perf_counter() - t0)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            pipe = _pipeline(vae, ema_text.shadow, tokenizer, ema_unet.shadow)
            r = evaluate(pipe, cfg.eval_prompts)
            r.update(step=step, loss=loss.item(), elapsed_s=time.perf_counter() - t0)
            history.append(r)
            log.info("step %d EVAL held-out: %s", step, r["heldout_line"])
            log.info("step %d EVAL train:    %s", step, r["train_line"])
        if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            work.mkdir(parents=True, exist_ok=True)
            torch.save({"unet": unet.state_dict(), "text": text_encoder.state_dict(),
                        "ema_unet": ema_unet.shadow.state_dict(), "ema_text": ema_text.shadow.state_dict(),
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": g.get_state(), "step": step,
                        "history": history, "elapsed": time.perf_counter() - t0}, work / "checkpoint.tmp")
            (work / "checkpoint.tmp").replace(ckpt)
            if step % cfg.snapshot_every == 0:  # snapshots to choose the stopping point from
                shutil.copy(ckpt, work / f"checkpoint_{step}.pt")
    pipe = _pipeline(vae, ema_text.shadow, tokenizer, ema_unet.shadow)
    return pipe, history, time.perf_counter() - t0


def _canonical_text_keys(path: Path) -> None:
    """Store the text encoder under SD's key names ("text_model.embeddings..."): transformers 5
    saves CLIPTextModel without the "text_model." prefix, which transformers 4 cannot load;
    both versions load the prefixed names."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    if all(k.startswith("text_model.") for k in sd):
        return
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}, str(path),
              metadata={"format": "pt"})


def save_pipeline(pipe, out: Path) -> None:
    """Write the pipeline folder (fp16 safetensors) without the tokenizer, which
    `load_clip_tokenizer()` rebuilds offline."""
    out.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16)
    for name in ("unet", "text_encoder"):
        getattr(pipe, name).save_pretrained(str(out / name), safe_serialization=True)
    _canonical_text_keys(out / "text_encoder" / "model.safetensors")
    pipe.scheduler.save_pretrained(str(out / "scheduler"))
    pipe.to(torch.float32)
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": require("diffusers", "", "diffusers").__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_checkpoint(checkpoint: Path, out: Path) -> None:
    """Ship the EMA weights of a training checkpoint (e.g. a snapshot chosen by its evaluation)."""
    state = torch.load(checkpoint, weights_only=False)  # our own training checkpoint
    tokenizer = load_clip_tokenizer()
    text_encoder, unet = build_text_encoder(), build_unet()
    text_encoder.load_state_dict(state["ema_text"])
    unet.load_state_dict(state["ema_unet"])
    pipe = _pipeline(load_vae(out), text_encoder.eval(), tokenizer, unet.eval())
    save_pipeline(pipe, out)
    record = {"checkpoint": str(checkpoint), "step": state["step"], "seconds": state["elapsed"], "history": state["history"],
              "parameters": {"unet": count_parameters(unet), "text_encoder": count_parameters(text_encoder)}}
    (out / "training_log.json").write_text(json.dumps(record, indent=1))
    log.info("exported step %d of %s to %s", state["step"], checkpoint, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = BaseTrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--out", type=Path, default=BASE_DIR)
    p.add_argument("--work", type=Path, default=None, help="folder for resumable checkpoints (resumes if one is there)")
    p.add_argument("--export", type=Path, default=None,
                   help="write the EMA weights of this checkpoint (from --work) as the pipeline folder, without training")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.export is not None:
        export_checkpoint(args.export, args.out)
        return
    cfg = BaseTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                          eval_every=args.eval_every)
    log.info("UNet config %s\ntext config %s\ntraining %s", json.dumps(UNET_CONFIG), json.dumps(TEXT_CONFIG), asdict(cfg))
    pipe, history, seconds = train_base(cfg, args.out, args.work)
    save_pipeline(pipe, args.out)
    record = {"config": asdict(cfg), "seconds": seconds, "threads": cfg.threads, "history": history,
              "parameters": {"unet": count_parameters(pipe.unet), "text_encoder": count_parameters(pipe.text_encoder)}}
    (args.out / "training_log.json").write_text(json.dumps(record, indent=1))
    log.info("saved the pipeline to %s after %.0fs", args.out, seconds)


if __name__ == "__main__":
    main()
