"""Builders of LoRA state dicts in the formats other tools write, for the LoRA engine tests."""

from __future__ import annotations

import torch

from spo_core.lora.model import LoRA, LoRAModule
from spo_core.lora.tables import ModuleInfo, ModuleTable

SPO_ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def random_factors(info: ModuleInfo, rank: int, gen: torch.Generator, scale: float = 0.1):
    if info.kind == "conv":
        down = torch.randn((rank, *info.shape[1:]), generator=gen) * scale
        up = torch.randn((info.out_features, rank, 1, 1), generator=gen) * scale
    else:
        down = torch.randn((rank, info.in_features), generator=gen) * scale
        up = torch.randn((info.out_features, rank), generator=gen) * scale
    return down, up


def random_lora(table: ModuleTable, modules: list[ModuleInfo], rank: int = 4, alpha: float | None = None, seed: int = 0) -> LoRA:
    gen = torch.Generator().manual_seed(seed)
    lora = LoRA(table)
    for m in modules:
        down, up = random_factors(m, rank, gen)
        lora.modules[(m.component, m.name)] = LoRAModule(m, down, up, float(alpha if alpha is not None else rank))
    return lora


def spo_modules(table: ModuleTable) -> list[ModuleInfo]:
    """SPO's LoRA targets: to_q/k/v/out.0 of every UNet attention."""
    return [m for m in table.select(("unet",), ["attn"]) if m.name.endswith(SPO_ATTN)]


def kohya_default_modules(table: ModuleTable) -> list[ModuleInfo]:
    """kohya's default targets: all Linear/Conv of transformer blocks, plus text-encoder attention and MLP."""
    unet = [m for m in table.select(("unet",), ["attn", "ff", "proj"])]
    te = [m for m in table.select(("te1", "te2")) if m.kind == "linear" and m.name != "text_projection"]
    return unet + te


def deltas(lora: LoRA) -> dict:
    return {k: m.delta() for k, m in lora.modules.items()}


def assert_same_deltas(a: LoRA, b: LoRA, rel: float = 1e-6) -> None:
    assert set(a.modules) == set(b.modules), (set(a.modules) ^ set(b.modules))
    for k, m in a.modules.items():
        n = b.modules[k]
        if m.down.shape == n.down.shape and torch.equal(m.down.float(), n.down.float()):
            # conversions only rename and rescale `up`: compare the scaled factors (cheap, same result)
            ua, ub = m.up.float() * m.scale, n.up.float() * n.scale
            tol = rel * max(float(ua.abs().max()), 1e-12)
            assert float((ua - ub).abs().max()) <= tol, f"{k}: scaled up factors differ"
            continue
        da, db = m.delta(), n.delta()
        tol = rel * max(float(da.abs().max()), 1e-12)
        err = float((da - db).abs().max())
        assert err <= tol, f"{k}: max abs diff {err} > {tol}"
