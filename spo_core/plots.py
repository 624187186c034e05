"""Line charts as PNG with PIL only (no matplotlib): training curves, benchmark figures, the demo.

    img = line_chart({"loss": losses, "loss (avg 20)": smooth(losses, 20)}, x=steps, title="SPO loss")
    panel = stack_charts([img, line_chart({"score margin": margins}, x=steps)])
    save_png(panel, "curves.png")

Series share one x axis; values that are None/NaN/inf are gaps. Everything is drawn with PIL's
built-in bitmap font, so it works on any machine and in every host.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def smooth(values: Sequence[float | None], window: int) -> list[float | None]:
    """Trailing moving average over the finite values of the last `window` points."""
    out: list[float | None] = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1):i + 1] if _finite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out


def _nice_step(lo: float, hi: float, count: int, integer: bool = False) -> float:
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return max(1.0, round(step)) if integer else step


def _nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> tuple[list[float], float]:
    if hi <= lo:
        return [lo], 1.0
    step = _nice_step(lo, hi, count, integer)
    v = math.ceil(lo / step) * step
    ticks = []
    while v <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks, step


def _fmt(v: float, step: float | None = None) -> str:
    """A tick label with as many decimals as the tick spacing needs."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6 or (step is not None and step < 1e-4 and a < 1e-2) or (step is None and a < 1e-3):
        return f"{v:.2e}"
    if step is None:
        return f"{v:.4g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1  # 2.5, 0.25 ...
    return f"{v:.{decimals}f}"


def line_chart(series: Mapping[str, Sequence[float | None]], x: Sequence[float] | None = None, title: str = "",
               x_label: str = "step", y_label: str = "", size: tuple[int, int] = (640, 300),
               log_y: bool = False) -> Image.Image:
    """One chart of several named series against a shared x axis (default 0..n-1)."""
    width, height = size
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    n = max((len(v) for v in series.values()), default=0)
    xs = list(x) if x is not None else list(range(n))
    left, right, top, bottom = 62, 12, 24 if title else 10, 34
    legend_h = 14 * ((len(series) + 2) // 3)
    plot_w, plot_h = width - left - right, height - top - bottom - legend_h
    draw.text((left, 5), title, fill="black", font=font)

    def ty(v: float) -> float:
        return math.log10(v) if log_y else v

    points = [(xs[i], ty(v)) for vals in series.values() for i, v in enumerate(vals)
              if i < len(xs) and _finite(v) and _finite(xs[i]) and (not log_y or v > 0)]
    box = (left, top, left + plot_w, top + plot_h)
    draw.rectangle(box, outline=(80, 80, 80))
    if not points or plot_w < 10 or plot_h < 10:
        draw.text((left + 8, top + 8), "no data", fill=(120, 120, 120), font=font)
        return img
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        pad = abs(y_lo) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    pad = (y_hi - y_lo) * 0.05
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(xv: float) -> float:
        return left + (xv - x_lo) / (x_hi - x_lo) * plot_w

    def py(yv: float) -> float:
        return top + plot_h - (yv - y_lo) / (y_hi - y_lo) * plot_h

    y_ticks, y_step = _nice_ticks(y_lo, y_hi)
    for t in y_ticks:
        yy = py(t)
        draw.line([(left, yy), (left + plot_w, yy)], fill=(232, 232, 232))
        label = _fmt(10 ** t) if log_y else _fmt(t, y_step)
        draw.text((4, yy - 6), label.rjust(10)[-10:], fill=(60, 60, 60), font=font)
    integer_x = all(float(p[0]).is_integer() for p in points)
    x_ticks, x_step = _nice_ticks(x_lo, x_hi, 6, integer=integer_x)
    for t in x_ticks:
        xx = px(t)
        draw.line([(xx, top + plot_h), (xx, top + plot_h + 4)], fill=(60, 60, 60))
        draw.text((xx - 10, top + plot_h + 6), _fmt(t, x_step), fill=(60, 60, 60), font=font)
    draw.text((left + plot_w // 2 - 3 * len(x_label), top + plot_h + 18), x_label, fill="black", font=font)
    if y_label:
        draw.text((4, top - 12 if top > 12 else 0), y_label, fill="black", font=font)
    for si, (name, vals) in enumerate(series.items()):
        color = PALETTE[si % len(PALETTE)]
        segment: list[tuple[float, float]] = []
        for i, v in enumerate(vals):
            ok = i < len(xs) and _finite(v) and _finite(xs[i]) and (not log_y or v > 0)
            if ok:
                segment.append((px(xs[i]), py(ty(v))))
            if (not ok or i == len(vals) - 1) and segment:
                if len(segment) == 1:
                    cx, cy = segment[0]
                    draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
                else:
                    draw.line(segment, fill=color, width=2)
                segment = []
        lx = left + (si % 3) * (plot_w // 3)
        ly = top + plot_h + bottom + (si // 3) * 14 - 4
        draw.rectangle([lx, ly + 3, lx + 12, ly + 9], fill=color)
        draw.text((lx + 16, ly), str(name)[:40], fill="black", font=font)
    return img


def stack_charts(charts: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    """Charts one below the other on a white background."""
    if not charts:
        return Image.new("RGB", (1, 1), "white")
    width = max(c.width for c in charts)
    height = sum(c.height for c in charts) + gap * (len(charts) - 1)
    out = Image.new("RGB", (width, height), "white")
    y = 0
    for c in charts:
        out.paste(c, (0, y))
        y += c.height + gap
    return out


def save_png(image: Image.Image, path: str | os.PathLike, overwrite: bool = True) -> str:
    """Write a PNG atomically."""
    from .safe_io import atomic_output

    with atomic_output(path, overwrite=overwrite, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return str(path)


def curves_from_records(records: Sequence[Mapping[str, float]], panels: Sequence[Sequence[str]], x_key: str = "step",
                        title_prefix: str = "", smooth_window: int = 0, size: tuple[int, int] = (640, 260)) -> Image.Image:
    """One chart per panel (a list of record keys), from a list of dict records (e.g. a JSONL log)."""
    charts = []
    for keys in panels:
        rows = [r for r in records if any(_finite(r.get(k)) for k in keys) and _finite(r.get(x_key))]
        xs = [r[x_key] for r in rows]
        series: dict[str, list[float | None]] = {}
        for k in keys:
            vals = [r.get(k) if _finite(r.get(k)) else None for r in rows]
            if not any(v is not None for v in vals):
                continue
            series[k] = vals
            if smooth_window > 1 and len(vals) > smooth_window:
                series[f"{k} (avg {smooth_window})"] = smooth(vals, smooth_window)
        if series:
            charts.append(line_chart(series, xs, title=f"{title_prefix}{', '.join(keys)}", x_label=x_key, size=size))
    return stack_charts(charts)
