"""The Sample tab of the standalone app: the per-step resampler on a diffusers model folder.
(In the WebUI the same sampler is a choice in txt2img's sampler list instead.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..progress import ProgressEvent
from ..sampling import window_hi_after_policy_change
from .host import StandaloneHost
from .jobs import Job, progress_html
from .tab_score import load_scorer_for, scorer_inputs
from .widgets import display_image, g_update, gr, run_job_handler, status_box


@dataclass
class SampleSettings:
    prompt: str
    negative: str = ""
    steps: int = 20
    cfg: float = 5.0
    seed: int = 0
    size: int = 0  # 0 = the model's default
    schedule: str = "SPO DDIM"  # or "Karras"
    k: int = 4
    policy: str = "greedy"
    window_lo: float = 0.0
    window_hi: float = 751.0
    score_every: int = 1
    eta: float = 1.0
    potential: str = "max"  # fk
    lam: float = 10.0  # fk
    adaptive: bool = False  # fk


def run_sampling(backend, settings: SampleSettings, scorer, progress=None, cancel=None) -> dict[str, Any]:
    """Sample one image with the resampler; returns the image, the trace grid and a summary.

    The same call as `spo sample` (`backend.sample`): the same settings draw the same image here
    and on the command line."""
    from ..sampling import ResamplerConfig
    from ..sampling.trace import render_grid

    if not settings.prompt.strip():
        raise ConfigError("the prompt is empty: type what the image should show")
    size = int(settings.size) or None
    steps = int(settings.steps)
    flow = getattr(backend, "is_flow", False)  # a flow model samples on its pipeline's own schedule
    sigmas = None if settings.schedule.startswith("SPO") or flow else backend.schedule.karras_sigmas(steps)
    cfg = ResamplerConfig(k=int(settings.k), policy=settings.policy, eta=float(settings.eta),
                          window=(float(settings.window_lo), float(settings.window_hi)), score_every=int(settings.score_every),
                          keep_images=int(settings.k) > 1, potential=settings.potential, lam=float(settings.lam),
                          adaptive=bool(settings.adaptive))

    def callback(info):
        if progress is not None:
            progress(ProgressEvent("sample", info.i + 1, info.total, f"step {info.i + 1}/{info.total}"))

    out = backend.sample([settings.prompt], settings.negative or None, steps=steps, guidance_scale=float(settings.cfg),
                         eta=float(settings.eta), height=size, width=size, seed=int(settings.seed), sigmas=sigmas,
                         scorer=scorer, config=cfg, callback=callback, cancel=cancel)
    result = out.result
    image = display_image(_to_pil(out.images[0]))
    has_grid = cfg.keep_images and any(r.images is not None for r in result.trace)
    grid = render_grid(result, 0, title=settings.prompt[:60]) if has_grid else None
    if cfg.policy == "fk":
        events = result.particle_stats.events
        how = (f"FK steering, {cfg.k} particles ({cfg.potential}, lambda {cfg.lam:g}): {len(events)} weighting steps, "
               f"{sum(int(e.resampled.sum()) for e in events)} resamplings")
    else:
        how = f"{result.pooled_steps} with {cfg.k} candidates ({cfg.policy})"
    summary = (f"{result.steps} steps, {how}; {result.evaluations} denoiser evaluations "
               f"({result.evaluations_per_step:.2f} per step), {result.decodes} decodes, {result.scorer_rows} scorer rows")
    return {"image": image, "grid": grid, "summary": summary, "pixels": out.images[0]}


def _to_pil(image: torch.Tensor):
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def build_sample_tab(host: StandaloneHost) -> None:
    g = gr()
    with g.Tab("Sample", elem_id="spo_sample"):
        g.Markdown("Per-step resampling: at each step inside the window, k candidates are drawn from the same x_t, "
                   "scored (step-aware scorers see their timestep) and one is kept.")
        model = g.Textbox(label="diffusers model folder (or SD1.5/SDXL .safetensors)", value=host.model_path or "")
        prompt = g.Textbox(label="prompt", lines=2)
        negative = g.Textbox(label="negative prompt", lines=1)
        with g.Row():
            steps = g.Slider(minimum=1, maximum=100, step=1, value=20, label="steps")
            cfg = g.Slider(minimum=1.0, maximum=20.0, step=0.5, value=5.0, label="CFG scale")
            seed = g.Number(value=0, precision=0, label="seed")
            size = g.Number(value=0, precision=0, label="size (0 = model default)")
        with g.Row():
            schedule = g.Radio(["SPO DDIM", "Karras"], value="SPO DDIM", label="schedule")
            k = g.Slider(minimum=1, maximum=16, step=1, value=4, label="k candidates (fk: particles)")
            policy = g.Radio(["greedy", "softmax", "random", "fk"], value="greedy", label="policy (fk: Feynman-Kac particles)")
        with g.Row():
            lo = g.Number(value=0, label="window: lowest timestep")
            hi = g.Number(value=751, label="window: highest timestep")
            every = g.Number(value=1, precision=0, label="pool every n-th step")
            eta = g.Slider(minimum=0.0, maximum=1.0, step=0.05, value=1.0, label="eta")
        # fk pools over the whole trajectory by default: the window's top follows the policy unless typed over
        policy.input(fn=lambda p, h: window_hi_after_policy_change(p, float(h or 0)), inputs=[policy, hi], outputs=[hi])
        with g.Row():
            potential = g.Radio(["max", "diff", "add", "rt"], value="max", label="fk: potential")
            lam = g.Number(value=10.0, label="fk: lambda (> 0)")
            adaptive = g.Checkbox(value=False, label="fk: resample only when ESS < k/2")
        name, weights = scorer_inputs(host)
        with g.Row():
            btn = g.Button("Generate", variant="primary")
            stop = g.Button("Stop")
        status = status_box()
        with g.Row():
            image = g.Image(type="pil", label="image", interactive=False)
            grid = g.Image(type="pil", label="candidates per pooled step (kept one outlined)", interactive=False)
        summary = g.Textbox(label="summary", interactive=False)

        def generate(model_, prompt_, negative_, steps_, cfg_, seed_, size_, schedule_, k_, policy_, lo_, hi_, every_,
                     eta_, potential_, lam_, adaptive_, name_, weights_):
            settings = SampleSettings(prompt_ or "", negative_ or "", int(steps_), float(cfg_), int(seed_ or 0),
                                      int(size_ or 0), schedule_, int(k_), policy_, float(lo_ or 0), float(hi_ or 0),
                                      int(every_ or 1), float(eta_), potential_, float(lam_ if lam_ is not None else 10.0),
                                      bool(adaptive_))

            def prepare():
                if not settings.prompt.strip():
                    raise ConfigError("the prompt is empty: type what the image should show")

                def work(job: Job):
                    job.progress(ProgressEvent("load", 0, settings.steps, "loading the model"))
                    backend = host.backend(model_)
                    scorer = load_scorer_for(host, name_, weights_) if settings.k > 1 else None
                    return run_sampling(backend, settings, scorer, job.progress, job.cancelled)
                return work

            def render(state):
                if state.status != "done":
                    return progress_html(state), g_update(), g_update(), g_update()
                r = state.result
                return progress_html(state), r["image"], r["grid"], r["summary"]

            yield from run_job_handler(host, "sample", "Generate", prepare, render, 4)

        btn.click(generate, inputs=[model, prompt, negative, steps, cfg, seed, size, schedule, k, policy, lo, hi, every,
                                    eta, potential, lam, adaptive, name, weights], outputs=[status, image, grid, summary],
                  api_name="sample")
        stop.click(lambda: _stop("sample"), inputs=None, outputs=[status])


def _stop(key: str) -> str:
    from .widgets import ACTIVE

    return ACTIVE.stop(key)
