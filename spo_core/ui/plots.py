"""Loss / reward curves drawn with PIL: the same picture in every gradio version (gradio's own
plot components need pandas/altair and changed across 3.41, 4.x and later)."""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw

COLORS = [(249, 115, 22), (37, 99, 235), (22, 163, 74), (220, 38, 38), (147, 51, 234), (8, 145, 178)]


def line_chart(history: Sequence[dict[str, float]], keys: Sequence[str] | None = None, width: int = 640,
               height: int = 280, title: str = "") -> Image.Image | None:
    """One panel per metric (stacked), x = the 'step' field; None when there is nothing to draw."""
    if not history:
        return None
    keys = [k for k in (keys or sorted({k for h in history for k in h if k != "step"})) if any(k in h for h in history)]
    if not keys:
        return None
    keys = keys[:4]
    panel_h = max(height // len(keys), 90)
    img = Image.new("RGB", (width, panel_h * len(keys)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for n, key in enumerate(keys):
        pts = [(h.get("step", i), h[key]) for i, h in enumerate(history) if key in h and math.isfinite(h[key])]
        top = n * panel_h
        _panel(draw, pts, key if not (title and n == 0) else f"{title}: {key}", (48, top + 18, width - 12, top + panel_h - 22),
               COLORS[n % len(COLORS)])
    return img


def _panel(draw: ImageDraw.ImageDraw, pts: list[tuple[float, float]], label: str, box: tuple[int, int, int, int],
           color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(200, 200, 200))
    draw.text((x0, y0 - 14), label, fill=(40, 40, 40))
    if not pts:
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    xlo, xhi = min(xs), max(xs)
    if xhi - xlo < 1e-12:
        xlo, xhi = xlo - 1, xhi + 1
    draw.text((2, y0), f"{hi:.3g}", fill=(90, 90, 90))
    draw.text((2, y1 - 10), f"{lo:.3g}", fill=(90, 90, 90))
    draw.text((x1 - 40, y1 + 4), f"{xhi:g}", fill=(90, 90, 90))

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0))

    line = [to_px(x, y) for x, y in pts]
    if len(line) == 1:
        cx, cy = line[0]
        draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=color)
    else:
        draw.line(line, fill=color, width=2)
