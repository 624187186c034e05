"""A WebUI-like loaded model over a tiny diffusers pipeline, for the stand-in `modules`.

`make_cfg_denoiser()` gives what A1111 hands a sampler function: a CFG denoiser that takes
exactly the batch's rows (its conditioning is per image: more rows fail, as in the real
`CFGDenoiser.forward`), counts its calls in `step`, and returns the guided x0.
"""

from __future__ import annotations

import torch

from spo_core.backends import DiffusersBackend
from spo_core.sampling import TensorConditioning


class StubCFGDenoiser:
    def __init__(self, model: "StubSDModel"):
        self.model = model
        self.p = None
        self.step = 0
        self.steps_seen: list[int] = []
        self.inner_model = type("Inner", (), {"sigmas": model.backend.schedule.sigmas.float()})()

    def __call__(self, x, sigma, cond=None, uncond=None, cond_scale=7.0, s_min_uncond=0.0, image_cond=None):
        if x.shape[0] != cond.shape[0] or x.shape[0] != uncond.shape[0] or sigma.shape[0] != x.shape[0]:
            raise RuntimeError(f"The size of tensor a ({x.shape[0]}) must match the size of tensor b ({cond.shape[0]})")
        self.steps_seen.append(self.step)
        c = TensorConditioning({"cond": cond, "uncond": uncond})
        out = self.model.backend.denoiser(cond_scale)(x, sigma, c)
        self.step += 1
        return out


class StubSDModel:
    is_sd1 = True
    is_sd2 = False
    is_sdxl = False

    def __init__(self, pipe):
        self.backend = DiffusersBackend(pipe)
        self.sd_checkpoint_info = type("Info", (), {"title": "tiny-sd15 [stub]"})()

    def make_cfg_denoiser(self) -> StubCFGDenoiser:
        return StubCFGDenoiser(self)

    def get_sigmas(self, steps: int) -> torch.Tensor:
        return self.backend.schedule.karras_sigmas(steps)

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.backend.decode(z) * 2 - 1
