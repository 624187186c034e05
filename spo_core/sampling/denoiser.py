"""The sigma-space denoiser: the one abstraction that makes ComfyUI, the WebUI and diffusers one.

A host supplies `denoise(x, sigma, cond) -> x0` with classifier-free guidance applied inside
(the host owns CFG, the negative prompt and the prediction type). Conditioning is opaque to
`spo_core` except that rows can be selected: pools of k candidates for B prompts are laid out
k-major (row j*B + b is candidate j of prompt b) and conditioned by `cond.take(arange(k*B) % B)`,
which is also how ComfyUI broadcasts its conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class Conditioning(Protocol):
    @property
    def batch_size(self) -> int: ...

    def take(self, index: torch.Tensor) -> "Conditioning": ...


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...


Decoder = Callable[[torch.Tensor], torch.Tensor]  # x0 latents [N,C,h,w] -> images [N,3,H,W] in [0,1]


@dataclass
class TensorConditioning:
    """Conditioning as named tensors sharing a batch dimension (diffusers backend, tests).

    `extra` holds values that are the same for every row (e.g. a guidance scale).
    """

    tensors: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def take(self, index: torch.Tensor) -> "TensorConditioning":
        index = torch.as_tensor(index, dtype=torch.long)
        return TensorConditioning({k: v[index.to(v.device)] for k, v in self.tensors.items()}, dict(self.extra))

    def to(self, device=None, dtype=None) -> "TensorConditioning":
        out = {}
        for k, v in self.tensors.items():
            out[k] = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
        return TensorConditioning(out, dict(self.extra))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def repeat_cond(cond: Conditioning, times: int) -> Conditioning:
    """Rows for `times` k-major copies of every row: index arange(times*B) % B."""
    b = cond.batch_size
    return cond.take(torch.arange(times * b) % b)


class CountingDenoiser:
    """Wraps a denoiser and counts evaluations in rows (one row = one sample through CFG) and calls."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.rows = 0
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self.rows += int(x.shape[0])
        self.calls += 1
        return self.denoiser(x, sigma, cond)

    def reset(self) -> None:
        self.rows = 0
        self.calls = 0


def call_denoiser(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
    """Evaluate with a per-row sigma tensor (scalars are broadcast)."""
    if cond.batch_size != x.shape[0]:
        raise ValueError(f"conditioning has {cond.batch_size} rows but x has {x.shape[0]}")
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    return denoiser(x, s, cond)
