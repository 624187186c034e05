"""The preference trainer: SPO, Diffusion-DPO, NCP-DPO, DDPO and GRPO LoRA training on any host
(SD1.5/SDXL UNets; SPO, DDPO and GRPO on rectified-flow transformers too).

    from spo_core.training import TrainConfig, DiffusersTrainingHost, train, preset
    result = train(preset("sd15", prompts="prompts.txt", max_steps=500), DiffusersTrainingHost(backend), scorer)

`TrainingHost` is what a host (diffusers, ComfyUI, the WebUI) implements; `LoRANetwork` is the
hook-based LoRA that trains on the host's own UNet and saves through the LoRA engine.
"""

import importlib

# resolved on first use (PEP 562), so `spo_core.training.config` (every CLI verb's flags) imports without the trainer
_EXPORTS = {
    "PRESETS": "config", "TrainConfig": "config", "apply_preset": "config", "preset": "config",
    "DiffusersTrainingHost": "host", "FlowTrainingHost": "host", "TrainingHost": "host",
    "LoRANetwork": "lora_network", "LoRARoot": "lora_network", "inject_lora": "lora_network", "select_modules": "lora_network",
    "Trainer": "trainer", "TrainingOutOfMemory": "trainer", "TrainResult": "trainer", "train": "trainer",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = sorted(_EXPORTS)
