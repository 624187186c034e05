"""The Train tab: SPO (or DDPO, Diffusion-DPO, NCP-DPO) LoRA training on the host's model, with
live progress, loss/reward curves, validation previews, Stop (saves what it has) and resume.

The run's working files (checkpoints, log, curves, validation grids) go to the host's training
folder; the finished (or stopped) LoRA is then copied atomically to the host's LoRA folder,
where the WebUI finds it as `<lora:name:1>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Cancelled, ConfigError, OutputExistsError
from ..progress import ProgressEvent
from ..training.config import SAMPLING_METHODS
from .host import LORA, UIHost, clean_output_name
from .jobs import Job, JobState, progress_html
from .tab_score import load_scorer_for, scorer_inputs
from .widgets import display_image, g_update, gr, run_job_handler, status_box

METHODS = ["spo", "lpo", "ddpo", "grpo", "diffusion_dpo", "ncp_dpo"]
PRESET_CHOICES = ["auto", "spo-sd15", "spo-sdxl", "lpo-sd15", "lpo-sdxl", "ddpo", "diffusion-dpo", "ncp-dpo", "spo-sd3",
                  "spo-flux", "grpo-sd3", "grpo-flux"]
SHOWN_CURVES = {"spo": [["loss"], ["score_margin"], ["implicit_acc"]], "lpo": [["loss"], ["score_margin"], ["implicit_acc"]],
                "ddpo": [["loss"], ["reward"]],
                "diffusion_dpo": [["loss"], ["implicit_acc"]], "ncp_dpo": [["loss"], ["implicit_acc"]]}


@dataclass
class TrainForm:
    """The tab's inputs, as plain values (the handler builds it; tests build it directly)."""

    method: str = "spo"
    preset: str = "auto"
    prompts_text: str = ""
    prompts_file: str | None = None
    pairs: str = ""
    scorer: str = "spm"
    scorer_weights: str | None = None
    max_steps: int = 100
    learning_rate: float = 0.0  # 0: the preset's
    rank: int = 0  # 0: the preset's
    k: int = 0  # 0: the preset's
    sample_batch_size: int = 0
    train_batch_size: int = 0
    size: int = 0  # 0: the model's
    steps: int = 20
    threshold: float = -1.0  # SPO's pair threshold; < 0: the preset's
    beta: float = 0.0  # 0: the preset's
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    checkpoint_every: int = 50
    validate_every: int = 0
    output_name: str = "spo_lora"
    resume: bool = False
    overwrite: bool = False
    seed: int = 42
    model: str = ""  # standalone: the diffusers model folder
    extra: dict[str, Any] = field(default_factory=dict)

    def prompt_list(self) -> list[str]:
        return [line.strip() for line in (self.prompts_text or "").splitlines() if line.strip()]


