"""The ground-truth preference of the embedded world, computed exactly from pixels and caption.

It judges any image (rendered, generated, or a decoded predicted x0), so it measures what is
in the picture rather than reading a scene description:

- colour pixels: a pixel's chroma (max - min of RGB) gates it as "coloured"; its hue assigns it
  softly to the six palette colours (a softmax over hue distances, 12 degrees wide).
- per named object: the soft mask of its colour gives its area, centroid and shape.
  presence = smoothstep(area, 4, 16 px).
  shape fit = IoU of the mask with each shape's template of the same area, placed on the mask's
  centroid; the named shape must beat the best other shape (sigmoid of the IoU margin / 0.04)
  and fit well in itself (IoU ramp 0.5 -> 0.8).
- relation (pairs): the subject's centroid minus the object's, d along the relation's axis
  (positive when the caption holds) and p across it:
  sigmoid((d - 4) / 1.5) * sigmoid((d - |p| / 2) / 1.5), times both presences.
- quality: the background outside the (dilated) named objects must be flat and the image must
  hold no unexplained colour: (1 - smoothstep(background deviation, 0.01, 0.06)) *
  (1 - smoothstep(stray coloured pixels, 2, 20)) * mean presence.

- style: the house style, a light background whatever the caption (the consistent, prompt-
  independent part of a preference, as light, vivid pictures are for human raters):
  (1 - smoothstep(|background lightness - 0.68|, 0.03, 0.25)) * mean presence. The training
  data's backgrounds are grey 0.25 .. 0.75, so the base model draws the house style only sometimes.

components: colour = mean presence; shape = mean over objects of presence * shape fit;
relation (pairs only); quality; style. The preference is the mean of the applicable components
(four for one object, five for two), in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InvalidTensorError
from .dataset import COLOUR_NAMES, COLOURS, RELATIONS, SHAPE_AREA, SHAPES, parse_caption, shape_coverage

CHROMA_GATE = (0.08, 0.2)
HUE_WIDTH_DEG = 12.0
PRESENCE_AREA = (4.0, 16.0)
SHAPE_MARGIN_TAU = 0.03
SHAPE_FIT = (0.5, 0.8)
RELATION_MIN_DIST = 4.0
RELATION_TAU = 1.5
BACKGROUND_DEV = (0.01, 0.06)
STRAY_PIXELS = (2.0, 20.0)
STYLE_KEY = 0.68  # the house style's background lightness
STYLE_TOLERANCE = (0.03, 0.25)
TEMPLATE_SUPERSAMPLE = 3
COMPONENTS = ("colour", "shape", "relation", "quality", "style")


@dataclass
class Preference:
    """The preference [B] and its components [B] (relation is NaN for one-object captions)."""

    total: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    relation: torch.Tensor
    quality: torch.Tensor
    style: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"total": self.total, **{k: getattr(self, k) for k in COMPONENTS}}


def smoothstep(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0, 1)
    return t * t * (3 - 2 * t)


def _palette_hues() -> torch.Tensor:
    return torch.stack([rgb_to_hue(torch.tensor(COLOURS[c]).reshape(1, 3, 1, 1)).flatten() for c in COLOUR_NAMES]).flatten()


def rgb_to_hue(x: torch.Tensor) -> torch.Tensor:
    """Hue in degrees [0, 360) of images [B,3,H,W] -> [B,H,W] (0 where the pixel is grey)."""
    r, g, b = x.unbind(1)
    mx, _ = x.max(1)
    mn, _ = x.min(1)
    c = (mx - mn).clamp_min(1e-6)
    h = torch.where(mx == r, ((g - b) / c) % 6, torch.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return (h * 60.0) % 360.0


def _palette_chroma() -> torch.Tensor:
    rgb = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])
    return rgb.amax(1) - rgb.amin(1)


def colour_maps(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coverage [B,6,H,W] of each palette colour, coloured mass [B,H,W] = their sum).

    A pixel blending a colour with grey at coverage a has chroma a * (the colour's chroma), so
    chroma / palette chroma measures coverage exactly at antialiased edges; a soft threshold
    on chroma ignores the faint chroma of grey noise.
    """
    mx, _ = images.max(1)
    mn, _ = images.min(1)
    chroma = mx - mn
    hue = rgb_to_hue(images)
    ref = _palette_hues().to(images.device, images.dtype).reshape(1, -1, 1, 1)
    d = (hue.unsqueeze(1) - ref).abs()
    d = torch.minimum(d, 360.0 - d)
    soft = torch.softmax(-0.5 * (d / HUE_WIDTH_DEG) ** 2, dim=1)
    ref_chroma = _palette_chroma().to(images.device, images.dtype).reshape(1, -1, 1, 1)
    coverage = (chroma.unsqueeze(1) / ref_chroma).clamp(0, 1) * smoothstep(chroma, *CHROMA_GATE).unsqueeze(1)
    member = soft * coverage
    return member, member.sum(1)


