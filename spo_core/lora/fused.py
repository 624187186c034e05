"""Exact conversion between fused (BFL / MMDiT `qkv`, Flux `linear1`) and split (diffusers) LoRA layouts.

Split: a fused LoRA (down [r, in], up [rows, r]) becomes one LoRA per part with the same down and
that part's rows of up: rank stays r, every delta is the same matrix slice, nothing is rounded. A
block-diagonal up (written below from parts with their own downs) splits back into those parts'
own factors, so split -> fuse -> split is the identity, ranks included.

Fuse: parts whose downs, ranks and scales are identical (what a split gave) get that down back
and their ups stacked: bit-identical. Otherwise the downs are concatenated (rank = the sum) and
up is block-diagonal, so each part's delta is still exactly its own; a part missing from the
LoRA gets zero rows. Different alpha/rank scales are folded into up (fp32 round-off only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LoRAFormatError
from .model import DiffModule, LoRA, LoRAModule
from .tables import FusedGroup, ModuleInfo


@dataclass
class StoredModule:
    """A module as a file in the original (fused) layout stores it."""

    name: str  # original name (BFL / MMDiT / LDM)
    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def _rows(t: torch.Tensor, ranges) -> torch.Tensor:
    chunks = [t[a:b] for a, b in ranges]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def split_group(group: FusedGroup, down: torch.Tensor, up: torch.Tensor, alpha: float) -> list[LoRAModule]:
    """One LoRA per part of a fused weight (the caller checked up has `group.rows` rows). A block-diagonal
    up (what `fuse_group` writes for parts with their own downs, e.g. a LoRA trained on split q/k/v) gives
    each part back its own rank-r factors (trailing parts left at zero are left out); a dense up keeps
    the shared down, rank r for every part."""
    ups = [_rows(up, part.ldm_rows) for part in group.parts]
    blocks = _own_blocks(ups)
    if blocks is None:
        return [LoRAModule(part, down, u, alpha) for part, u in zip(group.parts, ups)]
    rank = down.shape[0]
    return [LoRAModule(part, down[cols], u[:, cols], alpha * (cols.stop - cols.start) / rank)
            for part, u, cols in zip(group.parts, ups, blocks) if cols is not None]


def _own_blocks(ups: list[torch.Tensor]) -> list[slice | None] | None:
    """Per part, its own column block of a block-diagonal fused up as `fuse_group` lays it out: the first n
    parts present in order, w = rank / n columns each, every part's non-zero columns inside its block, the
    parts after them all zero (None: left out). None when the up is not laid out that way (dense). The
    first rows of each part decide first, so a dense up costs a few rows, not a pass over the weights."""
    sample = _layout([u[:4] for u in ups])
    return None if sample is None else _layout(ups)


def _layout(ups: list[torch.Tensor]) -> list[slice | None] | None:
    rank = ups[0].shape[1]
    nonzero = [(u != 0).any(0).nonzero().flatten() for u in ups]
    if sum(len(nz) > 0 for nz in nonzero) < 2:
        return None  # one trained part (or none) cannot tell a block layout from a dense one
    for n in range(len(ups), 1, -1):
        if rank % n or any(len(nz) for nz in nonzero[n:]):
            continue
        w = rank // n
        if all(len(nz) == 0 or (int(nz[0]) >= i * w and int(nz[-1]) < (i + 1) * w) for i, nz in enumerate(nonzero[:n])):
            return [slice(i * w, (i + 1) * w) if i < n else None for i in range(len(ups))]
    return None


def split_diff(group: FusedGroup, diff: torch.Tensor | None, diff_b: torch.Tensor | None) -> list[DiffModule]:
    return [DiffModule(part, None if diff is None else _rows(diff, part.ldm_rows),
                       None if diff_b is None else _rows(diff_b, part.ldm_rows)) for part in group.parts]


def _same_down(mods: list[LoRAModule]) -> bool:
    first = mods[0]
    for m in mods[1:]:
        if m.down is first.down:
            continue
        if m.down.shape != first.down.shape or m.down.dtype != first.down.dtype or not torch.equal(m.down, first.down):
            return False
    return len({m.scale for m in mods}) == 1


def _place(t: torch.Tensor, part: ModuleInfo, rows: torch.Tensor, cols: slice | None = None) -> None:
    """Write a part's rows into the fused tensor at the part's row ranges (and columns, for ups)."""
    start = 0
    for a, b in part.ldm_rows:
        if cols is None:
            t[a:b] = rows[start:start + b - a]
        else:
            t[a:b, cols] = rows[start:start + b - a]
        start += b - a


def fuse_group(group: FusedGroup, mods: list[LoRAModule]) -> StoredModule:
    """The original-layout LoRA of a fused weight from (some of) its parts; exact, see the module docstring."""
    by_name = {m.info.name: m for m in mods}
    present = [by_name[p.name] for p in group.parts if p.name in by_name]
    if _same_down(present):
        first = present[0]
        up = first.up.new_zeros((group.rows, first.rank))
        for m in present:
            _place(up, m.info, m.up)
        return StoredModule(group.ldm, first.down, up, first.alpha)
    dtypes = {m.down.dtype for m in present} | {m.up.dtype for m in present}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    scales = {m.scale for m in present}
    total = sum(m.rank for m in present)
    down = torch.cat([m.down.to(dtype) for m in present])
    up = torch.zeros((group.rows, total), dtype=dtype)
    col = 0
    for m in present:
        rows = m.up.to(dtype) if len(scales) == 1 else (m.up.float() * m.scale).to(dtype)
        _place(up, m.info, rows, slice(col, col + m.rank))
        col += m.rank
    alpha = next(iter(scales)) * total if len(scales) == 1 else float(total)
    return StoredModule(group.ldm, down, up, alpha)


def _group_of(lora: LoRA, info: ModuleInfo) -> FusedGroup:
    return lora.table.groups[info.ldm]


def to_original_layout(lora: LoRA) -> list[StoredModule]:
    """Every transformer module under its original name, fused parts fused (flow archs' kohya/ComfyUI layout;
    the text encoders keep one name per module and are written by the caller)."""
    out: list[StoredModule] = []
    grouped: dict[str, list[LoRAModule]] = {}
    for m in lora.modules.values():
        if m.info.component != "transformer":
            continue
        if m.info.ldm is None:
            raise LoRAFormatError(f"module {m.info.component}:{m.info.name} has no original ({lora.table.family}) name; "
                                  "write this LoRA as diffusers or peft")
        if m.info.ldm_rows is None:
            out.append(StoredModule(m.info.ldm, m.down, m.up, m.alpha))
        else:
            grouped.setdefault(m.info.ldm, []).append(m)
    for ldm, mods in grouped.items():
        out.append(fuse_group(_group_of(lora, mods[0].info), mods))
    return out


def diffs_original_layout(lora: LoRA) -> list[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    """Full weight/bias differences under original names; fused parts stacked (zeros where a part is absent)."""
    out = []
    grouped: dict[str, list[DiffModule]] = {}
    for d in lora.diffs.values():
        if d.info.component != "transformer":
            continue
        if d.info.ldm is None:
            raise LoRAFormatError(f"module {d.info.component}:{d.info.name} has no original name; write it as diffusers")
        if d.info.ldm_rows is None:
            out.append((d.info.ldm, d.diff, d.diff_b))
        else:
            grouped.setdefault(d.info.ldm, []).append(d)
    for ldm, diffs in grouped.items():
        group = lora.table.groups[ldm]
        fused = []
        for attr in ("diff", "diff_b"):
            have = [d for d in diffs if getattr(d, attr) is not None]
            if not have:
                fused.append(None)
                continue
            sample = getattr(have[0], attr)
            t = sample.new_zeros((group.rows, *sample.shape[1:]))
            for d in have:
                _place(t, d.info, getattr(d, attr))
            fused.append(t)
        out.append((ldm, fused[0], fused[1]))
    return out

