"""The embedded tiny text-to-image world: where SPO runs end to end on a CPU and is measured.

- `dataset`: coloured shapes on grey backgrounds with captions from a small grammar
  ("a red circle", "a red circle above a blue square"); deterministic rendering; a training
  prompt set and held-out prompts (object pairs never seen together in training).
- `preference`: the exact ground-truth preference of an image for its caption, in [0, 1], with
  components colour, shape, relation, quality, style; it measures pixels, so it judges generated images.
- the shipped base model (`weights/base`): a real SD1.5-family diffusers pipeline folder,
  trained by `train_vae` and `train_base` on partly wrong "web" data (`noisy_data`).

Nothing here touches the network: the tokenizer is rebuilt from open_clip's bundled BPE file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .dataset import (COLOUR_NAMES, IMAGE_SIZE, RELATION_NAMES, SHAPES, Caption, ObjectSpec, heldout_eval_set,
                      heldout_prompts, parse_caption, render, render_batch, train_prompts)
from .models import BASE_DIR, WEIGHTS_DIR
from .preference import Preference, ground_truth, ground_truth_components

BASE_MODEL_DIR: Path = BASE_DIR


def load_world_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """The shipped base model as a diffusers StableDiffusionPipeline (DDIM scheduler, no safety
    checker, the CLIP tokenizer built offline). Never downloads anything."""
    from ..backends.diffusers_backend import quiet_load
    from ..clip_tokenizer import load_clip_tokenizer
    from ..errors import FileMissingError, require

    diffusers = require("diffusers", "the embedded world", "diffusers")
    folder = Path(path) if path is not None else BASE_DIR
    if not (folder / "model_index.json").is_file():
        raise FileMissingError(
            f"the embedded world's base model is missing ({folder / 'model_index.json'}). It ships with the "
            f"package; to rebuild it run: python -m spo_core.world.train_vae && python -m spo_core.world.train_base")
    pipe = quiet_load(  # no "Loading pipeline components" bars: the models are tiny
        diffusers.StableDiffusionPipeline.from_pretrained, str(folder), tokenizer=load_clip_tokenizer(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_world_backend(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The shipped base model behind the sigma-space contract (`spo_core.backends.DiffusersBackend`)."""
    from ..backends.diffusers_backend import DiffusersBackend

    return DiffusersBackend.from_pipeline(load_world_pipeline(device, dtype))


def load_flow_world_backend(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                            path: str | Path | None = None):
    """The world's rectified-flow model (`weights/flow`, an SD3Transformer2DModel) with the base model's
    VAE and text encoder, behind the sigma-space contract (`spo_core.backends.flow_backend.FlowBackend`)."""
    from ..backends.flow_backend import FlowBackend
    from .flow_models import FLOW_SCHEDULER_CONFIG, encode_prompts_for_flow, load_flow_transformer

    pipe = load_world_pipeline(device, dtype)
    transformer = load_flow_transformer(path, dtype=dtype).to(device)
    text_encoder, tokenizer = pipe.text_encoder, pipe.tokenizer

    def encode(prompts):
        return encode_prompts_for_flow(text_encoder, tokenizer, prompts)

    return FlowBackend(transformer, pipe.vae, encode, shift=float(FLOW_SCHEDULER_CONFIG["shift"]), arch="world-flow")


__all__ = [
    "BASE_MODEL_DIR", "WEIGHTS_DIR", "IMAGE_SIZE", "COLOUR_NAMES", "SHAPES", "RELATION_NAMES", "Caption", "ObjectSpec",
    "Preference", "parse_caption", "render", "render_batch", "train_prompts", "heldout_prompts", "heldout_eval_set",
    "ground_truth", "ground_truth_components", "load_world_pipeline", "load_world_backend", "load_flow_world_backend",
]
