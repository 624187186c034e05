"""What a LoRA file holds, as a readable table and as JSON (for `spo lora inspect` and the UIs)."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .model import LoRA
from .read import metadata_arch

_BLOCK_ORDER = ("top", "down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks", "te1", "te2", "te3")
_SHOWN_METADATA = ("ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                   "modelspec.architecture", "modelspec.title", "ss_sd_model_name", "spo_method", "spo_base_model_hash")


@dataclass
class LoRAReport:
    source: str
    format: str
    arch: str
    claimed_arch: str | None
    components: list[str]
    modules: int
    diff_modules: int
    parameters: int
    ranks: dict[int, int]
    alphas: dict[float, int]
    dtypes: dict[str, int]
    blocks: dict[str, dict[str, int]]  # block -> layer group -> count
    metadata: dict[str, str]
    unmatched: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    file_mb: float | None = None

    @property
    def ok(self) -> bool:
        return not self.unmatched and not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["ranks"] = {str(k): v for k, v in self.ranks.items()}
        d["alphas"] = {f"{k:g}": v for k, v in self.alphas.items()}
        return d

    def summary_line(self) -> str:
        ranks = ", ".join(f"{r}" for r in sorted(self.ranks)) or "-"
        status = "all keys matched" if self.ok else f"{len(self.unmatched)} unmatched keys, {len(self.problems)} problems"
        return (f"{self.format} LoRA for {self.arch}: {self.modules} modules"
                f"{f' + {self.diff_modules} full diffs' if self.diff_modules else ''} "
                f"({', '.join(self.components)}), rank {ranks}; {status}")

    def to_text(self) -> str:
        lines = [f"file        {self.source}" + (f"  ({self.file_mb:.2f} MB)" if self.file_mb is not None else ""),
                 f"format      {self.format}",
                 f"base model  {self.arch}" + (f"  (metadata says {self.claimed_arch})" if self.claimed_arch and self.claimed_arch != self.arch else ""),
                 f"parts       {', '.join(self.components) or '-'}",
                 f"modules     {self.modules} LoRA" + (f", {self.diff_modules} full diff" if self.diff_modules else ""),
                 f"parameters  {self.parameters:,}  ({', '.join(f'{k} x{v}' for k, v in self.dtypes.items())})",
                 f"ranks       {', '.join(f'{r} (x{n})' for r, n in sorted(self.ranks.items())) or '-'}",
                 f"alphas      {', '.join(f'{a:g} (x{n})' for a, n in sorted(self.alphas.items())) or '-'}"]
        groups = sorted({g for b in self.blocks.values() for g in b})
        if self.blocks:
            width = max(len(b) for b in self.blocks) + 2
            lines.append("")
            lines.append("block".ljust(width) + "".join(g.rjust(8) for g in groups) + "total".rjust(8))
            for block, counts in self.blocks.items():
                lines.append(block.ljust(width) + "".join(str(counts.get(g, "")).rjust(8) for g in groups)
                             + str(sum(counts.values())).rjust(8))
        if self.metadata:
            lines.append("")
            lines += [f"{k:<24}{v}" for k, v in self.metadata.items()]
        for title, items in (("notes", self.notes), ("problems", self.problems), ("unmatched keys", self.unmatched)):
            if items:
                lines.append("")
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {x}" for x in items[:50]]
                if len(items) > 50:
                    lines.append(f"  ... and {len(items) - 50} more")
        lines.append("")
        lines.append(self.summary_line())
        return "\n".join(lines)


def _block_key(block: str) -> tuple:
    head, _, idx = block.partition(".")
    return (_BLOCK_ORDER.index(head) if head in _BLOCK_ORDER else 9, int(idx) if idx.isdigit() else 0)


def mixed_attention_alphas(lora: LoRA) -> list[str]:
    """Attention layers whose q/k/v/out modules carry different alphas. diffusers (0.42) scales all
    of an attention's modules by one of their alphas when it loads a kohya file, so those load
    mis-scaled there (x0.25 .. x4 measured); its own format has no alphas and loads exactly."""
    by_attention: dict[str, set] = defaultdict(set)
    for (comp, name), m in lora.modules.items():
        head, _, leaf = name.rpartition(".attn")
        if comp == "unet" and head and leaf[:1] in "12":
            by_attention[f"{head}.attn{leaf[:1]}"].add(round(m.alpha, 6))
    return sorted(k for k, alphas in by_attention.items() if len(alphas) > 1)


def report(lora: LoRA, source: str | os.PathLike | None = None) -> LoRAReport:
    blocks: dict[str, Counter] = defaultdict(Counter)
    dtypes: Counter = Counter()
    for m in lora.modules.values():
        blocks[m.info.block][m.info.group] += 1
        dtypes[str(m.down.dtype).replace("torch.", "")] += 1
    for d in lora.diffs.values():
        blocks[d.info.block]["diff"] += 1
    notes = list(lora.notes)
    mixed = mixed_attention_alphas(lora) if lora.source_format.startswith(("kohya", "lycoris", "comfy")) else []
    if mixed:
        notes.append(f"{len(mixed)} attention layers carry different alphas on their q/k/v/out modules (e.g. {mixed[0]}): "
                     "diffusers' load_lora_weights mis-scales such kohya files; for diffusers, give it the output of "
                     "`spo lora convert FILE OUT --to diffusers` (or --to peft), which loads exactly. ComfyUI and the WebUI "
                     "apply each alpha correctly")
    file_mb = None
    if source is not None and Path(source).is_file():
        file_mb = Path(source).stat().st_size / 1e6
    return LoRAReport(
        source=str(source) if source is not None else "(memory)",
        format=lora.source_format,
        arch=lora.arch if lora.modules or lora.diffs or not lora.problems else "unknown (no known model's shapes fit)",
        claimed_arch=metadata_arch(lora.metadata),
        components=lora.components(),
        modules=len(lora.modules),
        diff_modules=len(lora.diffs),
        parameters=lora.numel(),
        ranks=dict(sorted(lora.ranks().items())),
        alphas=dict(sorted(lora.alphas().items())),
        dtypes=dict(dtypes),
        blocks={b: dict(sorted(blocks[b].items())) for b in sorted(blocks, key=_block_key)},
        metadata={k: lora.metadata[k] for k in _SHOWN_METADATA if k in lora.metadata},
        unmatched=list(lora.unmatched),
        problems=list(lora.problems),
        notes=notes,
        file_mb=file_mb,
    )