def build_config(form: TrainForm, arch: str | None, output_dir: Path, host_dtype_is_half: bool = False,
                 world: bool = False, flow: bool = False):
    """A TrainConfig from the form: preset first (auto: by the model: the world's own settings on
    the embedded world, SPO's SD1.5 or SDXL config otherwise), then the fields the user set
    (zeros, or a negative threshold, keep the preset's value)."""
    from ..training import TrainConfig
    from ..training.config import apply_preset, auto_preset

    method = form.method
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    preset = form.preset
    if preset == "auto":
        preset = auto_preset(method, arch, world=world, flow=flow)
        if preset is None:
            raise ConfigError(f"{method} has no settings for this model ({arch}); on rectified-flow models use spo, ddpo "
                              "or grpo")
    cfg = apply_preset(TrainConfig(), preset) if preset not in ("", "none") else TrainConfig()
    cfg.method = method
    cfg.output_dir = str(output_dir)
    cfg.output_name = clean_output_name(form.output_name)
    cfg.max_steps = int(form.max_steps)
    cfg.seed = int(form.seed)
    cfg.steps = int(form.steps) or cfg.steps
    cfg.overwrite = bool(form.overwrite)
    cfg.resume = "auto" if form.resume else None
    cfg.checkpoint_every = int(form.checkpoint_every)
    cfg.validate_every = int(form.validate_every)
    cfg.gradient_checkpointing = bool(form.gradient_checkpointing)
    if form.mixed_precision == "auto":
        cfg.mixed_precision = "fp16" if host_dtype_is_half else "no"
    else:
        cfg.mixed_precision = form.mixed_precision
    if form.learning_rate:
        cfg.learning_rate = float(form.learning_rate)
    for name in ("rank", "k", "sample_batch_size", "train_batch_size"):
        if getattr(form, name):
            setattr(cfg, name, int(getattr(form, name)))
    if form.rank:
        cfg.alpha = float(form.rank)
    if form.threshold is not None and form.threshold >= 0:  # typed by the user: used as it is
        cfg.threshold = float(form.threshold)
        cfg.auto_threshold = False
    if form.beta:
        cfg.beta = float(form.beta)
    if form.size:
        cfg.height = cfg.width = int(form.size)
    if method in SAMPLING_METHODS:
        prompts = form.prompt_list()
        if form.prompts_file:
            cfg.prompts = str(form.prompts_file)
        elif prompts:
            cfg.prompt_list = prompts
        else:
            raise ConfigError("the prompt list is empty: type prompts (one per line) or upload a prompt file")
        if form.scorer != cfg.scorer:  # the preset's weights belong to its own scorer
            cfg.scorer_weights = None
        cfg.scorer = form.scorer
        cfg.scorer_weights = form.scorer_weights or cfg.scorer_weights
    else:
        if not (form.pairs or "").strip():
            raise ConfigError(f"{method} trains on preference pairs: give the folder or JSONL/CSV file of pairs")
        cfg.pairs = form.pairs.strip()
    for k, v in form.extra.items():
        setattr(cfg, k, v)
    return cfg.resolved()


def run_training(host: UIHost, form: TrainForm, job: Job | None = None) -> dict[str, Any]:
    """Train on the host's model, then publish the LoRA into the host's LoRA folder.

    Stop (job.stop / the host's Interrupt) ends the run after the current step; the trainer then
    saves a checkpoint and the LoRA, which is published like a finished one."""
    from ..safe_io import atomic_output
    from ..training import train

    progress = job.progress if job else None
    cancel = job.cancelled if job else None
    if progress:
        progress(ProgressEvent("setup", 0, form.max_steps, "preparing the model"))
    thost = host.training_host(model=form.model)
    import torch

    from ..model_names import is_any_world, is_flow_world

    model = form.model or getattr(host, "model_path", None)
    cfg = build_config(form, thost.arch, host.training_dir(form.output_name),
                       host_dtype_is_half=thost.dtype == torch.float16 and thost.device.type == "cuda",
                       world=is_any_world(model), flow=is_flow_world(model))
    final = host.output_path(LORA, cfg.output_name)
    if final.exists() and not (cfg.overwrite or form.resume):
        raise OutputExistsError(f"{final} exists: choose another output name, tick overwrite, or tick resume")
    scorer = None
    if cfg.method in SAMPLING_METHODS:
        if progress:
            progress(ProgressEvent("setup", 0, cfg.max_steps, f"loading the {cfg.scorer} scorer"))
        scorer = load_scorer_for(host, cfg.scorer, cfg.scorer_weights)
    stopped = None
    try:
        result = train(cfg, thost, scorer, progress=progress, cancel=cancel)
        trained, steps, history = result.lora_path, result.steps, result.history
        curves, previews = result.curves_path, result.validation_paths
    except Cancelled as exc:
        stopped = str(exc)
        trained = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"
        if not exc.steps or not trained.exists():  # nothing trained: publish nothing (no all-zero LoRA)
            raise Cancelled(f"nothing was trained yet, so nothing was saved or published to {final.parent}") from exc
        steps, history, curves, previews = exc.steps, None, None, []
    finally:
        release = getattr(thost, "release", None)
        if release is not None:
            release()
    with atomic_output(final, overwrite=True) as tmp:
        tmp.write_bytes(trained.read_bytes())
    note = host.after_write(LORA, final)
    return {"lora": str(final), "work_dir": cfg.output_dir, "steps": steps, "stopped": stopped, "note": note,
            "curves": str(curves) if curves else None, "previews": [str(p) for p in previews], "history": history}


