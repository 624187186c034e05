"""Image preprocessing in torch, as each reward model was trained (differentiable).

Every scorer receives [B,3,H,W] images in [0,1] and brings them to its model's input here,
with that model's own conventions, because small differences (rounding of the resized size,
floor vs round when centering a crop, clamping before or after the bicubic overshoot) move
scores:

- `spm_pixels`: SPO's `get_preference_score`: bicubic `F.interpolate` without antialias so the
  shortest side is 224 (size `int(s * scale + 0.5)`), torchvision `CenterCrop` (offset
  `round((h - 224) / 2)`), clamp to [0,1] after resizing, CLIP normalization.
- `clip_processor_pixels`: transformers' `CLIPImageProcessor` (PickScore, CLIP score, the
  aesthetic predictor): shortest side to 224 (long side `int(224 * long / short)`), bicubic,
  crop offset `(h - 224) // 2`, normalization. The processor resizes with PIL (antialiased,
  on uint8); we resize the float tensor with antialiased bicubic, which agrees to within
  PIL's uint8 rounding (tested).
- `hps_pixels`: HPS v2's `ResizeMaxSize(224)`: the longest side to 224 (size `round(s * scale)`),
  black padding centered (`pad // 2` before), normalization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).reshape(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).reshape(1, 3, 1, 1)
    return (images - m) / s


def _bicubic(images: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=antialias)


def center_crop(images: torch.Tensor, size: int, rounding: str = "floor") -> torch.Tensor:
    """Crop the center size x size; `rounding` of the offset: 'floor' (transformers) or 'round' (torchvision)."""
    h, w = images.shape[-2:]
    if rounding == "round":
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return images[..., top: top + size, left: left + size]


def spm_pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[0,1] images -> the step-aware preference model's input, exactly as SPO's scoring code."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new = (int(h * scale + 0.5), int(w * scale + 0.5))
    images = _bicubic(images, new, antialias=False)
    if new[0] != new[1]:
        images = center_crop(images, size, rounding="round")
    return normalize(images.clamp(0, 1))


def clip_processor_pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[0,1] images -> CLIPImageProcessor's input (shortest side, center crop, normalize)."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new = (size, new_long) if h <= w else (new_long, size)
    images = _bicubic(images, new, antialias=True)
    images = center_crop(images, size, rounding="floor")
    return normalize(images.clamp(0, 1))


def hps_pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[0,1] images -> HPS v2's input: longest side to `size`, centered black padding, normalize."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new = (round(h * scale), round(w * scale))
    images = _bicubic(images, new, antialias=True).clamp(0, 1)
    pad_h, pad_w = size - new[0], size - new[1]
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return normalize(images)


PREPROCESSORS = {"spm": spm_pixels, "clip": clip_processor_pixels, "hps": hps_pixels}
