"""The embedded world: coloured shapes on grey backgrounds, with captions from a small grammar.

Captions are either one object, "a red circle", or two objects and a spatial relation,
"a red circle above a blue square" (the first object is the subject: it is above the second).
Objects have one of six saturated colours and one of four shapes; the two objects of a pair
always differ in colour, so every object can be told apart by its colour alone.

Images are 32x32 RGB in [0, 1], rendered with 4x4 supersampling (antialiased edges) on a
uniform neutral-grey background. Everything is deterministic from a seed: a scene's layout
comes from `numpy.random.default_rng(seed)`, and rasterising is vectorised torch.

Held-out prompts: 24 of the 240 unordered object pairs (different colours) are never shown
together in training; their 8 captions each (2 orders x 4 relations) form the held-out set,
192 prompts that test compositional generalisation. Single-object captions and the other
216 pairs (1,728 captions) are the training prompts.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError

IMAGE_SIZE = 32
SUPERSAMPLE = 4

# Saturated colours whose hues are far apart, so hue alone names them (see preference.py).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "yellow": (0.92, 0.85, 0.12),
    "green": (0.15, 0.75, 0.15),
    "cyan": (0.12, 0.78, 0.85),
    "blue": (0.15, 0.25, 0.92),
    "purple": (0.62, 0.15, 0.85),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# relation word -> (axis, sign): the subject's centroid minus the object's, along x (0) or y (1,
# downwards), has this sign. "a red circle above a blue square": red is higher, so y_red < y_blue.
RELATIONS: dict[str, tuple[int, int]] = {
    "above": (1, -1),
    "below": (1, +1),
    "to the left of": (0, -1),
    "to the right of": (0, +1),
}
RELATION_NAMES: tuple[str, ...] = tuple(RELATIONS)

# Area of each shape relative to the square of its bounding-box side, and the offset of its
# centroid from the box centre in units of the side (only the triangle's differs).
SHAPE_AREA: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5.0 / 9.0}
SHAPE_CENTROID_DY: dict[str, float] = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 6.0, "cross": 0.0}

SINGLE_SIZE = (10.0, 16.0)  # bounding-box side in pixels, single objects
PAIR_SIZE = (8.0, 12.0)  # bounding-box side in pixels, each object of a pair
BACKGROUND_GREY = (0.25, 0.75)
COLOUR_JITTER = 0.03
MARGIN = 1.0  # pixels kept free at the image border
HELDOUT_PAIRS = 24
SPLIT_SEED = 8


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str

    @property
    def text(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Caption:
    """A parsed caption: one or two objects and, for two, the relation of the first to the second."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        if self.relation is None:
            return f"a {self.objects[0].text}"
        return f"a {self.objects[0].text} {self.relation} a {self.objects[1].text}"

    @property
    def is_pair(self) -> bool:
        return self.relation is not None


_OBJ = rf"a ({'|'.join(COLOUR_NAMES)}) ({'|'.join(SHAPES)})"
_CAPTION_RE = re.compile(rf"^{_OBJ}(?: ({'|'.join(RELATION_NAMES)}) {_OBJ})?$")


@lru_cache(maxsize=8192)
def parse_caption(text: str) -> Caption:
    """Parse a caption of the world's grammar (case and surrounding spaces are ignored)."""
    m = _CAPTION_RE.match(" ".join(text.lower().split()))
    if m is None:
        raise ConfigError(
            f"{text!r} is not a caption of the embedded world. Captions are 'a <colour> <shape>' or "
            f"'a <colour> <shape> <relation> a <colour> <shape>' with colours {', '.join(COLOUR_NAMES)}, "
            f"shapes {', '.join(SHAPES)} and relations {', '.join(RELATION_NAMES)}.")
    c1, s1, rel, c2, s2 = m.groups()
    if rel is None:
        return Caption((ObjectSpec(c1, s1),))
    if c1 == c2:
        raise ConfigError(f"{text!r}: the two objects of a caption must have different colours")
    return Caption((ObjectSpec(c1, s1), ObjectSpec(c2, s2)), rel)


def all_objects() -> list[ObjectSpec]:
    return [ObjectSpec(c, s) for c in COLOUR_NAMES for s in SHAPES]


def single_captions() -> list[str]:
    return [Caption((o,)).text for o in all_objects()]


def _object_pairs() -> list[tuple[ObjectSpec, ObjectSpec]]:
    """The 240 unordered pairs of objects with different colours, in a fixed order."""
    return [(a, b) for a, b in itertools.combinations(all_objects(), 2) if a.colour != b.colour]


def _pair_captions(a: ObjectSpec, b: ObjectSpec) -> list[str]:
    return [Caption((x, y), r).text for x, y in ((a, b), (b, a)) for r in RELATION_NAMES]


