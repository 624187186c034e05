"""Scorer nodes: Load Step-Aware Scorer (-> SPO_SCORER) and Score Images."""

from __future__ import annotations

import logging

import torch

from spo_core.errors import ConfigError

from .host import bchw_to_images, images_to_bchw, scorer_weight_options, scorer_weight_path, text_ui
from .spec import In, NodeSpec, Out, Result

log = logging.getLogger(__name__)

NO_WEIGHTS = "(none)"
SCORER_TYPE = "SPO_SCORER"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ManagedScorer:
    """The value on an SPO_SCORER socket: a spo_core scorer whose torch modules are a ComfyUI
    ModelPatcher, so ComfyUI's model management loads them to the GPU when scoring and
    offloads them like any other model. It follows the spo_core Scorer protocol itself, so
    it goes straight into spo_core's resampler and trainer.
    """

    def __init__(self, scorer, load_device: torch.device, offload_device: torch.device):
        self.scorer = scorer
        self.patcher = None
        modules = scorer.modules()
        if modules:
            import comfy.model_patcher

            # ComfyUI logs "Requested to load <class name>": name the scorer there
            named = type(f"SPOScorer_{scorer.name}", (torch.nn.ModuleList,), {})
            container = named(modules)
            self.patcher = comfy.model_patcher.ModelPatcher(container, load_device=load_device, offload_device=offload_device)

    # the spo_core Scorer protocol
    name = property(lambda self: self.scorer.name)
    step_aware = property(lambda self: self.scorer.step_aware)
    differentiable = property(lambda self: self.scorer.differentiable)
    needs_prompt = property(lambda self: self.scorer.needs_prompt)
    pair_scale = property(lambda self: getattr(self.scorer, "pair_scale", 1.0))
    spo_scale = property(lambda self: getattr(self.scorer, "spo_scale", True))
    input_kind = property(lambda self: getattr(self.scorer, "input_kind", "pixels"))
    model = property(lambda self: getattr(self.scorer, "model", None))
    device = property(lambda self: self.scorer.device)
    dtype = property(lambda self: self.scorer.dtype)

    def prepare(self) -> None:
        """Have ComfyUI load the scorer's weights to its device (offloading others if it must)."""
        if self.patcher is None:
            return
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        self.scorer.to(device=self.patcher.load_device)

    def score(self, images: torch.Tensor, prompts=None, timesteps=None) -> torch.Tensor:
        self.prepare()
        return self.scorer.score(images, prompts, timesteps)

    def to(self, device=None, dtype=None) -> "ManagedScorer":
        self.scorer.to(device=device, dtype=dtype)
        return self

    def modules(self) -> list[torch.nn.Module]:
        return self.scorer.modules()

    def __repr__(self) -> str:
        return f"ManagedScorer({self.scorer!r})"


def _scorer_names() -> list[str]:
    from spo_core.scorers import available_scorers

    return [info.name for info in available_scorers()]


def _weight_options() -> list[str]:
    return [NO_WEIGHTS] + scorer_weight_options()


def load_step_aware_scorer(scorer: str, weights: str = NO_WEIGHTS, device: str = "auto", dtype: str = "auto",
                           companion: str = NO_WEIGHTS) -> Result:
    import comfy.model_management as mm

    from spo_core.scorers import SCORERS, load_scorer

    info = SCORERS.get(scorer)
    if info is None:
        raise ConfigError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    path = None
    if info.needs_weights:
        if weights == NO_WEIGHTS:
            raise ConfigError(f"scorer {scorer!r} needs weights in models/spo_scorers: {info.weights_hint}")
        path = scorer_weight_path(weights)
    load_device = torch.device("cpu") if device == "cpu" else mm.get_torch_device()
    if dtype == "auto":
        torch_dtype = torch.float16 if load_device.type == "cuda" else torch.float32
    else:
        torch_dtype = _DTYPES[dtype]
    options = {}
    if companion != NO_WEIGHTS:
        extra = scorer_weight_path(companion)
        if scorer == "aesthetic":
            options["clip"] = extra
        elif scorer == "spm":
            options["tokenizer_path"] = extra
    core = load_scorer(scorer, path, device="cpu", dtype=torch_dtype, **options)
    managed = ManagedScorer(core, load_device, mm.unet_offload_device() if device != "cpu" else torch.device("cpu"))
    text = (f"{scorer}: {info.description}\nweights: {path or 'none needed'}\n"
            f"device {load_device}, {str(torch_dtype).replace('torch.', '')}; step-aware: {info.step_aware}")
    return Result((managed, text), text_ui(text))


