"""Training data for the world's step-aware preference model, built as SPO's SPM data was.

SPO's SPM (spo-method.md §2.3) learns from pairs of images for one caption with a preference
label. Each training step picks t ~ U{0..999} per pair, VAE-encodes both images, adds the
*same* noise at t, runs one CFG-5 UNet pass of the matching diffusion model (empty negative
prompt), takes the predicted x0, decodes it, and scores it with t as a condition.

Here the pairs come from the world itself and the labels from the exact ground truth:

- "samples": two base-model samples of one prompt (DDIM eta 1, 20 steps, CFG 5, two seeds);
- "render_vs_sample": a correct rendering of the prompt against a base-model sample;
- "render_vs_wrong": a correct rendering against a rendering of a misleading caption (wrong
  relation, swapped colours or a changed shape) or a noisy copy.

Labels: (1, 0) when the first image's ground truth beats the second's by more than
`tie_margin`, (0, 1) the other way, (0.5, 0.5) otherwise (a tie, as in Pick-a-Pic).

Two stages, because sampling the base model is the expensive part: `build_pair_pool` makes
the clean pairs once; `noised_predictions` / `spm_batches` re-noise them at fresh t for
every training step. Pure data generation: no model is trained here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..progress import ProgressFn, Reporter
from .dataset import parse_caption, render_batch, train_prompts
from .evaluate import sample_images
from .noisy_data import corrupt_caption
from .preference import ground_truth

SOURCES = ("samples", "render_vs_sample", "render_vs_wrong")


@dataclass
class PairPool:
    """Clean image pairs with ground-truth scores and labels."""

    captions: list[str]
    images: torch.Tensor  # [N,2,3,H,W] in [0,1]
    gt: torch.Tensor  # [N,2]
    labels: torch.Tensor  # [N,2]: (1,0), (0,1) or (0.5,0.5)
    sources: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, index: torch.Tensor | Sequence[int]) -> "PairPool":
        idx = torch.as_tensor(index, dtype=torch.long)
        return PairPool([self.captions[i] for i in idx.tolist()], self.images[idx], self.gt[idx], self.labels[idx],
                        [self.sources[i] for i in idx.tolist()])

    def label_counts(self) -> dict[str, int]:
        first = int((self.labels[:, 0] == 1).sum())
        second = int((self.labels[:, 1] == 1).sum())
        return {"first": first, "second": second, "tie": len(self) - first - second}


@dataclass
class SPMBatch:
    """One SPM training batch: predicted-x0 images of both members of each pair at t."""

    captions: list[str]
    predicted: torch.Tensor  # [B,2,3,H,W] decoded x0 predictions in [0,1]
    timesteps: torch.Tensor  # [B] long, 0..999
    labels: torch.Tensor  # [B,2]
    clean: torch.Tensor  # [B,2,3,H,W]
    gt: torch.Tensor  # [B,2]


def preference_labels(gt: torch.Tensor, tie_margin: float) -> torch.Tensor:
    """[N,2] ground-truth scores -> [N,2] PickScore-style labels with ties."""
    diff = gt[:, 0] - gt[:, 1]
    first = (diff > tie_margin).float()
    second = (diff < -tie_margin).float()
    tie = 1 - first - second
    return torch.stack([first + 0.5 * tie, second + 0.5 * tie], 1)


def build_pair_pool(pipe, n_pairs: int, seed: int = 0, prompts: Sequence[str] | None = None,
                    mix: dict[str, float] | None = None, tie_margin: float = 0.05, steps: int = 20,
                    guidance_scale: float = 5.0, batch_size: int = 64, progress: ProgressFn | None = None) -> PairPool:
    """`n_pairs` labelled clean pairs; `mix` gives the share of each source (default 1/2, 1/4, 1/4).

    Base-model samples use seeds derived from `seed`, so the pool is reproducible.
    """
    mix = mix or {"samples": 0.5, "render_vs_sample": 0.25, "render_vs_wrong": 0.25}
    unknown = set(mix) - set(SOURCES)
    if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ConfigError(f"mix must give non-negative shares of {SOURCES}, got {mix}")
    if n_pairs < 1:
        raise ConfigError(f"n_pairs must be >= 1, got {n_pairs}")
    prompts = list(prompts) if prompts is not None else train_prompts()
    rng = np.random.default_rng([seed, 23])
    total = sum(mix.values())
    counts = {k: int(round(n_pairs * mix.get(k, 0.0) / total)) for k in SOURCES}
    counts["samples"] += n_pairs - sum(counts.values())
    caps = [prompts[i] for i in rng.integers(len(prompts), size=n_pairs)]
    sources = [k for k in SOURCES for _ in range(counts[k])]
    render_seeds = rng.integers(2**31, size=(n_pairs, 2))

    # which images are base-model samples: both for "samples", the second for "render_vs_sample"
    need = [(i, j) for i, s in enumerate(sources) for j in ((0, 1) if s == "samples" else (1,) if s == "render_vs_sample" else ())]
    images = torch.zeros(n_pairs, 2, 3, 32, 32)
    if need:
        rep = Reporter("SPM pairs: sampling the base model", len(need), progress)
        done = 0

        def report(event):
            rep.update(done + event.step)

        for start in range(0, len(need), batch_size):
            chunk = need[start:start + batch_size]
            imgs = sample_images(pipe, [caps[i] for i, _ in chunk], [int(seed * 1_000_003 + 2 * i + j) for i, j in chunk],
                                 steps=steps, guidance_scale=guidance_scale, batch_size=batch_size, progress=report)
            for (i, j), img in zip(chunk, imgs):
                images[i, j] = img
            done += len(chunk)
    for i, s in enumerate(sources):
        if s in ("render_vs_sample", "render_vs_wrong"):
            images[i, 0] = render_batch([caps[i]], [int(render_seeds[i, 0])])[0]
        if s == "render_vs_wrong":
            if rng.random() < 0.25:  # a noisy copy of a correct image
                g = torch.Generator().manual_seed(int(render_seeds[i, 1]))
                clean = render_batch([caps[i]], [int(render_seeds[i, 1])])[0]
                images[i, 1] = (clean + float(rng.uniform(0.03, 0.1)) * torch.randn(clean.shape, generator=g)).clamp(0, 1)
            else:  # a correct picture of a misleading caption
                wrong = corrupt_caption(parse_caption(caps[i]), rng).text
                images[i, 1] = render_batch([wrong], [int(render_seeds[i, 1])])[0]
    # random order within pairs, so "first" carries no information
    swap = torch.from_numpy(rng.random(n_pairs) < 0.5)
    images[swap] = images[swap].flip(1)
    flat_caps = [c for c in caps for _ in range(2)]
    gt = ground_truth(images.flatten(0, 1), flat_caps).reshape(n_pairs, 2)
    return PairPool(caps, images, gt, preference_labels(gt, tie_margin), sources)


@torch.no_grad()
def noised_predictions(pipe, images: torch.Tensor, captions: Sequence[str], timesteps: torch.Tensor,
                       generator: torch.Generator, guidance_scale: float = 5.0) -> torch.Tensor:
    """Decoded one-step x0 predictions [N,2,3,H,W] of image pairs [N,2,3,H,W] noised at t [N].

    Both members of a pair get the same noise (as in SPO's SPM training); the UNet runs once
    with classifier-free guidance (empty negative prompt), x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar).
    """
    n = images.shape[0]
    if images.ndim != 5 or images.shape[1] != 2 or len(captions) != n or timesteps.shape != (n,):
        raise ConfigError("images must be [N,2,3,H,W] with N captions and N timesteps")
    dev, dt = pipe.unet.device, pipe.unet.dtype
    vae, unet = pipe.vae, pipe.unet
    scale = float(vae.config.scaling_factor)
    lat = vae.encode((images.flatten(0, 1) * 2 - 1).to(dev, dt)).latent_dist.mean * scale  # [2N,C,h,w]
    eps = torch.randn((n, *lat.shape[1:]), generator=generator).to(dev, dt).repeat_interleave(2, 0)
    t = timesteps.to(dev).long().repeat_interleave(2)
    ab = pipe.scheduler.alphas_cumprod.to(dev)[t].to(dt).reshape(-1, 1, 1, 1)
    xt = ab.sqrt() * lat + (1 - ab).sqrt() * eps
    caps2 = [c for c in captions for _ in range(2)]
    cond, uncond = pipe.encode_prompt(caps2, dev, 1, True, negative_prompt=None)
    out = unet(torch.cat([xt, xt]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
    e_u, e_c = out.chunk(2)
    e = e_u + guidance_scale * (e_c - e_u)
    x0 = (xt - (1 - ab).sqrt() * e) / ab.sqrt()
    img = (vae.decode(x0 / scale).sample.float() / 2 + 0.5).clamp(0, 1)
    return img.reshape(n, 2, *img.shape[1:]).cpu()


def spm_batches(pipe, pool: PairPool, batch_size: int, seed: int = 0, guidance_scale: float = 5.0,
                timesteps: Sequence[int] | None = None) -> Iterator[SPMBatch]:
    """Endless SPM training batches: random pairs from `pool`, t ~ U{0..999} per pair (or drawn
    from `timesteps` when given, e.g. a fixed t for evaluation), fresh noise every time."""
    g = torch.Generator().manual_seed(seed)
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    while True:
        idx = torch.randint(len(pool), (batch_size,), generator=g)
        if timesteps is None:
            t = torch.randint(0, n_train, (batch_size,), generator=g)
        else:
            choices = torch.as_tensor(list(timesteps), dtype=torch.long)
            t = choices[torch.randint(len(choices), (batch_size,), generator=g)]
        sub = pool.subset(idx)
        pred = noised_predictions(pipe, sub.images, sub.captions, t, g, guidance_scale)
        yield SPMBatch(sub.captions, pred, t, sub.labels, sub.images, sub.gt)
