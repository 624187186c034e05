"""Render what the resampler did: one row per pooled step, the k candidates' decoded x0 in
columns, the kept one outlined, each with its score."""

from __future__ import annotations

from PIL import Image, ImageDraw

from .resampler import ResampleResult


def render_trace_grid(result: ResampleResult, prompt_index: int = 0, cell: int = 96, title: str | None = None) -> Image.Image:
    """A PIL image of the pooled steps for one prompt (needs a trace run with keep_images=True)."""
    rows = [r for r in result.trace if r.pooled and r.images is not None]
    if not rows:
        raise ValueError("the trace holds no candidate images: run the resampler with keep_images=True")
    k = rows[0].images.shape[0]
    label_w, head_h, text_h, pad = 78, 22 if title else 4, 14, 4
    width = label_w + k * (cell + pad) + pad
    height = head_h + len(rows) * (cell + text_h + pad) + pad
    grid = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 4), title[:120], fill=(230, 230, 230))
    for r_i, rec in enumerate(rows):
        y = head_h + r_i * (cell + text_h + pad)
        draw.text((pad, y + cell // 2 - 12), f"step {rec.i}", fill=(220, 220, 220))
        draw.text((pad, y + cell // 2 + 2), f"t={rec.t:.0f}", fill=(160, 160, 160))
        chosen = int(rec.chosen[prompt_index])
        for c in range(k):
            x = label_w + c * (cell + pad)
            img = rec.images[c, prompt_index].permute(1, 2, 0).numpy()
            tile = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (x, y))
            score = float(rec.scores[c, prompt_index])
            color = (90, 220, 120) if c == chosen else (200, 200, 200)
            if c == chosen:
                draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=(90, 220, 120), width=3)
            draw.text((x + 2, y + cell + 1), f"{score:.3g}", fill=color)
    return grid
