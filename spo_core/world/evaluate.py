"""Sampling the world's pipeline with per-sample seeds, and ground-truth statistics of samples.

`sample_images` runs diffusers' own StableDiffusionPipeline (SPO's settings by default: DDIM,
eta 1, 20 steps, CFG 5) with one torch.Generator per sample, so an image depends only on its
(prompt, seed) and never on the batch it was drawn in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..errors import ConfigError
from ..progress import ProgressFn, Reporter
from .preference import ground_truth_components

CLEARLY_WRONG = 0.6  # below this a sample misses at least one attribute, relation or is very noisy
GOOD = 0.9


@torch.no_grad()
def sample_images(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20, guidance_scale: float = 5.0,
                  eta: float = 1.0, batch_size: int = 64, progress: ProgressFn | None = None) -> torch.Tensor:
    """Images [B,3,H,W] in [0,1] (float32, CPU) for parallel lists of prompts and seeds."""
    if len(prompts) != len(seeds):
        raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    size = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    out = []
    rep = Reporter("sample", len(prompts), progress)
    for i in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
        gens = [torch.Generator().manual_seed(int(s)) for s in ss]
        img = pipe(ps, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale, eta=eta,
                   generator=gens, output_type="pt").images
        out.append(img.float().cpu())
        rep.update(min(i + batch_size, len(prompts)))
    return torch.cat(out)


@dataclass
class GTStats:
    n: int
    mean: float
    std: float
    median: float
    frac_good: float  # preference >= GOOD
    frac_wrong: float  # preference < CLEARLY_WRONG
    colour: float
    shape: float
    relation: float
    quality: float
    style: float

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"GT mean {self.mean:.3f} (std {self.std:.3f}, median {self.median:.3f}), good {self.frac_good:.0%}, "
                f"clearly wrong {self.frac_wrong:.0%} | colour {self.colour:.3f} shape {self.shape:.3f} "
                f"relation {self.relation:.3f} quality {self.quality:.3f} style {self.style:.3f}")


def gt_stats(images: torch.Tensor, captions: Sequence[str]) -> GTStats:
    """Summary statistics of the ground-truth preference of images."""
    p = ground_truth_components(images, captions)
    t = p.total
    rel = p.relation[~p.relation.isnan()]
    return GTStats(
        n=len(t), mean=float(t.mean()), std=float(t.std()) if len(t) > 1 else 0.0, median=float(t.median()),
        frac_good=float((t >= GOOD).float().mean()), frac_wrong=float((t < CLEARLY_WRONG).float().mean()),
        colour=float(p.colour.mean()), shape=float(p.shape.mean()),
        relation=float(rel.mean()) if len(rel) else float("nan"), quality=float(p.quality.mean()),
        style=float(p.style.mean()),
    )