def render_train(state: JobState, method: str):
    """The tab's outputs for a job state. While it runs, untouched outputs are left as they are;
    the last state gives plain values (None for nothing), which every gradio client can read
    (gradio_client 0.5, A1111's, cannot read `gr.update()` dicts in a final output)."""
    from ..plots import curves_from_records

    status = progress_html(state)
    keep = None if state.done else g_update()
    plot = keep
    if state.history:
        panels = [p for p in SHOWN_CURVES.get(method, [["loss"]]) if any(p[0] in h for h in state.history)]
        if panels:
            plot = curves_from_records(state.history, panels, title_prefix=f"{method}: ")
    preview = display_image(state.preview) if state.preview is not None else keep
    result = "" if state.done else keep
    if state.status in ("done", "stopped") and state.result:
        r = state.result
        lines = [f"LoRA: {r['lora']}", f"working files (checkpoints, log, curves): {r['work_dir']}"]
        if r["stopped"]:
            lines.insert(0, f"stopped: {r['stopped']}")
        elif r["steps"] is not None:
            lines.insert(0, f"trained {r['steps']} steps")
        if r["note"]:
            lines.append(r["note"])
        result = "\n".join(lines)
    return status, plot, preview, result


def build_train_tab(host: UIHost) -> None:
    g = gr()
    with g.Tab("Train", elem_id="spo_train"):
        g.Markdown("Train a LoRA with SPO (step-aware preference pairs sampled from your model and scored at each step), "
                   "DDPO (rewards of whole samples), or Diffusion-DPO / NCP-DPO (a folder of preference pairs). "
                   + ("It trains on the checkpoint the WebUI has loaded; the LoRA appears in the LoRA list."
                      if not host.free_paths else "It trains on the diffusers model below."))
        model = g.Textbox(label="diffusers model folder (or SD1.5/SDXL .safetensors)",
                          value=getattr(host, "model_path", None) or "", visible=host.free_paths)
        with g.Row():
            method = g.Radio(METHODS, value="spo", label="method")
            preset = g.Dropdown(PRESET_CHOICES, value="auto",
                                label="preset (auto: by the model: SD1.5, SDXL or the embedded world)")
        prompts = g.Textbox(label="prompts (one per line)", lines=5, placeholder="a photo of a cat\na watercolor of a lighthouse")
        prompt_file = g.File(label="or a prompt file (.txt one per line, .json, .jsonl)", file_count="single")
        pairs = g.Textbox(label="preference pairs (Diffusion-DPO / NCP-DPO): a folder, or a JSONL/CSV file", lines=1)
        scorer, weights = scorer_inputs(host, default="spm")
        with g.Row():
            max_steps = g.Number(value=100, precision=0, label="training steps")
            lr = g.Number(value=0, label="learning rate (0 = preset)")
            rank = g.Number(value=0, precision=0, label="LoRA rank (0 = preset)")
            k = g.Number(value=0, precision=0, label="SPO k (0 = preset)")
        with g.Accordion("more settings", open=False):
            with g.Row():
                sample_bs = g.Number(value=0, precision=0, label="sampling batch (0 = preset)")
                train_bs = g.Number(value=0, precision=0, label="training batch (0 = preset)")
                size = g.Number(value=0, precision=0, label="image size (0 = model's)")
                steps = g.Number(value=20, precision=0, label="sampling steps")
            with g.Row():
                threshold = g.Number(value=-1, label="SPO pair threshold (-1 = preset's; calibrated from the first round "
                                                    "for JPEG / aesthetic scorers)")
                beta = g.Number(value=0, label="beta (0 = preset: SPO 10, DPO 2500)")
            with g.Row():
                gc = g.Checkbox(label="gradient checkpointing (less memory)", value=False)
                mp = g.Radio(["auto", "no", "fp16", "bf16"], value="auto", label="mixed precision")
                ckpt_every = g.Number(value=50, precision=0, label="checkpoint every N steps")
                val_every = g.Number(value=0, precision=0, label="preview every N steps (0: at the end)")
                seed = g.Number(value=42, precision=0, label="seed")
        with g.Row():
            name = g.Textbox(label="output name (LoRA file name)", value="spo_lora")
            resume = g.Checkbox(label="resume the last run of this name", value=False)
            overwrite = g.Checkbox(label="overwrite", value=False)
        with g.Row():
            btn = g.Button("Train", variant="primary", elem_id="spo_train_btn")
            stop = g.Button("Stop (saves what it has)", elem_id="spo_train_stop")
        status = status_box()
        with g.Row():
            plot = g.Image(type="pil", label="loss / reward", interactive=False)
            preview = g.Image(type="pil", label="preview: base vs LoRA", interactive=False)
        result = g.Textbox(label="result", lines=4, interactive=False)

        def train_clicked(model_, method_, preset_, prompts_, prompt_file_, pairs_, scorer_, weights_, max_steps_, lr_,
                          rank_, k_, sample_bs_, train_bs_, size_, steps_, threshold_, beta_, gc_, mp_, ckpt_every_,
                          val_every_, seed_, name_, resume_, overwrite_):
            from .actions import image_paths

            def prepare():
                files = image_paths(prompt_file_)
                form = TrainForm(method=method_, preset=preset_, prompts_text=prompts_ or "",
                                 prompts_file=files[0] if files else None, pairs=pairs_ or "", scorer=scorer_,
                                 max_steps=int(max_steps_ or 0), learning_rate=float(lr_ or 0), rank=int(rank_ or 0),
                                 k=int(k_ or 0), sample_batch_size=int(sample_bs_ or 0), train_batch_size=int(train_bs_ or 0),
                                 size=int(size_ or 0), steps=int(steps_ or 20),
                                 threshold=-1.0 if threshold_ is None else float(threshold_), beta=float(beta_ or 0),
                                 gradient_checkpointing=bool(gc_),
                                 mixed_precision=mp_, checkpoint_every=int(ckpt_every_ or 0),
                                 validate_every=int(val_every_ or 0), output_name=name_, resume=bool(resume_),
                                 overwrite=bool(overwrite_), seed=int(seed_ or 0), model=model_ or "")
                clean_output_name(form.output_name)
                if form.max_steps < 1:
                    raise ConfigError("training steps must be at least 1")
                if form.method in SAMPLING_METHODS:
                    if not form.prompt_list() and not form.prompts_file:
                        raise ConfigError("the prompt list is empty: type prompts (one per line) or upload a prompt file")
                    from ..scorers import SCORERS

                    from ..model_names import is_any_world

                    info = SCORERS.get(form.scorer)
                    if is_any_world(form.model or getattr(host, "model_path", None)) and form.scorer in ("spm", "lrm") \
                            and not weights_:
                        form.scorer_weights = "world"  # the world's own step-aware preference / latent reward model
                    elif info is not None and info.needs_weights:
                        form.scorer_weights = str(host.resolve_input("scorer", weights_, f"weights for the {form.scorer} scorer"))
                return lambda job: run_training(host, form, job)

            yield from run_job_handler(host, "train", "Training", prepare, lambda s: render_train(s, method_), 4,
                                       interval=1.0, main_stage="training", total=int(max_steps_ or 0))

        btn.click(train_clicked, inputs=[model, method, preset, prompts, prompt_file, pairs, scorer, weights, max_steps, lr,
                                         rank, k, sample_bs, train_bs, size, steps, threshold, beta, gc, mp, ckpt_every,
                                         val_every, seed, name, resume, overwrite],
                  outputs=[status, plot, preview, result], api_name="train")
        stop.click(lambda: _stop("train"), inputs=None, outputs=[status])


def _stop(key: str) -> str:
    from .widgets import ACTIVE

    return ACTIVE.stop(key)

