"""Base-model training data that is partly wrong, the way web image-caption data is.

A batch is drawn from the training prompts (a quarter single objects, the rest pairs); each
image is a correct rendering of its true caption, then:

- with probability `caption_error` the caption shown to the model misdescribes it (pairs: a
  wrong relation, the colours swapped between the objects, or one shape changed; single
  objects: a wrong colour or shape);
- with probability `pixel_noise` Gaussian pixel noise (std 0.02..0.08) is added;
- with probability `clutter` one or two small stray shapes of random colours are drawn;
- with probability `gradient` the background gets a linear shading ramp.

So a model that fits this data well still makes the errors the ground-truth preference
penalises (wrong relations and attributes, noise, clutter): room for preference alignment.
Deterministic: batch `seed` fixes everything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import ConfigError
from .dataset import (COLOURS, COLOUR_NAMES, IMAGE_SIZE, RELATION_NAMES, SHAPES, Caption, ObjectSpec, Scene,
                      parse_caption, render_scenes, sample_scene, train_prompts)


@dataclass
class DataNoise:
    """How imperfect the base training data is (fractions of the samples)."""

    single_fraction: float = 0.25
    caption_error: float = 0.2
    pixel_noise: float = 0.1
    clutter: float = 0.1
    gradient: float = 0.1

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"DataNoise.{k} must be in [0, 1], got {v}")


CLEAN = DataNoise(caption_error=0.0, pixel_noise=0.0, clutter=0.0, gradient=0.0)


def corrupt_caption(caption: Caption, rng: np.random.Generator) -> Caption:
    """A caption that misdescribes the image of `caption` in one attribute."""
    objs = list(caption.objects)
    if caption.is_pair:
        kind = rng.integers(3)
        if kind == 0:  # wrong relation
            rel = str(rng.choice([r for r in RELATION_NAMES if r != caption.relation]))
            return Caption(tuple(objs), rel)
        if kind == 1:  # colours swapped between the objects
            a, b = objs
            return Caption((ObjectSpec(b.colour, a.shape), ObjectSpec(a.colour, b.shape)), caption.relation)
        j = int(rng.integers(2))  # one shape changed
        objs[j] = ObjectSpec(objs[j].colour, str(rng.choice([s for s in SHAPES if s != objs[j].shape])))
        return Caption(tuple(objs), caption.relation)
    o = objs[0]
    if rng.random() < 0.5:
        return Caption((ObjectSpec(str(rng.choice([c for c in COLOUR_NAMES if c != o.colour])), o.shape),))
    return Caption((ObjectSpec(o.colour, str(rng.choice([s for s in SHAPES if s != o.shape]))),))


def _clutter_scene(scene: Scene, rng: np.random.Generator, size: int) -> Scene:
    n = int(rng.integers(1, 3))
    extra_shapes = [str(rng.choice(SHAPES)) for _ in range(n)]
    extra_colours = [tuple(float(v) for v in COLOURS[str(rng.choice(COLOUR_NAMES))]) for _ in range(n)]
    extra_sizes = [float(rng.uniform(3.0, 5.0)) for _ in range(n)]
    extra_pos = [(float(rng.uniform(3, size - 3)), float(rng.uniform(3, size - 3))) for _ in range(n)]
    return Scene(scene.caption, scene.shapes + extra_shapes, scene.colours + extra_colours,
                 scene.centroids + extra_pos, scene.sizes + extra_sizes, scene.background)


def training_batch(batch_size: int, seed: int, noise: DataNoise | None = None,
                   prompts: list[str] | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
    """(images [B,3,32,32] in [0,1], captions shown to the model, true captions)."""
    noise = noise or DataNoise()
    rng = np.random.default_rng([int(seed), 11])
    if prompts is None:
        singles, pairs = train_prompts("single"), train_prompts("pair")
    else:
        singles = [p for p in prompts if not parse_caption(p).is_pair]
        pairs = [p for p in prompts if parse_caption(p).is_pair]
    if not singles and not pairs:
        raise ConfigError("no prompts to draw training data from")
    scenes, shown, true = [], [], []
    noise_std = np.zeros(batch_size, dtype=np.float32)
    ramps = np.zeros((batch_size, 3), dtype=np.float32)  # amplitude, direction cos, sin
    for i in range(batch_size):
        use_single = bool(singles) and (rng.random() < noise.single_fraction or not pairs)
        pool = singles if use_single else pairs
        cap = parse_caption(pool[int(rng.integers(len(pool)))])
        scene = sample_scene(cap, rng)
        if rng.random() < noise.clutter:
            scene = _clutter_scene(scene, rng, IMAGE_SIZE)
        if rng.random() < noise.pixel_noise:
            noise_std[i] = rng.uniform(0.02, 0.08)
        if rng.random() < noise.gradient:
            angle = rng.uniform(0, 2 * np.pi)
            ramps[i] = (rng.uniform(0.05, 0.15), np.cos(angle), np.sin(angle))
        shown_cap = corrupt_caption(cap, rng) if rng.random() < noise.caption_error else cap
        scenes.append(scene)
        shown.append(shown_cap.text)
        true.append(cap.text)
    images = render_scenes(scenes)
    if ramps[:, 0].any():
        coords = (torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5) / IMAGE_SIZE - 0.5
        r = torch.from_numpy(ramps)
        ramp = r[:, 0, None, None] * (r[:, 1, None, None] * coords.reshape(1, 1, -1) + r[:, 2, None, None] * coords.reshape(1, -1, 1))
        images = images + ramp.unsqueeze(1)
    if noise_std.any():
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        images = images + torch.from_numpy(noise_std).reshape(-1, 1, 1, 1) * torch.randn(images.shape, generator=g)
    return images.clamp(0, 1), shown, true
