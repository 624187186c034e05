"""Training nodes: Train SPO LoRA (SPO / LPO / DDPO / GRPO on prompts; SD3/SD3.5 and Flux MODELs too) and
Train LoRA on Preference Pairs (Diffusion-DPO / NCP-DPO), both on the MODEL the user loaded, through
spo_core's trainer."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from spo_core.errors import Cancelled, ConfigError, OutputExistsError
from spo_core.safe_io import atomic_output
from spo_core.training import PRESETS, TrainConfig, apply_preset, train
from spo_core.training.config import auto_preset
from spo_core.training.data import LatentPairs, load_prompts

from .comfy_training import ComfyTrainingHost, training_arch
from .host import images_to_bchw, interrupted_error, lora_output_path, model_arch, pil_to_image, text_ui
from .lora_bridge import apply_lora
from .scorer_nodes import SCORER_TYPE
from .spec import In, NodeSpec, Out, Result

log = logging.getLogger(__name__)

RUNS_FOLDER = "spo_training"
PROMPT_PRESETS = ["auto", "spo-sd15", "spo-sdxl", "lpo-sd15", "lpo-sdxl", "ddpo", "spo-sd3", "spo-flux", "grpo-sd3",
                  "grpo-flux"]
PAIR_PRESETS = ["auto", "diffusion-dpo", "ncp-dpo"]


class TrainingProgress:
    """ComfyUI's progress bar for a training run (step / max_steps, validation grids as previews),
    and a bar on the server console like the stock KSampler's.

    The UI bar counts in hundredths of a step, so a sampling round (the first one comes before
    any step) moves it within the step it serves. Cancel in the UI raises ComfyUI's interrupt
    inside the bar's hook; here it is caught and turned into the trainer's cancel check, so the
    trainer stops at a safe point and saves a checkpoint and the partial LoRA before the node
    reports the interrupt.
    """

    SUB = 100  # bar units per training step

    def __init__(self, total: int, node_id: str | None):
        import comfy.utils

        from spo_core.progress import TqdmProgress

        self.total = max(int(total), 1)
        self.bar = comfy.utils.ProgressBar(self.total * self.SUB, node_id=node_id)
        self.console = TqdmProgress()
        self.step = 0
        self.interrupted = False

    def __call__(self, event) -> None:
        import comfy.model_management

        within = 0
        if event.stage == "training":
            self.step = event.step
            self.console(event)
        elif event.stage == "sampling" and event.total:
            within = min(self.SUB - 1, self.SUB * event.step // event.total)
        preview = ("JPEG", event.preview, 512) if event.preview is not None else None
        try:
            self.bar.update_absolute(min(self.step * self.SUB + within, self.total * self.SUB), self.total * self.SUB, preview)
            comfy.model_management.throw_exception_if_processing_interrupted()
        except comfy.model_management.InterruptProcessingException:
            self.interrupted = True

    def close(self) -> None:
        self.console.close()

    def cancelled(self) -> bool:
        import comfy.model_management

        if comfy.model_management.processing_interrupted():
            self.interrupted = True
        return self.interrupted


def _prompt_list(prompts: str, prompt_file: str) -> list[str]:
    if prompt_file and prompt_file.strip():
        path = Path(prompt_file.strip()).expanduser()
        if not path.is_absolute():
            import folder_paths

            path = Path(folder_paths.get_input_directory()) / path
        return load_prompts(path)
    items = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
    if not items:
        raise ConfigError("the prompt list is empty: type the training prompts (one per line) or give a prompt file")
    return items


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _config(preset_name: str, overrides: dict) -> TrainConfig:
    cfg = apply_preset(TrainConfig(), preset_name)
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _publish_path(output_name: str, resume: bool, overwrite: bool) -> Path:
    """output/loras/<name>.safetensors, refused up front if it exists and may not be replaced."""
    path = lora_output_path(output_name, overwrite=True)
    if path.exists() and not (resume or overwrite):
        raise OutputExistsError(f"{path} exists: choose another output_name, turn on resume to continue that run, "
                                "or turn on overwrite")
    return path


def _publish(src: Path, dst: Path) -> Path:
    """Copy the trainer's LoRA into output/loras atomically (no half-written file is ever listed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dst, overwrite=True) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def _curves_image(result) -> torch.Tensor:
    from PIL import Image

    if result.curves_path is not None and Path(result.curves_path).is_file():
        with Image.open(result.curves_path) as img:
            return pil_to_image(img)
    return torch.zeros(1, 64, 64, 3)


