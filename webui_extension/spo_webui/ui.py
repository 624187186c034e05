"""What the extension adds to the WebUI's pages: the SPO tab, Settings > SPO, and the controls
of the always-visible SPO sampler script."""

from __future__ import annotations

import logging
from typing import Any

from .options import ARG_NAMES, INFOTEXT, POLICIES, POTENTIALS, SPOOptions, defaults_from_settings, parse_window

log = logging.getLogger(__name__)

TAB_TITLE = "SPO"
TAB_ID = "spo"
SETTINGS_SECTION = ("spo", "SPO")


def build_tab() -> list[tuple[Any, str, str]]:
    """`on_ui_tabs` callback: the shared Blocks on a WebUIHost."""
    from spo_core.ui import build_blocks

    from .host import WebUIHost

    return [(build_blocks(WebUIHost()), TAB_TITLE, TAB_ID)]


def add_settings() -> None:
    """`on_ui_settings` callback: Settings > SPO."""
    import gradio as gr
    from modules import shared

    from spo_core.ui.actions import scorer_names

    section = SETTINGS_SECTION
    options = {
        "spo_scorer_dir": shared.OptionInfo("", "Folder of scorer weights (empty: models/SPO)", section=section),
        "spo_default_scorer": shared.OptionInfo("spm", "SPO sampler: default scorer", gr.Dropdown,
                                                {"choices": scorer_names()}, section=section),
        "spo_default_scorer_weights": shared.OptionInfo(
            "", "SPO sampler: default scorer weights (a file or folder name in the scorer folder)", section=section),
        "spo_default_k": shared.OptionInfo(4, "SPO sampler: default k (candidates per step)", gr.Slider,
                                           {"minimum": 1, "maximum": 16, "step": 1}, section=section),
        "spo_default_policy": shared.OptionInfo("greedy", "SPO sampler: default policy", gr.Radio,
                                                {"choices": POLICIES}, section=section),
        "spo_default_window_hi": shared.OptionInfo(751, "SPO sampler: default highest timestep of the window",
                                                   gr.Slider, {"minimum": 0, "maximum": 999, "step": 1}, section=section),
    }
    for key, info in options.items():
        shared.opts.add_option(key, info)


def sampler_controls(defaults: SPOOptions, weight_choices: list[str]) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """The accordion of the SPO sampler script: components in ARG_NAMES order, and infotext fields."""
    import gradio as gr

    from spo_core.sampling import FK_WINDOW, SPO_WINDOW, window_hi_after_policy_change
    from spo_core.ui.actions import scorer_names

    names = scorer_names()
    weights_value = defaults.weights or "None"
    choices = ["None"] + [w for w in weight_choices if w != "None"]
    if weights_value not in choices:
        choices.append(weights_value)
    with gr.Accordion("SPO sampler (k candidates per step)", open=False):
        gr.Markdown("Used when the sampler is **SPO Euler a (k candidates)**: at each step inside the timestep window, "
                    "k candidates are drawn from the same latent and scored; the policy keeps one (greedy: the best, "
                    "softmax: a draw weighted by score, random: any, scores recorded). **fk**: Feynman-Kac steering, "
                    "k particles per image sampled together and resampled by their rewards at every n-th step in the "
                    "window (and at the last), the best final particle kept.")
        with gr.Row():
            k = gr.Slider(minimum=1, maximum=16, step=1, value=defaults.k, label="k candidates")
            policy = gr.Radio(POLICIES, value=defaults.policy, label="policy")
            every = gr.Number(value=defaults.score_every, precision=0, label="pool every n-th step")
        with gr.Row():
            lo = gr.Number(value=defaults.window_lo, label="window: lowest timestep (0-999)")
            hi = gr.Number(value=defaults.window_hi, label="window: highest timestep (0-999)")
        with gr.Row():
            scorer = gr.Dropdown(names, value=defaults.scorer if defaults.scorer in names else names[0], label="scorer")
            weights = gr.Dropdown(choices, value=weights_value, label="scorer weights (models/SPO)")
        with gr.Row():
            potential = gr.Radio(POTENTIALS, value=defaults.potential, label="fk: potential")
            lam = gr.Number(value=defaults.lam, label="fk: lambda (> 0)")
            adaptive = gr.Checkbox(value=defaults.adaptive, label="fk: resample only when ESS < k/2")
    # picking fk (or leaving it) moves the window's top between the two policies' defaults, unless the user typed
    # another value; `input` fires on the user's clicks only, so a pasted infotext keeps its own window
    chain_hi = defaults.window_hi if defaults.window_hi != FK_WINDOW[1] else SPO_WINDOW[1]
    policy.input(fn=lambda p, h: window_hi_after_policy_change(p, float(h or 0), chain_hi), inputs=[policy, hi], outputs=[hi])
    components = {"k": k, "policy": policy, "window_lo": lo, "window_hi": hi, "scorer": scorer, "weights": weights,
                  "score_every": every, "potential": potential, "lam": lam, "adaptive": adaptive}
    infotext_fields = [
        (k, INFOTEXT["k"]),
        (policy, INFOTEXT["policy"]),
        (lo, lambda d: parse_window(d[INFOTEXT["window"]])[0] if INFOTEXT["window"] in d else gr.update()),
        (hi, lambda d: parse_window(d[INFOTEXT["window"]])[1] if INFOTEXT["window"] in d else gr.update()),
        (scorer, INFOTEXT["scorer"]),
        (every, lambda d: int(d.get(INFOTEXT["score_every"], 1))),
        (potential, lambda d: d.get(INFOTEXT["potential"], "max")),
        (lam, lambda d: float(d.get(INFOTEXT["lam"], 10.0))),
        (adaptive, lambda d: str(d.get(INFOTEXT["adaptive"], "False")).lower() == "true"),
    ]
    return [components[n] for n in ARG_NAMES], infotext_fields


def script_defaults() -> tuple[SPOOptions, list[str]]:
    from spo_core.ui.host import SCORER

    from .host import WebUIHost

    defaults = defaults_from_settings()
    try:
        choices = WebUIHost().choices(SCORER)
    except Exception as exc:  # noqa: BLE001 - an unreadable folder must not break txt2img
        log.warning("cannot list the scorer folder: %s", exc)
        choices = []
    return defaults, choices