@lru_cache(maxsize=1)
def _split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    pairs = _object_pairs()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(pairs))
    held = set(order[:HELDOUT_PAIRS].tolist())
    train = single_captions()
    heldout: list[str] = []
    for i, (a, b) in enumerate(pairs):
        (heldout if i in held else train).extend(_pair_captions(a, b))
    return tuple(train), tuple(heldout)


def train_prompts(kind: str = "all") -> list[str]:
    """Captions seen in base training: kind "all" (1,752), "single" (24) or "pair" (1,728)."""
    train = _split()[0]
    if kind == "all":
        return list(train)
    if kind not in ("single", "pair"):
        raise ConfigError(f"kind must be 'all', 'single' or 'pair', got {kind!r}")
    return [c for c in train if parse_caption(c).is_pair == (kind == "pair")]


def heldout_prompts() -> list[str]:
    """The 192 two-object captions never seen in base training (held-out object pairs)."""
    return list(_split()[1])


def heldout_eval_set(n_prompts: int = 32, seeds_per_prompt: int = 2, seed: int = 0) -> list[tuple[str, int]]:
    """A fixed list of (held-out prompt, sampling seed) pairs for evaluation.

    The prompts are a seeded choice spread over the held-out object pairs; the seeds are
    1000 * prompt index + j, so a larger set extends a smaller one.
    """
    prompts = heldout_prompts()
    if not 1 <= n_prompts <= len(prompts):
        raise ConfigError(f"n_prompts must be in 1..{len(prompts)}, got {n_prompts}")
    if seeds_per_prompt < 1:
        raise ConfigError(f"seeds_per_prompt must be >= 1, got {seeds_per_prompt}")
    order = np.random.default_rng(10_000 + seed).permutation(len(prompts))[:n_prompts]
    return [(prompts[i], 1000 * int(i) + j) for i in order for j in range(seeds_per_prompt)]


# ----------------------------------------------------------------------------------------------
# scenes
# ----------------------------------------------------------------------------------------------

@dataclass
class Scene:
    """Everything needed to draw one image: object centroids (pixels, x right, y down), sizes
    (bounding-box sides), shapes, colours (RGB) and the background grey level."""

    caption: str
    shapes: list[str]
    colours: list[tuple[float, float, float]]
    centroids: list[tuple[float, float]]
    sizes: list[float]
    background: float


def _jitter(rgb: tuple[float, float, float], rng: np.random.Generator) -> tuple[float, float, float]:
    c = np.clip(np.asarray(rgb) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0.0, 1.0)
    return tuple(float(v) for v in c)


def _box_extent(shape: str, size: float) -> tuple[float, float, float, float]:
    """(left, right, up, down) distances from the centroid to the bounding box."""
    dy = SHAPE_CENTROID_DY[shape] * size
    return size / 2, size / 2, size / 2 + dy, size / 2 - dy


