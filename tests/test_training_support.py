"""Shared pieces of the trainer tests (no tests here): scorers, tiny hosts, small configs."""

from __future__ import annotations

import functools
import json

import numpy as np
import torch

from spo_core.training import DiffusersTrainingHost, TrainConfig


class BrightnessScorer:
    """A step-aware stand-in for the SPM: prefers bright images, on a large scale so pairs pass SPO's threshold."""

    name = "brightness"
    step_aware = True
    differentiable = True
    needs_prompt = False

    def __init__(self, scale: float = 1e4):
        self.scale = scale
        self.timesteps: list[torch.Tensor] = []

    def score(self, images, prompts=None, timesteps=None):
        if timesteps is not None:
            self.timesteps.append(torch.as_tensor(timesteps).clone())
        return self.scale * images.float().mean(dim=(1, 2, 3))


class single_thread:
    """Tiny models run 10x faster on one thread than on two busy cores (restored afterwards)."""

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


@functools.lru_cache(maxsize=None)
def tiny_host(sdxl: bool = False, seed: int = 0) -> DiffusersTrainingHost:
    """A tiny SD1.5 (or SDXL) host, built once per test session: every test leaves it as it found it
    (networks detached, parameters' requires_grad and checkpointing restored)."""
    from spo_core.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed) if sdxl else tiny_sd15_pipeline(seed)
    return DiffusersTrainingHost.from_pipeline(pipe)


def spo_config(out, **kw) -> TrainConfig:
    """SPO on the tiny model: 4 DDIM steps (t = 751, 501, 251, 1: all in SPO's window), k = 2, 16 px."""
    base = dict(prompt_list=["a cat", "a dog", "a red car", "a house"], steps=4, k=2, sample_batch_size=2,
                train_batch_size=2, max_steps=4, checkpoint_every=0, output_dir=str(out), height=16, width=16,
                validate_every=-1, learning_rate=1e-3, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def randomize(network, scale: float = 0.05, seed: int = 0) -> None:
    """Non-zero up factors, so the LoRA changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in network.branches.values():
            branch.up.copy_(torch.randn(branch.up.shape, generator=g) * scale)


def write_pair_folder(folder, n: int = 3, size=(24, 20), seed: int = 0) -> None:
    """A pairs.jsonl with n (prompt, winner png, loser png) rows."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for tag in ("w", "l"):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}{tag}.png")
        rows.append({"caption": f"prompt {i}", "win": f"{i}w.png", "lose": f"{i}l.png"})
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def lora_tensors(path) -> dict[str, torch.Tensor]:
    from spo_core.safe_io import load_state_dict

    return load_state_dict(path)[0]
