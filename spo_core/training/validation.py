"""Validation grids: fixed prompts and seeds sampled by the base model and by base + LoRA, side by side.

Sampling is deterministic DDIM (eta 0) from seeded noise, so every grid of a run is comparable
and the base column is computed once. The grid is a PIL image (rows: prompt x seed; columns:
base, LoRA), also sent to the UIs as the progress preview.
"""

from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..sampling.samplers import sample_ancestral


@torch.no_grad()
def sample_images(host, network, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance_scale: float,
                  multiplier: float, negative_prompt: str | None = None, height: int | None = None,
                  width: int | None = None, autocast=None, sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Images [P*S,3,H,W] in [0,1] for every (prompt, seed), prompt-major, with the LoRA at `multiplier`:
    deterministic steps (DDIM eta 0; a flow model's Euler ODE) over `sigmas` (default SPO's schedule)."""
    import contextlib

    autocast = autocast or contextlib.nullcontext
    rows = [(p, s) for p in prompts for s in seeds]
    cond = host.encode_prompts([p for p, _ in rows], negative_prompt, height, width)
    schedule = host.schedule
    if getattr(schedule, "is_flow", False):
        schedule = schedule.with_step("euler")
    sigmas = schedule.spo_sigmas(steps) if sigmas is None else sigmas
    shape = host.latent_shape(1, height, width)[1:]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for _, s in rows])
    x = schedule.start_sample(noise, float(sigmas[0])).to(host.device)
    with network.scaled(multiplier), autocast():
        res = sample_ancestral(host.denoiser(guidance_scale), cond, x, sigmas, eta=0.0, schedule=schedule)
        images = host.decode(schedule.model_latent(res.x, float(sigmas[-1])))
    return images.float().cpu().clamp(0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def grid_image(base: torch.Tensor, lora: torch.Tensor, labels: Sequence[str], title: str = "", tile: int | None = None) -> Image.Image:
    """Rows of [base | LoRA] tiles with a label per row and a header."""
    return columns_grid({"base": base, "base + LoRA": lora}, labels, title, tile)


def columns_grid(columns: Mapping[str, torch.Tensor], labels: Sequence[str], title: str = "",
                 tile: int | None = None) -> Image.Image:
    """One row per image index, one column per named image batch [N,3,H,W], a label per row."""
    batches = list(columns.values())
    n, _, h, w = batches[0].shape
    size = tile or max(128, min(256, max(h, w)))
    scale = size / max(h, w)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    font = ImageFont.load_default()
    label_w, header = 170, 30
    out = Image.new("RGB", (label_w + len(batches) * (tw + 6) + 6, header + n * (th + 6)), "white")
    draw = ImageDraw.Draw(out)
    draw.text((4, 4), title, fill="black", font=font)
    for j, name in enumerate(columns):
        draw.text((label_w + j * (tw + 6), 16), name, fill="black", font=font)
    for i in range(n):
        y = header + i * (th + 6)
        for j, batch in enumerate(batches):
            out.paste(to_pil(batch[i]).resize((tw, th), Image.NEAREST if scale >= 2 else Image.BICUBIC), (label_w + j * (tw + 6), y))
        lines = textwrap.wrap(labels[i], 26)[:max(1, th // 12)]
        for li, line in enumerate(lines):
            draw.text((4, y + 2 + 12 * li), line, fill="black", font=font)
    return out


class Validator:
    """Renders the validation grid at a step; the base images are sampled once per run."""

    def __init__(self, host, network, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance_scale: float,
                 negative_prompt: str | None = None, height: int | None = None, width: int | None = None, autocast=None,
                 sigmas: torch.Tensor | None = None):
        self.host, self.network = host, network
        self.prompts, self.seeds = list(prompts), [int(s) for s in seeds]
        self.kw = dict(steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt, height=height,
                       width=width, autocast=autocast, sigmas=sigmas)
        self._base: torch.Tensor | None = None

    def labels(self) -> list[str]:
        return [f"{p} (seed {s})" for p in self.prompts for s in self.seeds]

    def render(self, step: int, title: str = "") -> Image.Image:
        if self._base is None:
            self._base = sample_images(self.host, self.network, self.prompts, self.seeds, multiplier=0.0, **self.kw)
        lora = sample_images(self.host, self.network, self.prompts, self.seeds, multiplier=1.0, **self.kw)
        return grid_image(self._base, lora, self.labels(), title or f"step {step}")
