"""The embedded world's rectified-flow model: the shipped SD3 transformer loads offline, is small
fp16, samples deterministically per (prompt, seed) with diffusers' flow-matching Euler scheduler,
and draws held-out prompts far better than decoded noise."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from spo_core.world import heldout_eval_set, load_world_pipeline  # noqa: E402
from spo_core.world.evaluate import gt_stats  # noqa: E402
from spo_core.world.flow_models import (FLOW_DIR, FLOW_SCHEDULER_CONFIG, build_flow_scheduler,  # noqa: E402
                                        decode_latents, encode_prompts_for_flow, load_flow_transformer,
                                        sample_flow_images)

WEIGHTS = FLOW_DIR / "transformer" / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def world():
    base = load_world_pipeline()
    return load_flow_transformer(), base.text_encoder, base.tokenizer, base.vae


@pytest.fixture(scope="module")
def pairs():
    ps = heldout_eval_set(4, 1)
    return [c for c, _ in ps], [s for _, s in ps]


def test_shipped_transformer_is_small_fp16_and_loads_offline(world):
    from safetensors import safe_open

    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 4e6
    with safe_open(str(WEIGHTS), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    transformer = world[0]
    assert type(transformer).__name__ == "SD3Transformer2DModel"
    assert transformer.config.in_channels == 4 and transformer.config.joint_attention_dim == 64
    assert sum(p.numel() for p in transformer.parameters()) < 2e6
    sched = json.loads((FLOW_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == FLOW_SCHEDULER_CONFIG["shift"]
    log = json.loads((FLOW_DIR / "training_log.json").read_text())
    assert log["final"]["flow_heldout"]["n"] == log["final"]["unet_base_heldout"]["n"]


def test_prompt_encoding_shapes(world):
    _, text_encoder, tokenizer, _ = world
    with torch.no_grad():
        hidden, pooled = encode_prompts_for_flow(text_encoder, tokenizer, ["a red circle", ""])
    assert hidden.shape == (2, 77, 64) and pooled.shape == (2, 64)


def test_sampling_is_deterministic_and_beats_noise(world, pairs):
    caps, seeds = pairs
    seen = []
    transformer = world[0]
    forward = transformer.forward

    def recording(*args, **kwargs):
        seen.append(kwargs["timestep"].clone())
        return forward(*args, **kwargs)

    transformer.forward = recording
    try:
        imgs = sample_flow_images(*world, caps, seeds, steps=8)
    finally:
        del transformer.forward
    assert imgs.shape == (4, 3, 32, 32) and imgs.dtype == torch.float32
    assert 0.0 <= float(imgs.min()) and float(imgs.max()) <= 1.0
    # the transformer sees the scheduler's timesteps, 1000 * sigma, for the whole CFG batch
    sched = build_flow_scheduler()
    sched.set_timesteps(8)
    assert torch.allclose(torch.stack([t[0] for t in seen]), sched.sigmas[:-1] * 1000)
    assert all(t.shape == (8,) for t in seen)
    # same (prompt, seed) -> the same image, whatever the batch
    assert torch.equal(sample_flow_images(*world, caps, seeds, steps=8), imgs)
    assert torch.allclose(sample_flow_images(*world, caps[:1], seeds[:1], steps=8), imgs[:1], atol=1e-5)
    noise = decode_latents(world[3], torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s))
                                                  for s in seeds]))
    flow, rand = gt_stats(imgs, caps), gt_stats(noise, caps)
    assert flow.mean > rand.mean + 0.2, (flow.line(), rand.line())
    assert flow.colour > 0.6, flow.line()