def _run(cfg: TrainConfig, model, clip, vae, scorer, node_id, publish_to: Path, prompts=None, pairs=None,
         model_name: str | None = None) -> Result:
    import comfy.model_management

    host = ComfyTrainingHost(model, clip, vae, model_name=model_name)
    progress = TrainingProgress(cfg.max_steps, node_id)
    try:
        with torch.inference_mode(False):
            if callable(pairs):
                pairs = pairs(host)
            result = train(cfg, host, scorer, prompts=prompts, pairs=pairs, progress=progress, cancel=progress.cancelled)
    except Cancelled as exc:
        main = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"
        if main.is_file():
            _publish(main, publish_to)
            log.warning("training cancelled; the partial LoRA is %s (resume continues the run)", publish_to)
        raise interrupted_error()(f"{exc}; partial LoRA: {publish_to}") from exc
    finally:
        progress.close()
        host.release()
        comfy.model_management.soft_empty_cache()
    path = _publish(result.lora_path, publish_to)
    if getattr(host, "transformer", False):  # SD3 / Flux: the written kohya file through ComfyUI's own LoRA loader, as a user loads it
        import comfy.sd
        import comfy.utils

        new_model, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path)), 1.0, 0.0)
    else:
        new_model, _, _ = apply_lora(model, None, result.lora, 1.0, 0.0, source=str(path))
    last = {k: round(v, 5) for k, v in result.metrics.items() if isinstance(v, float)}
    text = (f"{cfg.method} LoRA trained for {result.steps} steps on a {host.arch} model: {path}\n"
            f"run folder (checkpoints, log, curves): {result.output_dir}\nlast step: {last}")
    return Result((new_model, str(path), _curves_image(result), text), text_ui(text))


def _common_overrides(output_name: str, resume: bool, overwrite: bool, seed: int, train_steps: int,
                      learning_rate: float, rank: int, width: int, height: int, mixed_precision: str,
                      gradient_checkpointing: bool, checkpoint_every: int, preview_every: int) -> dict:
    import folder_paths

    clean = lora_output_path(output_name, overwrite=True).stem
    return dict(
        output_dir=str(Path(folder_paths.get_output_directory()) / RUNS_FOLDER / clean), output_name=clean,
        resume="auto" if resume else None, overwrite=bool(overwrite) and not resume, seed=int(seed),
        max_steps=int(train_steps), learning_rate=float(learning_rate) if learning_rate > 0 else None,
        rank=int(rank) if rank > 0 else None, alpha=float(rank) if rank > 0 else None,
        width=int(width) if width > 0 else None, height=int(height) if height > 0 else None,
        mixed_precision=_mixed_precision(mixed_precision), gradient_checkpointing=bool(gradient_checkpointing),
        checkpoint_every=int(checkpoint_every), validate_every=int(preview_every),
    )


def _common_inputs() -> list[In]:
    return [
        In("train_steps", "INT", "Optimizer steps to train.", default=100, min=1, max=1_000_000, step=1),
        In("learning_rate", "FLOAT", "0 = the preset's (SPO: SD1.5 6e-5, SDXL 1e-5; Diffusion-DPO 1e-5; NCP-DPO 5e-6).", default=0.0, min=0.0, max=1.0,
           step=1e-6, round=1e-8),
        In("rank", "INT", "LoRA rank (alpha = rank); 0 = the preset's (SPO: SD1.5 4, SDXL 64; Diffusion-DPO 8; NCP-DPO 64).", default=0, min=0, max=512, step=1),
        In("width", "INT", "Training image width; 0 = the model's (512 / 1024).", default=0, min=0, max=4096, step=8),
        In("height", "INT", "Training image height; 0 = the model's.", default=0, min=0, max=4096, step=8),
        In("seed", "INT", "Seed of every random draw (resume continues it exactly).", default=42, min=0,
           max=0xFFFFFFFF, step=1),
        In("output_name", "STRING", "The LoRA is saved as output/loras/<name>.safetensors; the run (checkpoints, log, "
           "curves) in output/spo_training/<name>.", default="spo_lora"),
        In("resume", "BOOLEAN", "Continue the run of that name from its last checkpoint.", default=False),
        In("overwrite", "BOOLEAN", "Start that run over, replacing its files.", default=False),
        In("mixed_precision", "COMBO", "auto = bf16 (or fp16) on GPU, none on CPU. The LoRA weights stay fp32.",
           options=["auto", "no", "fp16", "bf16"], default="auto"),
        In("gradient_checkpointing", "BOOLEAN", "Less memory, about 30% slower.", default=False),
        In("checkpoint_every", "INT", "Resumable checkpoint every N steps (0 = only at the end).", default=50, min=0,
           max=100000, step=1),
        In("preview_every", "INT", "Base-vs-LoRA preview grid every N steps (0 = only at the end, -1 = never).",
           default=0, min=-1, max=100000, step=1),
    ]


# -- Train SPO LoRA ------------------------------------------------------------------------------


