"""A cheap approximate decoder: latents -> RGB with one fixed linear map per latent space.

Scoring k candidates at every step with the full VAE can cost as much as the UNet itself;
for previews and for scorers that only need the rough layout and colours, a linear map of
the 4 latent channels to RGB (the factors ComfyUI's Latent2RGB previewer uses, from
`comfy/latent_formats.py`) costs next to nothing. The input is the model-space latent
(already multiplied by the VAE scaling factor: diffusers' latents, ComfyUI's `denoised`).
The result is upsampled to the size the VAE would give, so it honours the decoder contract
`decode(x0 [N,4,h,w]) -> images [N,3,H,W] in [0,1]`.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

# rows: latent channels; columns: R, G, B
_SD15 = ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
         [0.0, 0.0, 0.0])
_SDXL = ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
         [0.1084, -0.0175, -0.0011])

LATENT_RGB_FACTORS: dict[str, tuple[list[list[float]], list[float]]] = {
    "sd15": _SD15, "sd2": _SD15, "custom-sd1": _SD15,  # SD1.x and SD2.x share the VAE latent space
    "sdxl": _SDXL, "custom-sdxl": _SDXL,
}


class LatentRGBDecoder:
    """`decode(x0) -> images in [0,1]` by a linear latent -> RGB map, upsampled by `upscale`."""

    def __init__(self, arch: str = "sd15", upscale: int = 8, mode: str = "bilinear"):
        if arch not in LATENT_RGB_FACTORS:
            raise ConfigError(f"no latent -> RGB factors for {arch!r}; known: {', '.join(LATENT_RGB_FACTORS)}")
        if upscale < 1:
            raise ConfigError(f"upscale must be >= 1, got {upscale}")
        factors, bias = LATENT_RGB_FACTORS[arch]
        self.arch = arch
        self.factors = torch.tensor(factors, dtype=torch.float32)  # [4, 3]
        self.bias = torch.tensor(bias, dtype=torch.float32)  # [3]
        self.upscale = int(upscale)
        self.mode = mode

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if x0.ndim != 4 or x0.shape[1] != self.factors.shape[0]:
            raise ConfigError(f"expected latents [N,{self.factors.shape[0]},h,w], got {tuple(x0.shape)}")
        f = self.factors.to(x0.device)
        rgb = torch.einsum("nchw,cr->nrhw", x0.float(), f) + self.bias.to(x0.device).view(1, 3, 1, 1)
        if self.upscale > 1:
            rgb = torch.nn.functional.interpolate(rgb, scale_factor=self.upscale, mode=self.mode,
                                                  **({"align_corners": False} if self.mode in ("bilinear", "bicubic") else {}))
        return ((rgb + 1) / 2).clamp(0, 1)
