"""The in-memory LoRA every format is read into and written from.

A `LoRA` holds, per module of a `ModuleTable`, the low-rank factors in kohya's shape
convention (linear: down [r, in], up [out, r]; conv: down [r, in, kh, kw], up [out, r, 1, 1]),
Flux/SD3 transformers in diffusers' split layout (q, k, v apart; fused files are split on reading)
and an alpha, so that the module's weight delta is `(alpha / r) * up @ down`. Full weight
differences (`.diff`, `.diff_b`, as ComfyUI's trainer writes for norms and biases) are kept
beside them. Conversion between formats only renames keys; the factors are never touched
except to fold a LoCon `lora_mid` or to bake a scale into `up` for formats without alphas.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..errors import ConfigError, LoRAFormatError, ModelMismatchError
from .tables import COMPONENTS, ModuleInfo, ModuleTable


@dataclass
class LoRAModule:
    info: ModuleInfo
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """The weight delta (alpha/r) * up @ down, in the module's weight shape."""
        up = self.up.to(device=device, dtype=dtype).flatten(1)
        down = self.down.to(device=device, dtype=dtype).flatten(1)
        return (up @ down * self.scale).reshape(self.info.shape)

    def numel(self) -> int:
        return self.down.numel() + self.up.numel()


@dataclass
class DiffModule:
    """A full weight and/or bias difference (no low-rank structure)."""

    info: ModuleInfo
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None


@dataclass
class LoRA:
    table: ModuleTable
    modules: dict[tuple[str, str], LoRAModule] = field(default_factory=dict)
    diffs: dict[tuple[str, str], DiffModule] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "memory"
    unmatched: list[str] = field(default_factory=list)  # keys that name no module of the table
    problems: list[str] = field(default_factory=list)  # matched but unusable (shapes, missing halves)
    notes: list[str] = field(default_factory=list)  # harmless remarks (e.g. alpha assumed)
    # every factor / diff tensor was checked free of NaN and inf when read (set by read_lora; a writer then
    # re-checks only the tensors it computed, not views of these)
    values_checked: bool = False

    def checked_storages(self) -> set[int]:
        """Storage addresses of the tensors `values_checked` vouches for (none when it does not)."""
        if not self.values_checked:
            return set()
        tensors = [t for m in self.modules.values() for t in (m.down, m.up)]
        tensors += [t for d in self.diffs.values() for t in (d.diff, d.diff_b) if t is not None]
        return {t.untyped_storage().data_ptr() for t in tensors}

    @property
    def arch(self) -> str:
        return self.table.arch

    def ranks(self) -> Counter:
        return Counter(m.rank for m in self.modules.values())

    def alphas(self) -> Counter:
        return Counter(round(m.alpha, 6) for m in self.modules.values())

    def components(self) -> list[str]:
        comps = {c for c, _ in self.modules} | {c for c, _ in self.diffs}
        return [c for c in COMPONENTS if c in comps]

    def numel(self) -> int:
        return sum(m.numel() for m in self.modules.values()) + sum(
            (d.diff.numel() if d.diff is not None else 0) + (d.diff_b.numel() if d.diff_b is not None else 0)
            for d in self.diffs.values()
        )

    def is_clean(self) -> bool:
        return not self.unmatched and not self.problems

    def require_clean(self, allow_partial: bool = False, what: str = "LoRA") -> None:
        """Raise unless every key of the file was used (or the caller accepts a partial match)."""
        if not self.modules and not self.diffs:
            raise LoRAFormatError(f"{what}: no key matches any module of {self.arch}" + _listing(self.unmatched))
        if self.problems:
            raise LoRAFormatError(f"{what}: {len(self.problems)} modules cannot be used:" + _listing(self.problems))
        if self.unmatched and not allow_partial:
            raise LoRAFormatError(
                f"{what}: {len(self.unmatched)} keys match no module of {self.arch} (partial match; "
                f"allow partial loading to use the {len(self.modules) + len(self.diffs)} modules that matched):"
                + _listing(self.unmatched)
            )

    def ensure_arch(self, model_arch: str, what: str = "this LoRA") -> None:
        """Refuse to apply a LoRA made for another base model (e.g. an SDXL LoRA on SD1.5)."""
        if model_arch != self.arch:
            raise ModelMismatchError(
                f"{what} is made for {self.arch} but the model is {model_arch}: its layers have other "
                f"names and sizes, so it cannot be applied. Use a LoRA trained for {model_arch}."
            )

    def only(self, components: Iterable[str]) -> "LoRA":
        """A copy holding only the modules of `components` (e.g. a Flux LoRA's transformer part, for a
        transformer-only checkpoint); an unknown or absent component is refused by name."""
        keep = list(components)
        unknown = [c for c in keep if c not in self.components()]
        if unknown:
            raise ConfigError(f"this LoRA has no {', '.join(unknown)} modules; it has {', '.join(self.components())}")
        out = LoRA(self.table, metadata=dict(self.metadata), source_format=self.source_format)
        out.modules = {k: m for k, m in self.modules.items() if k[0] in keep}
        out.diffs = {k: d for k, d in self.diffs.items() if k[0] in keep}
        return out

    def scaled(self, factor: float) -> "LoRA":
        """A copy whose every delta is multiplied by `factor` (scales alpha; diffs scaled)."""
        out = LoRA(self.table, metadata=dict(self.metadata), source_format=self.source_format)
        for k, m in self.modules.items():
            out.modules[k] = LoRAModule(m.info, m.down, m.up, m.alpha * factor)
        for k, d in self.diffs.items():
            out.diffs[k] = DiffModule(d.info, None if d.diff is None else d.diff * factor, None if d.diff_b is None else d.diff_b * factor)
        return out


def _listing(items: list[str], limit: int = 12) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n  " + shown + more if items else ""