def sample_scene(caption: str | Caption, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """Draw a layout that satisfies the caption: objects inside the image, not overlapping, and
    for pairs separated along the relation's axis by more than their half-sizes with an
    off-axis offset of at most half the on-axis distance."""
    cap = parse_caption(caption) if isinstance(caption, str) else caption
    background = float(rng.uniform(*BACKGROUND_GREY))
    colours = [_jitter(COLOURS[o.colour], rng) for o in cap.objects]
    shapes = [o.shape for o in cap.objects]
    if not cap.is_pair:
        s = float(rng.uniform(*SINGLE_SIZE))
        l, r, u, d = _box_extent(shapes[0], s)
        cx = float(rng.uniform(MARGIN + l, size - MARGIN - r))
        cy = float(rng.uniform(MARGIN + u, size - MARGIN - d))
        return Scene(cap.text, shapes, colours, [(cx, cy)], [s], background)
    axis, sign = RELATIONS[cap.relation]
    for _ in range(1000):
        s1, s2 = (float(v) for v in rng.uniform(*PAIR_SIZE, 2))
        e1, e2 = _box_extent(shapes[0], s1), _box_extent(shapes[1], s2)
        gap = (s1 + s2) / 2 + 1.0
        span = size - 2 * MARGIN - (s1 + s2) / 2 - 1.0  # room along the axis
        if span < gap:
            continue
        dist = float(rng.uniform(gap, min(span, gap + 8.0)))
        off = float(rng.uniform(-dist / 2, dist / 2))
        delta = [0.0, 0.0]
        delta[axis] = sign * dist
        delta[1 - axis] = off
        # the subject sits at p, the object at p - delta; find p's feasible box
        lo_x = max(MARGIN + e1[0], MARGIN + e2[0] + delta[0])
        hi_x = min(size - MARGIN - e1[1], size - MARGIN - e2[1] + delta[0])
        lo_y = max(MARGIN + e1[2], MARGIN + e2[2] + delta[1])
        hi_y = min(size - MARGIN - e1[3], size - MARGIN - e2[3] + delta[1])
        if lo_x > hi_x or lo_y > hi_y:
            continue
        px, py = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
        centroids = [(px, py), (px - delta[0], py - delta[1])]
        return Scene(cap.text, shapes, colours, centroids, [s1, s2], background)
    raise RuntimeError(f"could not lay out {cap.text!r}")  # pragma: no cover - the ranges make this unreachable


def scene_for(caption: str, seed: int) -> Scene:
    """The scene of (caption, seed): the same layout on every machine."""
    return sample_scene(caption, np.random.default_rng([int(seed), 7]))


# ----------------------------------------------------------------------------------------------
# rasterising (shared with the ground-truth preference, which matches shape templates)
# ----------------------------------------------------------------------------------------------

def shape_coverage(kinds: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, side: torch.Tensor,
                   size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Antialiased coverage [N, size, size] in [0, 1] of N shapes.

    kinds: long [N], indices into SHAPES; cx, cy: the shapes' centroids in pixels (pixel i
    spans [i, i+1)); side: bounding-box sides in pixels. Computed on a supersampled grid and
    average-pooled, on the device and in the dtype of `cx`.
    """
    n = kinds.shape[0]
    dev, dt = cx.device, cx.dtype if cx.dtype.is_floating_point else torch.float32
    g = (torch.arange(size * supersample, device=dev, dtype=dt) + 0.5) / supersample
    side = side.to(dt).reshape(n, 1, 1).clamp_min(1e-3)
    half = side / 2
    dy = torch.tensor([SHAPE_CENTROID_DY[s] for s in SHAPES], device=dev, dtype=dt)[kinds].reshape(n, 1, 1) * side
    u = (g.reshape(1, 1, -1) - cx.to(dt).reshape(n, 1, 1)) / half  # [n,1,W]
    v = (g.reshape(1, -1, 1) - (cy.to(dt).reshape(n, 1, 1) - dy)) / half  # [n,H,1], box-centred
    cov = torch.empty(n, size, size, device=dev, dtype=dt)
    for k, name in enumerate(SHAPES):  # only the shape each row needs
        sel = (kinds == k).nonzero().flatten()
        if sel.numel() == 0:
            continue
        uk, vk = u[sel], v[sel]
        au, av = uk.abs(), vk.abs()
        if name == "circle":
            hit = (uk * uk + vk * vk) <= 1
        elif name == "square":
            hit = (au <= 1) & (av <= 1)
        elif name == "triangle":  # apex up, base down
            hit = (vk <= 1) & (au <= (vk + 1) / 2)
        else:  # cross: two bars a third of the side wide
            hit = ((au <= 1 / 3) & (av <= 1)) | ((av <= 1 / 3) & (au <= 1))
        cov[sel] = torch.nn.functional.avg_pool2d(hit.to(dt).unsqueeze(1), supersample).squeeze(1)
    return cov


def render_scenes(scenes: Sequence[Scene], size: int = IMAGE_SIZE, device: str | torch.device = "cpu") -> torch.Tensor:
    """Images [B,3,size,size] in [0,1] for a list of scenes (objects drawn in caption order)."""
    b = len(scenes)
    img = torch.tensor([s.background for s in scenes], dtype=torch.float32, device=device)
    img = img.reshape(b, 1, 1, 1).expand(b, 3, size, size).clone()
    rows = [(i, j) for i, s in enumerate(scenes) for j in range(len(s.shapes))]
    if not rows:
        return img
    kinds = torch.tensor([SHAPES.index(scenes[i].shapes[j]) for i, j in rows], device=device)
    cx = torch.tensor([scenes[i].centroids[j][0] for i, j in rows], dtype=torch.float32, device=device)
    cy = torch.tensor([scenes[i].centroids[j][1] for i, j in rows], dtype=torch.float32, device=device)
    side = torch.tensor([scenes[i].sizes[j] for i, j in rows], dtype=torch.float32, device=device)
    rgb = torch.tensor([scenes[i].colours[j] for i, j in rows], dtype=torch.float32, device=device)
    cov = shape_coverage(kinds, cx, cy, side, size)
    layer = torch.tensor([j for _, j in rows], device=device)
    index = torch.tensor([i for i, _ in rows], device=device)
    for j in range(int(layer.max()) + 1):  # painter's order: first objects, then second ones
        sel = layer == j
        a = cov[sel].unsqueeze(1)
        idx = index[sel]
        img[idx] = img[idx] * (1 - a) + rgb[sel].reshape(-1, 3, 1, 1) * a
    return img


def render(caption: str, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The image [3,size,size] of (caption, seed): a correct, clean picture of the caption."""
    return render_scenes([scene_for(caption, seed)], size)[0]


def render_batch(captions: Sequence[str], seeds: Sequence[int], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images [B,3,size,size] for parallel lists of captions and seeds."""
    if len(captions) != len(seeds):
        raise ConfigError(f"{len(captions)} captions but {len(seeds)} seeds")
    return render_scenes([scene_for(c, s) for c, s in zip(captions, seeds)], size)