def train_spo_lora(model, clip, vae, scorer, prompts: str = "", method: str = "spo", preset: str = "auto",
                   sampling_steps: int = 0, guidance_scale: float = 0.0, k: int = 0, batch_size: int = 0,
                   pair_threshold: float = -1.0, prompt_file: str = "", node_id: str | None = None, **common) -> Result:
    prompt_list = _prompt_list(prompts, prompt_file)
    arch = training_arch(model)
    if preset == "auto":
        preset = auto_preset(method, arch)
    if PRESETS[preset]["method"] != method:
        raise ConfigError(f"preset {preset} is for {PRESETS[preset]['method']}, not {method}; choose auto or a matching preset")
    publish_to = _publish_path(common["output_name"], common["resume"], common["overwrite"])
    overrides = _common_overrides(**common)
    overrides.update(method=method, steps=int(sampling_steps) if sampling_steps > 0 else None,
                     guidance_scale=float(guidance_scale) if guidance_scale > 0 else None,
                     k=int(k) if k > 0 and method != "grpo" else None,
                     group_size=int(k) if k > 0 and method == "grpo" else None, prompt_list=prompt_list, scorer=getattr(scorer, "name", "custom"),
                     validation_prompts=prompt_list[:1])
    if batch_size > 0:
        overrides.update(sample_batch_size=int(batch_size), train_batch_size=int(batch_size))
    if pair_threshold >= 0:  # typed by the user: used as it is
        overrides.update(threshold=float(pair_threshold), threshold_max=None, auto_threshold=False)
    cfg = _config(preset, overrides)
    return _run(cfg, model, clip, vae, scorer, node_id, publish_to, prompts=prompt_list)


TRAIN = NodeSpec(
    "SPOTrainLoRA", "Train SPO LoRA",
    "Train a LoRA on the connected MODEL with Step-by-step Preference Optimization (or LPO, DDPO, Flow-GRPO): "
    "sampling rounds with the current LoRA draw k candidates per step, the scorer picks winner and loser, and the "
    "LoRA learns the preference. SD1.5/SD2/SDXL UNets and SD3/SD3.5/Flux transformers (SPO, DDPO and GRPO on "
    "their SDE steps). Saves a kohya/webui LoRA to output/loras (the stock LoRA loader lists it and patches every "
    "module), and returns the MODEL with it applied. Cancel saves what was trained; resume continues.",
    inputs=[
        In("model", "MODEL", "The model to train on (its loaded LoRAs included); not copied."),
        In("clip", "CLIP", "Its text encoder(s), for the prompts."),
        In("vae", "VAE", "Its VAE, to decode candidates for the scorer."),
        In("scorer", SCORER_TYPE, "Ranks the candidates: the step-aware preference model for SPO."),
        In("prompts", "STRING", "Training prompts, one per line (or use prompt_file).", multiline=True, default=""),
        In("method", "COMBO", "spo; lpo (SPO's loop with a latent reward model as the scorer: every step, dynamic "
           "threshold, beta 500; SD1.5/SDXL only); ddpo (policy gradient on final-image rewards); or grpo (Flow-GRPO: "
           "groups of images per prompt, group-relative advantages, KL to the base model).",
           options=["spo", "lpo", "ddpo", "grpo"], default="spo"),
        In("preset", "COMBO", "Released hyperparameters; auto = the method's config for the model (SD1.5, SDXL; "
           "SD3/SD3.5 and Flux: Flow-GRPO's, and SPO on its rollouts).", options=PROMPT_PRESETS, default="auto"),
        *_common_inputs(),
        In("sampling_steps", "INT", "Steps of each sampling round (SPO: 20 DDIM; Flow-GRPO: 10 SD3, 6 Flux); 0 = the "
           "preset's.", default=0, min=0, max=200, step=1),
        In("guidance_scale", "FLOAT", "CFG scale while sampling and training (SPO: 5; Flux-dev: its distilled guidance, "
           "3.5); 0 = the preset's.", default=0.0, min=0.0, max=30.0, step=0.1),
        In("k", "INT", "SPO: candidates per step; GRPO: images per prompt (its group); 0 = the preset's (SD1.5 4, SDXL 2; "
           "GRPO 24).", default=0, min=0, max=64, step=1),
        In("batch_size", "INT", "Prompts per sampling round and pairs per step; 0 = the preset's.", default=0, min=0, max=64, step=1),
        In("pair_threshold", "FLOAT", "SPO keeps a winner/loser pair when the softmax gap of their scores exceeds this; "
           "-1 = the preset's (SD1.5 0.3, SDXL 0.4).", default=-1.0, min=-1.0, max=0.99, step=0.01),
        In("prompt_file", "STRING", "A .txt / .json / .jsonl prompt file (a path, or relative to ComfyUI's input folder).",
           default="", optional=True),
    ],
    outputs=[Out("MODEL", "model", "The MODEL with the trained LoRA applied."), Out("STRING", "lora_path"),
             Out("IMAGE", "curves", "Loss and reward curves."), Out("STRING", "report")],
    run=train_spo_lora,
    output_node=True,
    wants_node_id=True,
)