LOAD_SCORER = NodeSpec(
    "SPOLoadScorer", "Load Step-Aware Scorer",
    "Load a scorer (reward model) from models/spo_scorers: SPO's step-aware preference model, PickScore, HPSv2, "
    "the LAION aesthetic predictor, CLIP score, or JPEG (in)compressibility (no weights). ComfyUI loads it to the "
    "GPU when it scores and offloads it like other models.",
    inputs=[
        In("scorer", "COMBO", "Which scorer.", options=_scorer_names, default="spm"),
        In("weights", "COMBO", "Its weights file or folder in models/spo_scorers ((none) for JPEG scorers).", options=_weight_options),
        In("device", "COMBO", "auto = ComfyUI's device.", options=["auto", "cpu"], default="auto"),
        In("dtype", "COMBO", "auto = fp16 on GPU, fp32 on CPU.", options=["auto", "fp32", "fp16", "bf16"], default="auto"),
        In("companion", "COMBO", "aesthetic: the CLIP ViT-L/14 folder for a bare .pth head; spm: a tokenizer folder.",
           options=_weight_options, optional=True),
    ],
    outputs=[Out(SCORER_TYPE, "scorer"), Out("STRING", "info")],
    run=load_step_aware_scorer,
)


def score_images(images: torch.Tensor, prompt: str, scorer, timestep: int = 0) -> Result:
    if images.shape[0] == 0:
        raise ConfigError("the image batch is empty")
    x = images_to_bchw(images)
    if scorer.needs_prompt and not prompt.strip():
        raise ConfigError(f"scorer {scorer.name!r} compares the images with their prompt: enter the prompt")
    prompts = prompt if scorer.needs_prompt else None
    scores = scorer.score(x, prompts, int(timestep)).detach().float().cpu()
    order = torch.argsort(scores, descending=True, stable=True)
    lines = [f"{'rank':>4}  {'image':>5}  {'score':>10}", *(f"{r + 1:>4}  {int(i):>5}  {float(scores[i]):>10.4f}" for r, i in enumerate(order))]
    lines.append(f"{scorer.name} at t={int(timestep)}: mean {float(scores.mean()):.4f}, best image {int(order[0])}")
    text = "\n".join(lines)
    sorted_images = bchw_to_images(x[order])
    return Result(([float(s) for s in scores], text, sorted_images), text_ui(text))


SCORE_IMAGES = NodeSpec(
    "SPOScoreImages", "Score Images",
    "Score a batch of images with an SPO_SCORER (for a step-aware scorer, the images are predicted x0 at the given "
    "DDPM timestep, 0 = final images). Returns the scores, a table, and the batch sorted best first.",
    inputs=[
        In("images", "IMAGE", "The images to score."),
        In("prompt", "STRING", "The prompt the images were made for (one prompt for the batch).", multiline=True, default=""),
        In("scorer", SCORER_TYPE, "From Load Step-Aware Scorer."),
        In("timestep", "INT", "DDPM timestep of the images (0 = final images; step-aware scorers only).",
           default=0, min=0, max=999, step=1, optional=True),
    ],
    outputs=[Out("FLOAT", "scores", "One score per image, in batch order.", is_list=True), Out("STRING", "table"),
             Out("IMAGE", "sorted_images", "The batch, best score first.")],
    run=score_images,
)

SPECS = [LOAD_SCORER, SCORE_IMAGES]