def _shape_scores(masks: torch.Tensor, named: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For soft masks [N,H,W] and named shape indices [N]: (shape fit [N], area, cx, cy)."""
    n, h, w = masks.shape
    area = masks.sum((1, 2))
    ys = torch.arange(h, device=masks.device, dtype=masks.dtype) + 0.5
    xs = torch.arange(w, device=masks.device, dtype=masks.dtype) + 0.5
    safe = area.clamp_min(1e-6)
    cx = (masks.sum(1) * xs).sum(1) / safe
    cy = (masks.sum(2) * ys).sum(1) / safe
    k = len(SHAPES)
    kinds = torch.arange(k, device=masks.device).repeat(n)
    areas = torch.tensor([SHAPE_AREA[s] for s in SHAPES], device=masks.device, dtype=masks.dtype)
    side = (area.clamp_min(1.0).unsqueeze(1) / areas.unsqueeze(0)).sqrt().flatten()
    templates = shape_coverage(kinds, cx.repeat_interleave(k), cy.repeat_interleave(k), side, size=h,
                               supersample=TEMPLATE_SUPERSAMPLE).reshape(n, k, h, w)
    m = masks.unsqueeze(1)
    iou = torch.minimum(m, templates).sum((2, 3)) / torch.maximum(m, templates).sum((2, 3)).clamp_min(1e-6)
    own = iou.gather(1, named.reshape(n, 1)).squeeze(1)
    others = iou.masked_fill(F.one_hot(named, k).bool(), -1.0).amax(1)
    fit = torch.sigmoid((own - others) / SHAPE_MARGIN_TAU) * smoothstep(own, *SHAPE_FIT)
    return fit, area, cx, cy


def _check(images: torch.Tensor, captions: str | Sequence[str]) -> list[str]:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise InvalidTensorError(f"images must be a float tensor [B,3,H,W], got {getattr(images, 'shape', type(images))}")
    if images.shape[-1] != images.shape[-2]:
        raise InvalidTensorError(f"images must be square, got {tuple(images.shape[-2:])}")
    b = images.shape[0]
    caps = [captions] * b if isinstance(captions, str) else list(captions)
    if len(caps) != b:
        raise ConfigError(f"{len(caps)} captions for {b} images")
    return caps


@torch.no_grad()
def ground_truth_components(images: torch.Tensor, captions: str | Sequence[str]) -> Preference:
    """The preference and its components for images [B,3,H,W] in [0,1] and their captions.

    Images of another size than 32x32 are resized (area-averaged or bilinear) to 32x32 first.
    """
    caps = _check(images, captions)
    x = images.detach().float().clamp(0, 1)
    if x.shape[-1] != 32:
        x = F.interpolate(x, size=(32, 32), mode="area" if x.shape[-1] > 32 else "bilinear", align_corners=None if x.shape[-1] > 32 else False)
    b, dev = x.shape[0], x.device
    parsed = [parse_caption(c) for c in caps]
    member, mass = colour_maps(x)

    # objects: row r = (image i, object j)
    img_idx = torch.tensor([i for i, p in enumerate(parsed) for _ in p.objects], device=dev)
    colour_idx = torch.tensor([COLOUR_NAMES.index(o.colour) for p in parsed for o in p.objects], device=dev)
    shape_idx = torch.tensor([SHAPES.index(o.shape) for p in parsed for o in p.objects], device=dev)
    masks = member[img_idx, colour_idx]  # [R,H,W]
    fit, area, cx, cy = _shape_scores(masks, shape_idx)
    presence = smoothstep(area, *PRESENCE_AREA)
    n_obj = torch.tensor([len(p.objects) for p in parsed], device=dev, dtype=x.dtype)

    def per_image(v: torch.Tensor) -> torch.Tensor:  # mean over each image's objects
        return torch.zeros(b, device=dev, dtype=x.dtype).index_add_(0, img_idx, v) / n_obj

    named = torch.zeros_like(mass).index_add_(0, img_idx, masks)  # [B,H,W] coverage of the named colours
    purity = (named.sum((1, 2)) + 1) / (mass.sum((1, 2)) + 1)  # share of the coloured mass that was asked for
    colour = per_image(presence) * purity.clamp(0, 1)
    shape = per_image(presence * fit)

    # relation of the subject (slot 0) to the object (slot 1)
    relation = torch.full((b,), float("nan"), device=dev, dtype=x.dtype)
    pair_rows = [i for i, p in enumerate(parsed) if p.is_pair]
    if pair_rows:
        pi = torch.tensor(pair_rows, device=dev)
        first_row = torch.cumsum(n_obj.long(), 0) - n_obj.long()  # row of each image's subject
        r0 = first_row[pi]
        r1 = r0 + 1
        axis = torch.tensor([RELATIONS[parsed[i].relation][0] for i in pair_rows], device=dev)
        sign = torch.tensor([RELATIONS[parsed[i].relation][1] for i in pair_rows], device=dev, dtype=x.dtype)
        dxy = torch.stack([cx[r0] - cx[r1], cy[r0] - cy[r1]], 1)
        along = sign * dxy.gather(1, axis.reshape(-1, 1)).squeeze(1)
        across = dxy.gather(1, (1 - axis).reshape(-1, 1)).squeeze(1).abs()
        rel = torch.sigmoid((along - RELATION_MIN_DIST) / RELATION_TAU) * torch.sigmoid((along - across / 2) / RELATION_TAU)
        relation[pi] = rel * presence[r0] * presence[r1]

    # quality: flat background and no unexplained colour
    near_objects = F.max_pool2d(named.clamp(0, 1).unsqueeze(1), 3, stride=1, padding=1).squeeze(1)
    bg_w = (1 - near_objects).clamp(0, 1)
    bg_mean = (x * bg_w.unsqueeze(1)).sum((2, 3)) / bg_w.sum((1, 2)).clamp_min(1e-6).unsqueeze(1)
    dev_map = (x - bg_mean.reshape(b, 3, 1, 1)).abs().mean(1)
    bg_dev = (dev_map * bg_w).sum((1, 2)) / bg_w.sum((1, 2)).clamp_min(1e-6)
    stray = ((mass - named).clamp_min(0) * bg_w).sum((1, 2))
    quality = (1 - smoothstep(bg_dev, *BACKGROUND_DEV)) * (1 - smoothstep(stray, *STRAY_PIXELS)) * per_image(presence)

    # style: the house style is a light background (lightness near STYLE_KEY), whatever the caption
    bg_light = bg_mean.mean(1)
    style = (1 - smoothstep((bg_light - STYLE_KEY).abs(), *STYLE_TOLERANCE)) * per_image(presence)

    parts = torch.stack([colour, shape, torch.nan_to_num(relation, nan=0.0), quality, style], 1)
    weights = torch.ones_like(parts)
    weights[:, 2] = (~relation.isnan()).to(x.dtype)
    total = (parts * weights).sum(1) / weights.sum(1)
    return Preference(total=total, colour=colour, shape=shape, relation=relation, quality=quality, style=style)


def ground_truth(images: torch.Tensor, captions: str | Sequence[str]) -> torch.Tensor:
    """The ground-truth preference [B] in [0, 1] (see the module docstring)."""
    return ground_truth_components(images, captions).total


def describe(pref: Preference, index: int = 0) -> str:
    """One line with the preference and components of one image, for logs and tests."""
    parts = [f"total={pref.total[index]:.3f}"] + [f"{k}={float(getattr(pref, k)[index]):.3f}" for k in COMPONENTS]
    return " ".join(parts)


__all__ = ["Preference", "ground_truth", "ground_truth_components", "colour_maps", "rgb_to_hue", "describe", "COMPONENTS"]