# -- Train on preference pairs (Diffusion-DPO / NCP-DPO) ------------------------------------------------


def _image_pairs(winners: torch.Tensor, losers: torch.Tensor, prompts: list[str], width: int, height: int):
    if winners.shape[0] != losers.shape[0]:
        raise ConfigError(f"{winners.shape[0]} winner images but {losers.shape[0]} loser images: give one loser per winner")
    if len(prompts) == 1:
        prompts = prompts * winners.shape[0]
    if len(prompts) != winners.shape[0]:
        raise ConfigError(f"{len(prompts)} prompts for {winners.shape[0]} pairs: give one prompt, or one per pair")

    def build(host: ComfyTrainingHost) -> LatentPairs:
        h, w = height or winners.shape[1], width or winners.shape[2]
        batches = []
        for images in (winners, losers):
            x = images_to_bchw(images).clone()
            if x.shape[-2:] != (h, w):
                x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True).clamp(0, 1)
            batches.append(torch.cat([host.encode_images(part).cpu() for part in x.split(8)]))
        return LatentPairs(prompts, batches[0], batches[1])

    return build


def train_on_pairs(model, clip, vae, prompts: str = "", method: str = "diffusion_dpo", preset: str = "auto",
                   winners=None, losers=None, pairs_path: str = "", node_id: str | None = None, **common) -> Result:
    if preset == "auto":
        preset = "ncp-dpo" if method == "ncp_dpo" else "diffusion-dpo"
    if PRESETS[preset]["method"] != method:
        raise ConfigError(f"preset {preset} is for {PRESETS[preset]['method']}, not {method}")
    publish_to = _publish_path(common["output_name"], common["resume"], common["overwrite"])
    overrides = _common_overrides(**common)
    overrides["method"] = method
    pairs = None
    if pairs_path and pairs_path.strip():
        path = Path(pairs_path.strip()).expanduser()
        if not path.is_absolute():
            import folder_paths

            path = Path(folder_paths.get_input_directory()) / path
        overrides["pairs"] = str(path)
        if overrides["width"] is None or overrides["height"] is None:
            arch = model_arch(model)
            size = {"sdxl": 1024, "custom-sdxl": 1024}.get(arch, 512)
            overrides["width"], overrides["height"] = overrides["width"] or size, overrides["height"] or size
    elif winners is not None and losers is not None:
        prompt_list = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
        if not prompt_list:
            raise ConfigError("the prompt list is empty: give the prompt of the pairs (one, or one per pair)")
        width = overrides["width"] or int(winners.shape[2])
        height = overrides["height"] or int(winners.shape[1])
        overrides["width"], overrides["height"] = width, height
        pairs = _image_pairs(winners, losers, prompt_list, width, height)
        overrides["validation_prompts"] = prompt_list[:1]
    else:
        raise ConfigError("no preference pairs: connect winners and losers IMAGE batches, or give pairs_path")
    cfg = _config(preset, overrides)
    return _run(cfg, model, clip, vae, None, node_id, publish_to, pairs=pairs)


TRAIN_PAIRS = NodeSpec(
    "SPOTrainLoRAOnPairs", "Train LoRA on Preference Pairs",
    "Offline preference training (Diffusion-DPO or NCP-DPO) of a LoRA on the connected MODEL, from two IMAGE "
    "batches (winners, losers) with their prompts, or from a pairs folder / JSONL / CSV. Saves to output/loras.",
    inputs=[
        In("model", "MODEL", "The model to train on; not copied."),
        In("clip", "CLIP", "Its text encoder(s)."),
        In("vae", "VAE", "Its VAE, to encode the images."),
        In("prompts", "STRING", "The prompt of the image pairs: one for all, or one per pair (line).", multiline=True, default=""),
        In("method", "COMBO", "diffusion_dpo or ncp_dpo.", options=["diffusion_dpo", "ncp_dpo"], default="diffusion_dpo"),
        In("preset", "COMBO", "Released hyperparameters (auto = the method's).", options=PAIR_PRESETS, default="auto"),
        *_common_inputs(),
        In("winners", "IMAGE", "Preferred images.", optional=True),
        In("losers", "IMAGE", "Rejected images (same count).", optional=True),
        In("pairs_path", "STRING", "Instead of IMAGE inputs: a pairs folder or JSONL/CSV/parquet (prompt, winner, "
           "loser), a path or relative to ComfyUI's input folder.", default="", optional=True),
    ],
    outputs=[Out("MODEL", "model"), Out("STRING", "lora_path"), Out("IMAGE", "curves"), Out("STRING", "report")],
    run=train_on_pairs,
    output_node=True,
    wants_node_id=True,
)

SPECS = [TRAIN, TRAIN_PAIRS]
