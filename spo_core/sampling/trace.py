"""Render what the resampler did: one row per pooled step, the k candidates' decoded x0 in
columns, the kept one outlined in green, each with its score."""

from __future__ import annotations

from PIL import Image, ImageDraw

from ..errors import ConfigError
from .resampler import ResampleResult

CHOSEN = (90, 220, 120)


def render_trace_grid(result: ResampleResult, prompt_index: int = 0, cell: int = 96, title: str | None = None) -> Image.Image:
    """A PIL image of the pooled steps for one prompt (needs a run with keep_images=True).

    Row label: the step (or the steps of a multi-step segment), the parent's timestep t and the
    timestep the candidates were scored at. Under each candidate: its score; the chosen one is
    outlined and its score drawn in green.
    """
    rows = [r for r in result.trace if r.pooled and r.images is not None]
    if not rows:
        raise ConfigError("the trace holds no candidate images: run the resampler with keep_images=True and k > 1")
    k, batch = rows[0].images.shape[:2]
    if not 0 <= prompt_index < batch:
        raise ConfigError(f"prompt_index {prompt_index} is outside the batch of {batch}")
    label_w, head_h, text_h, pad = 84, 22 if title else 4, 14, 4
    width = label_w + k * (cell + pad) + pad
    height = head_h + len(rows) * (cell + text_h + pad) + pad
    grid = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 4), title[:120], fill=(230, 230, 230))
    for r_i, rec in enumerate(rows):
        y = head_h + r_i * (cell + text_h + pad)
        step = f"step {rec.i}" if rec.steps == 1 else f"steps {rec.i}-{rec.i + rec.steps - 1}"
        draw.text((pad, y + cell // 2 - 20), step, fill=(220, 220, 220))
        draw.text((pad, y + cell // 2 - 6), f"t={rec.t:.0f}", fill=(160, 160, 160))
        if rec.t_scored is not None:
            draw.text((pad, y + cell // 2 + 8), f"scored {rec.t_scored:.0f}", fill=(130, 130, 130))
        chosen = int(rec.chosen[prompt_index])
        for c in range(k):
            x = label_w + c * (cell + pad)
            img = rec.images[c, prompt_index].permute(1, 2, 0).numpy()
            tile = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (x, y))
            score = float(rec.scores[c, prompt_index])
            if c == chosen:
                draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=CHOSEN, width=3)
            draw.text((x + 2, y + cell + 1), f"{score:.4g}", fill=CHOSEN if c == chosen else (200, 200, 200))
    return grid


def render_particle_grid(result: ResampleResult, prompt_index: int = 0, cell: int = 96, title: str | None = None) -> Image.Image:
    """FK steering for one prompt: one row per weighting step, the N particles' decoded x0 in columns
    with their reward and normalised weight; a particle that left copies is outlined in green, with
    its number of copies (x2, x3 ...), one that left none is dimmed; the row says the ESS and whether
    the population was resampled. The last row: the final images, the returned one outlined."""
    events = [r for r in result.trace if r.particles is not None and r.images is not None]
    if not events:
        raise ConfigError("the trace holds no particle images: run FK steering with keep_images=True")
    final = result.trace[-1]
    n, batch = events[0].images.shape[:2]
    if not 0 <= prompt_index < batch:
        raise ConfigError(f"prompt_index {prompt_index} is outside the batch of {batch}")
    label_w, head_h, text_h, pad = 96, 22 if title else 4, 26, 4
    width = label_w + n * (cell + pad) + pad
    height = head_h + (len(events) + 1) * (cell + text_h + pad) + pad
    grid = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 4), title[:120], fill=(230, 230, 230))
    for r_i, rec in enumerate(events):
        ev = rec.particles
        y = head_h + r_i * (cell + text_h + pad)
        draw.text((pad, y + cell // 2 - 26), f"step {rec.i}", fill=(220, 220, 220))
        draw.text((pad, y + cell // 2 - 12), f"t={rec.t:.0f}", fill=(160, 160, 160))
        draw.text((pad, y + cell // 2 + 2), f"ESS {float(ev.ess[prompt_index]):.2f}", fill=(160, 160, 160))
        draw.text((pad, y + cell // 2 + 16), "resampled" if bool(ev.resampled[prompt_index]) else "kept",
                  fill=CHOSEN if bool(ev.resampled[prompt_index]) else (130, 130, 130))
        copies = [int((ev.ancestors[:, prompt_index] == j).sum()) for j in range(n)]
        for j in range(n):
            x = label_w + j * (cell + pad)
            tile = Image.fromarray(rec.images[j, prompt_index].permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            if copies[j] == 0:
                tile = Image.blend(tile, Image.new("RGB", tile.size, (24, 24, 28)), 0.6)
            grid.paste(tile, (x, y))
            if copies[j] > 0:
                draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=CHOSEN, width=2 + min(copies[j], 3))
            reward = float(ev.rewards[j, prompt_index])
            draw.text((x + 2, y + cell + 1), f"r {reward:.4g}" + (f" x{copies[j]}" if copies[j] > 1 else ""),
                      fill=CHOSEN if copies[j] else (150, 150, 150))
            draw.text((x + 2, y + cell + 13), f"w {float(ev.weights[j, prompt_index]):.2f}", fill=(170, 170, 170))
    y = head_h + len(events) * (cell + text_h + pad)
    draw.text((pad, y + cell // 2 - 6), "final", fill=(220, 220, 220))
    chosen = int(final.chosen[prompt_index])
    for j in range(n):
        x = label_w + j * (cell + pad)
        draw.text((x + 2, y + cell + 1), f"r {float(final.scores[j, prompt_index]):.4g}",
                  fill=CHOSEN if j == chosen else (200, 200, 200))
        if j == chosen:
            draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=CHOSEN, width=3)
        if final.images is not None:
            tile = Image.fromarray(final.images[j, prompt_index].permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (x, y))
    return grid


def render_grid(result: ResampleResult, prompt_index: int = 0, cell: int = 96, title: str | None = None) -> Image.Image:
    """The right picture of a run: particles for FK steering, candidate pools otherwise."""
    if any(r.particles is not None for r in result.trace):
        return render_particle_grid(result, prompt_index, cell, title)
    return render_trace_grid(result, prompt_index, cell, title)
