"""What the trainer needs from a host, and the diffusers implementation of it.

The trainer never knows whether it runs inside ComfyUI, the WebUI or on a diffusers model.
A host gives it: the sigma-space denoiser (CFG inside, differentiable), a prompt encoder, a
latent decoder and image encoder, the noise schedule, where the UNet's modules are and how
they are named (for the LoRA hooks), the UNet block whose output NCP-DPO uses as features,
a switch for gradient checkpointing, and a few facts for the LoRA's metadata. The ComfyUI and
WebUI adapters implement `TrainingHost` over their loaded model; `DiffusersTrainingHost`
implements it over `spo_core.backends.DiffusersBackend`.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..lora.tables import ModuleTable
from ..sampling.denoiser import Conditioning, Denoiser
from ..sampling.schedule import NoiseSchedule
from .lora_network import LoRARoot


@runtime_checkable
class TrainingHost(Protocol):
    """The protocol a host implements so the trainer can run on its model.

    Attributes: `arch` ("sd15", "sdxl", or "custom-..." for other UNets), `device`, `dtype`
    (the UNet's weight dtype), `schedule` (NoiseSchedule of the model's 1000 alphas_cumprod),
    `default_size` (the model's native image size in pixels: 512 SD1.5, 1024 SDXL).
    """

    arch: str
    device: torch.device
    dtype: torch.dtype
    schedule: NoiseSchedule
    default_size: int

    def module_table(self) -> ModuleTable:
        """The LoRA engine's table of this UNet (load_table(arch) for real models)."""

    def lora_root(self) -> LoRARoot:
        """The module tree the LoRA hooks attach to, and its naming ("diffusers"/"ldm") and prefix."""

    def denoiser(self, guidance_scale: float) -> Denoiser:
        """`denoise(x, sigma, cond) -> x0` with CFG inside; must keep the autograd graph (no no_grad)."""

    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str | None = None,
                       height: int | None = None, width: int | None = None) -> Conditioning:
        """Conditioning rows for the prompts (and the uncond rows CFG needs)."""

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model-space latents [N,C,h,w] -> images [N,3,H,W] in [0,1] (no grad)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N,3,H,W] in [0,1] -> model-space latents (the VAE posterior mean)."""

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """Shape of a latent batch for an image size (None: the model's default size)."""

    def feature_module(self, where: str) -> nn.Module:
        """NCP-DPO's frozen features: the last down block ("down") or the mid block ("mid")."""

    def set_gradient_checkpointing(self, enabled: bool, checkpoint_fn: Callable | None = None) -> None:
        """Turn the UNet's gradient checkpointing on/off; `checkpoint_fn(function, *args)` replaces
        torch.utils.checkpoint.checkpoint (the trainer passes one that keeps the LoRA multiplier)."""

    def model_info(self) -> dict[str, str]:
        """Facts for the LoRA metadata: at least "name"; "hash" (sha256) when the file is known."""


class DiffusersTrainingHost:
    """TrainingHost over a DiffusersBackend (the CLI, the standalone app, tests, the demo)."""

    def __init__(self, backend, model_name: str | None = None, model_hash: str | None = None):
        self.backend = backend
        self.arch = backend.arch
        self.device = torch.device(backend.device)
        self.dtype = backend.dtype
        self.schedule = backend.schedule
        self.default_size = int(backend.default_size)
        self._name = model_name
        self._hash = model_hash
        self._checkpointing_was = bool(getattr(self.denoiser_model, "is_gradient_checkpointing", False))

    @property
    def denoiser_model(self) -> nn.Module:
        """The network the LoRA trains: the UNet here, a flow model's transformer in FlowTrainingHost."""
        return self.backend.unet

    @classmethod
    def from_pipeline(cls, pipe, device=None, dtype=None, arch: str | None = None, **kw) -> "DiffusersTrainingHost":
        from ..backends import DiffusersBackend

        return cls(DiffusersBackend(pipe, device=device, dtype=dtype, arch=arch), **kw)

    def module_table(self) -> ModuleTable:
        return self.backend.module_table()

    def lora_root(self) -> LoRARoot:
        return LoRARoot(self.backend.unet, "diffusers", "")

    def denoiser(self, guidance_scale: float) -> Denoiser:
        return self.backend.denoiser(guidance_scale)

    def encode_prompts(self, prompts, negative_prompt=None, height=None, width=None) -> Conditioning:
        return self.backend.encode_prompts(list(prompts), negative_prompt=negative_prompt, height=height, width=width)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.backend.decode(x0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.backend.encode_images(images)

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        return self.backend.latent_shape(batch, height, width)

    def feature_module(self, where: str) -> nn.Module:
        unet = self.backend.unet
        if where == "down":
            return unet.down_blocks[-1]
        if where == "mid":
            return unet.mid_block
        from ..errors import ConfigError

        raise ConfigError(f"NCP features must come from 'down' or 'mid', got {where!r}")

    def set_gradient_checkpointing(self, enabled: bool, checkpoint_fn: Callable | None = None) -> None:
        model = self.denoiser_model
        if enabled:
            if checkpoint_fn is None:
                model.enable_gradient_checkpointing()
            else:
                model.enable_gradient_checkpointing(lambda module, *args: checkpoint_fn(module, *args))
        elif self._checkpointing_was:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()

    def model_info(self) -> dict[str, str]:
        info = {"name": self._name or str(getattr(self.backend.pipe, "name_or_path", "") or self.arch)}
        if self._hash:
            info["hash"] = self._hash
        return info



class FlowTrainingHost(DiffusersTrainingHost):
    """TrainingHost over a FlowBackend (SD3/SD3.5, Flux, the world's flow model): the LoRA hooks go on the
    transformer (diffusers names), the rollouts use the pipeline's own sigmas (`training_sigmas`)."""

    @property
    def denoiser_model(self) -> nn.Module:
        return self.backend.transformer

    def lora_root(self) -> LoRARoot:
        return LoRARoot(self.backend.transformer, "diffusers", "")

    def training_sigmas(self, steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The pipeline's schedule for this image size (SD3: the shifted grid; Flux: mu from the token count)."""
        return self.backend.default_sigmas(steps, height, width)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        from ..errors import ConfigError

        raise ConfigError(f"the offline-pair methods (Diffusion-DPO, NCP-DPO) do not train rectified-flow models ({self.arch})")

    def feature_module(self, where: str) -> nn.Module:
        from ..errors import ConfigError

        raise ConfigError(f"NCP-DPO reads UNet block features; {self.arch} is a rectified-flow transformer")
