"""The preference trainer: SPO, Diffusion-DPO, NCP-DPO, DDPO and GRPO LoRA training on any host
(SD1.5/SDXL UNets; SPO, DDPO and GRPO on rectified-flow transformers too).

    from spo_core.training import TrainConfig, DiffusersTrainingHost, train, preset
    result = train(preset("sd15", prompts="prompts.txt", max_steps=500), DiffusersTrainingHost(backend), scorer)

`TrainingHost` is what a host (diffusers, ComfyUI, the WebUI) implements; `LoRANetwork` is the
hook-based LoRA that trains on the host's own UNet and saves through the LoRA engine.
"""

from .config import PRESETS, TrainConfig, apply_preset, preset
from .host import DiffusersTrainingHost, FlowTrainingHost, TrainingHost
from .lora_network import LoRANetwork, LoRARoot, inject_lora, select_modules
from .trainer import Trainer, TrainingOutOfMemory, TrainResult, train

__all__ = [
    "DiffusersTrainingHost", "FlowTrainingHost", "LoRANetwork", "LoRARoot", "PRESETS", "TrainConfig", "TrainResult", "Trainer",
    "TrainingHost", "TrainingOutOfMemory", "apply_preset", "inject_lora", "preset", "select_modules", "train",
]
