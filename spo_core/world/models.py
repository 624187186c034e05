"""The architecture of the embedded world's text-to-image model (SD1.5 family, tiny).

A real diffusers StableDiffusionPipeline folder: `AutoencoderKL` (32x32 RGB <-> 8x8x4
latents), `CLIPTextModel` (the real 49,408-token CLIP BPE vocabulary, 64-d hidden states,
77 tokens), `UNet2DConditionModel` with cross-attention on the text states, and SD's DDIM
scheduler config (scaled_linear betas 0.00085..0.012, 1000 steps, eps prediction, leading
spacing with steps_offset 1), so SPO's 20-step DDIM schedule t = 951, 901, ..., 1 applies.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import require

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BASE_DIR = WEIGHTS_DIR / "base"

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32,
    act_fn="silu", force_upcast=False,
)

TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    timestep_spacing="leading",
)


def set_determinism(seed: int, threads: int = 1) -> None:
    """Fixed seeds, a fixed CPU thread count and deterministic kernels: reruns give the same weights."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.use_deterministic_algorithms(True)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, params, max_grad_norm: float = 1.0) -> None:
    """One step of the world's training scripts: backward, clip the gradient norm, step, schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()


def build_vae(config: dict | None = None):
    diffusers = require("diffusers", "the embedded world", "diffusers")
    return diffusers.AutoencoderKL(**(config or VAE_CONFIG))


def build_text_encoder(config: dict | None = None, vocab_ids: list[int] | None = None):
    """A CLIPTextModel; with `vocab_ids`, only those token embeddings start random and the
    rest are zero (the world's prompts use a few dozen tokens; zero rows keep the shipped
    file small once compressed, and unknown words then carry position information only)."""
    transformers = require("transformers", "the embedded world", "scorers")
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**(config or TEXT_CONFIG)))
    if vocab_ids is not None:
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            keep = emb[vocab_ids].clone()
            emb.zero_()
            emb[vocab_ids] = keep
    return model


def build_unet(config: dict | None = None):
    diffusers = require("diffusers", "the embedded world", "diffusers")
    return diffusers.UNet2DConditionModel(**(config or UNET_CONFIG))


def build_scheduler():
    diffusers = require("diffusers", "the embedded world", "diffusers")
    return diffusers.DDIMScheduler(**SCHEDULER_CONFIG)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
