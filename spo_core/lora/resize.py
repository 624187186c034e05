"""Change a LoRA's rank by SVD of each module's delta, without forming the full delta.

`up @ down` has rank <= r, so with thin QR factorizations up = Qu Ru and down^T = Qd Rd its
SVD comes from the r x r core `Ru Rd^T`: exact, and cheap even for SDXL-size modules.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .model import LoRA, LoRAModule


def _resize_module(m: LoRAModule, rank: int | None, energy: float | None) -> tuple[LoRAModule, float]:
    up = m.up.float().flatten(1)  # [out, r]
    down = m.down.float().flatten(1)  # [r, in]
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    core = (ru @ rd.T) * m.scale
    u, s, vh = torch.linalg.svd(core)
    energies = s.pow(2)
    total = float(energies.sum())
    k = min(rank or len(s), len(s))
    if energy is not None and total > 0:
        cum = torch.cumsum(energies, 0) / total
        reached = torch.nonzero(cum >= energy - 1e-12)
        k = min(k, int(reached[0]) + 1 if len(reached) else len(s))
    k = max(k, 1)
    new_up = (qu @ u[:, :k]) * s[:k]
    new_down = vh[:k] @ qd.T
    retained = float(energies[:k].sum()) / total if total > 0 else 1.0
    if m.info.kind == "conv":
        new_up = new_up.reshape(m.info.shape[0], k, 1, 1)
        new_down = new_down.reshape(k, *m.info.shape[1:])
    dtype = m.up.dtype
    return LoRAModule(m.info, new_down.to(dtype).contiguous(), new_up.to(dtype).contiguous(), float(k)), retained


def resize_lora(lora: LoRA, rank: int | None = None, energy: float | None = None) -> tuple[LoRA, dict[str, float]]:
    """A new LoRA of rank `rank` (or per module the smallest rank keeping `energy` of each
    delta's squared norm, capped by `rank`). Returns it and the retained energy per module."""
    if rank is None and energy is None:
        raise ConfigError("give a new rank, an energy fraction, or both")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy}")
    out = LoRA(lora.table, metadata=dict(lora.metadata), source_format=lora.source_format, diffs=dict(lora.diffs))
    retained = {}
    for key, m in lora.modules.items():
        out.modules[key], retained[f"{key[0]}:{key[1]}"] = _resize_module(m, rank, energy)
    return out, retained
