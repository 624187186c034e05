"""The Score tab: image files + a prompt -> scores with any scorer (also at a timestep, for
SPO's step-aware preference model)."""

from __future__ import annotations

import html
from pathlib import Path

from . import actions
from .host import SCORER, UIHost
from .jobs import Job, progress_html
from .widgets import file_picker, g_update, gr, run_job_handler, status_box


def scorer_inputs(host: UIHost, default: str = "jpeg_compressibility"):
    """Scorer dropdown, its weights, and a line saying what it needs."""
    g = gr()
    names = actions.scorer_names()
    name = g.Dropdown(names, value=default if default in names else names[0], label="scorer")
    weights = file_picker(host, SCORER, "scorer weights (file or folder; not needed for jpeg_*)",
                          placeholder="e.g. /models/sd-v1-5_step-aware_preference_model.safetensors, or world (the embedded world's SPM)")
    hint = g.Markdown(actions.scorer_hint(name.value if hasattr(name, "value") else default))
    name.change(fn=lambda n: g.update(value=actions.scorer_hint(n)), inputs=[name], outputs=[hint])
    return name, weights


def load_scorer_for(host: UIHost, name: str, weights: str | None, extra_clip: str | None = None):
    """The scorer a tab asked for; `world` (or no weights, with the world as the model) is the
    embedded world's SPM or latent reward model."""
    path = None
    from ..model_names import is_any_world, is_world
    from ..scorers import SCORERS

    info = SCORERS.get(name)
    if name in ("spm", "lrm") and (is_world(weights) or (not (weights or "").strip() and is_any_world(getattr(host, "model_path", None)))):
        path = "world"
    elif info is not None and info.needs_weights:
        path = str(host.resolve_input(SCORER, weights, f"weights for the {name} scorer"))
    options = {"clip": extra_clip} if extra_clip else {}
    return actions.SCORERS.get(name, path, device=host.device, dtype=host.dtype, **options)


def build_score_tab(host: UIHost) -> None:
    g = gr()
    with g.Tab("Score", elem_id="spo_score"):
        g.Markdown("Score images with a preference model. Step-aware scorers (spm) also score predicted-x0 images at a "
                   "DDPM timestep (0 = final image).")
        images = g.File(label="images", file_count="multiple", file_types=["image"], elem_id="spo_score_images")
        prompt = g.Textbox(label="prompt (for prompt-aware scorers)", lines=2, elem_id="spo_score_prompt")
        name, weights = scorer_inputs(host)
        timestep = g.Number(value=0, precision=0, label="timestep (step-aware scorers)")
        btn = g.Button("Score", variant="primary", elem_id="spo_score_btn")
        status = status_box(elem_id="spo_score_status")
        table = g.HTML(label="scores", elem_id="spo_score_table")
        gallery = g.Gallery(label="ranked", columns=4)

        def score(files, prompt_, name_, weights_, t):
            def prepare():
                paths = actions.image_paths(files)
                if not paths:
                    from ..errors import ConfigError

                    raise ConfigError("no images: add one or more image files")

                def work(job: Job):
                    job.progress(_event("load scorer", 0, 2))
                    scorer = load_scorer_for(host, name_, weights_)
                    job.progress(_event("score", 1, 2))
                    return actions.score_files(paths, prompt_, scorer, int(t or 0))
                return work

            def render(state):
                if state.status != "done":
                    return progress_html(state), g_update(), g_update()
                rows = state.result
                return progress_html(state), _table(rows, name_), [(p, f"{s:.4f}") for p, s in rows]

            yield from run_job_handler(host, "score", "Score", prepare, render, 3)

        btn.click(score, inputs=[images, prompt, name, weights, timestep], outputs=[status, table, gallery],
                  api_name="score")


def _event(stage: str, step: int, total: int):
    from ..progress import ProgressEvent

    return ProgressEvent(stage=stage, step=step, total=total, message=stage)


def _table(rows: list[tuple[str, float]], scorer: str) -> str:
    body = "".join(f"<tr><td>{i}</td><td>{html.escape(Path(p).name)}</td><td class='spo-score'>{s:.4f}</td></tr>"
                   for i, (p, s) in enumerate(rows, 1))
    return (f"<table class='spo-scores'><thead><tr><th>rank</th><th>image</th><th>{html.escape(scorer)}</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")
