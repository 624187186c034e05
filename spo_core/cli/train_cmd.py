"""`spo train`: train a LoRA with SPO, LPO, Diffusion-DPO, NCP-DPO, DDPO or GRPO on a local diffusers model.

    spo train --model ./sd15 --preset sd15 --prompts prompts.txt --scorer spm --scorer-weights spm.safetensors
    spo train --model ./sd35-medium --preset grpo-sd3 --prompts prompts.txt     # Flow-GRPO on SD3.5
    spo train --model world-flow --method grpo --max-steps 20                    # the embedded flow world
    spo train --config run.toml                    # every setting also a flag; flags override the file
    spo train --config run.toml --resume auto      # continue the run in output_dir
    accelerate launch --multi_gpu --num_processes 2 -m spo_core train --config run.toml

Ctrl-C stops at the next safe point and saves a checkpoint and the LoRA (press twice to abort).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from ..training.config import add_arguments

    p = subparsers.add_parser(
        "train", help="train a LoRA (SPO, LPO, Diffusion-DPO, NCP-DPO, DDPO, GRPO) on a local SD1.5/SDXL model, "
        "or SPO/DDPO/GRPO on an SD3/SD3.5/Flux folder",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML or JSON file of settings (sections like [lora] are allowed)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as TOML and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", dest="no_progress", action="store_true", help=argparse.SUPPRESS)
    add_arguments(p)
    p.set_defaults(handler=run)


def _device(cfg_device: str | None):
    import os

    import torch

    if cfg_device:
        dev = torch.device(cfg_device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        dev = torch.device("mps")
    else:
        dev = torch.device("cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def _dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def with_world_defaults(cfg, args: argparse.Namespace):
    """`--model world` / `world-flow` with no preset: the world's own settings, scorer, weights and prompts
    (flags still win)."""
    import dataclasses

    from ..errors import ConfigError
    from ..model_names import is_flow_world, is_world
    from ..training.config import FLOW_METHODS, SAMPLING_METHODS, TrainConfig, apply_preset, auto_preset, from_args

    flow = is_flow_world(cfg.model)
    if not (is_world(cfg.model) or flow) or cfg.preset:
        return cfg
    name = auto_preset(cfg.method, None, world=True, flow=flow)
    if name is None:
        raise ConfigError(f"{cfg.method} does not train the world's rectified-flow model; use one of {', '.join(FLOW_METHODS)}"
                          if flow else f"no world settings for {cfg.method}")
    world = from_args(args, apply_preset(TrainConfig(), name), preset=False)
    if args.config:  # the file's settings stay over the preset
        world = TrainConfig.from_file(args.config, world)
        world = from_args(args, world, preset=False)
    if not world.prompts and not world.prompt_list and world.method in SAMPLING_METHODS:
        world = dataclasses.replace(world, prompts="world")
    if world.method in SAMPLING_METHODS and world.scorer in ("spm", "lrm") and not world.scorer_weights:
        world = dataclasses.replace(world, scorer_weights="world")
    return world


def gpu_tactics(cfg) -> dict:
    """The memory tactics of the preset (GPU_TACTICS) when it trains on a CUDA GPU: the settings under the
    config file and the flags, so either still overrides them. 8-bit AdamW only where bitsandbytes is."""
    import importlib.util

    import torch

    from ..training.config import GPU_TACTICS

    tactics = dict(GPU_TACTICS.get(cfg.preset or "", {}))
    on_cuda = (cfg.device or "").startswith("cuda") or (not cfg.device and torch.cuda.is_available())
    if not tactics or not on_cuda:
        return {}
    if tactics.get("optimizer") == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        tactics["optimizer"] = "adamw"
    return tactics


def describe_tactics(cfg, tactics: dict) -> str:
    """The preset's GPU settings still in force after the file and the flags, in words."""
    words = {"mixed_precision": lambda v: f"{v} autocast", "gradient_checkpointing": lambda v: "gradient checkpointing",
             "offload": lambda v: f"{v.replace('_', ' ').replace('+', ' and ')} on the CPU between uses",
             "optimizer": lambda v: {"adamw8bit": "8-bit AdamW"}.get(v, "AdamW")}
    kept = [words[k](v) for k, v in tactics.items() if getattr(cfg, k) == v and v != "adamw"]
    return f"spo train: GPU memory settings of preset {cfg.preset}: {', '.join(kept) or 'none left'} (flags override)"


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from ..errors import Cancelled, ConfigError
    from ..training.config import TrainConfig, apply_preset, from_args

    def settings(tactics: dict | None = None) -> TrainConfig:
        base = apply_preset(TrainConfig(), args.preset) if args.preset else TrainConfig()  # preset < file < flags
        if tactics:
            base = dataclasses.replace(base, **tactics)
        cfg = TrainConfig.from_file(args.config, base) if args.config else base
        return with_world_defaults(from_args(args, cfg, preset=False), args)

    cfg = settings()
    tactics = gpu_tactics(cfg)
    if tactics:
        cfg = settings(tactics)
        print(describe_tactics(cfg, tactics), file=sys.stderr)
    if args.print_config:
        sys.stdout.write(cfg.resolved(require_data=False).to_toml())
        return 0
    resolved = cfg.resolved()
    if not resolved.model:
        raise ConfigError("give the model to train: --model PATH (a diffusers folder or a .safetensors checkpoint)")

    import torch

    from ..backends import DiffusersBackend
    from ..backends.flow_backend import is_flow_model_spec, load_flow_model
    from ..progress import TqdmProgress
    from ..safe_io import sha256_file
    from ..training import DiffusersTrainingHost, FlowTrainingHost, train
    from ..training.config import SAMPLING_METHODS

    device = _device(resolved.device)
    dtype = _dtype(resolved.model_dtype, device)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # every process says what it is: a launcher that silently started one process shows at once
    print(f"spo train: process {rank + 1} of {world} on {device} ({resolved.method}, {resolved.max_steps} steps, "
          f"output {resolved.output_dir})", file=sys.stderr)
    model_path = Path(resolved.model)
    model_hash = sha256_file(model_path) if model_path.is_file() else None
    if is_flow_model_spec(resolved.model):
        if resolved.offload != "none":
            raise ConfigError(f"--offload {resolved.offload} is for SD1.5/SDXL models; an SD3/Flux folder keeps its text "
                              "encoders and VAE on the device (use --mixed-precision bf16 and --gradient-checkpointing)")
        host = FlowTrainingHost(load_flow_model(resolved.model, device, dtype), model_name=model_path.name)
    else:
        backend = DiffusersBackend.from_pretrained(resolved.model, arch=resolved.arch, device=device, dtype=dtype,
                                                   vae=resolved.vae, loading_bars=not args.no_progress and rank == 0)
        if resolved.offload != "none":
            backend.offload(resolved.offload.split("+"))
        host = DiffusersTrainingHost(backend, model_name=model_path.name, model_hash=model_hash)
    scorer = None
    if resolved.method in SAMPLING_METHODS:
        from ..scorers import load_scorer

        scorer = load_scorer(resolved.scorer, resolved.scorer_weights, device=device,
                             dtype=torch.float16 if device.type == "cuda" else torch.float32, **resolved.scorer_options)
    progress = TqdmProgress(disable=args.no_progress or rank != 0, leave=False)
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        print("\nstopping at the next safe point (Ctrl-C again to abort without saving)", file=sys.stderr)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = train(cfg, host, scorer, progress=progress, cancel=lambda: stop["asked"])
    except Cancelled as exc:
        progress.close()
        print(f"{exc}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, old)
        progress.close()
    if rank == 0:
        print(f"LoRA: {', '.join(map(str, result.lora_paths))}")
        if "loss" in result.metrics:
            print(f"steps: {result.steps}  last loss: {result.metrics['loss']:.5g}")
        else:
            print(f"steps: {result.steps}  (nothing to train: the run was already at step {result.steps} of "
                  f"{resolved.max_steps}; raise --max-steps to continue it)")
        print(f"checkpoint: {result.checkpoint}")
        print(f"log: {result.log_path}")
        if result.curves_path:
            print(f"curves: {result.curves_path}")
        if result.validation_paths:
            print(f"validation: {result.validation_paths[-1]}")
    return 0
