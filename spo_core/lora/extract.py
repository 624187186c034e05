"""Extract a LoRA from a fine-tuned model against its base by truncated SVD of the difference.

For every targeted module, `diff = W_tuned - W_base` is factorized as `up @ down` with
`up = U_r S_r`, `down = V_r^T` and alpha = r (scale 1). The rank is fixed, or chosen per
layer as the smallest that keeps a fraction of the difference's energy (squared Frobenius
norm) under a cap. Full SVD (`torch.linalg.svd`) or randomized SVD (`torch.svd_lowrank`,
much faster at low rank). Layers whose difference is below a threshold are skipped; the
report gives each layer's rank and retained energy. This is how a LoRA is recovered from
the SPO-SDXL release, which is a full merged UNet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Protocol

import torch

from ..errors import ConfigError, ModelMismatchError
from ..progress import CancelFn, ProgressFn, Reporter
from .model import LoRA, LoRAModule
from .tables import TEXT_ENCODERS, ModuleInfo, ModuleTable

log = logging.getLogger(__name__)

# kohya's default LoRA targets: every Linear/Conv of the transformer blocks
DEFAULT_GROUPS = ("attn", "ff", "proj")


class WeightSource(Protocol):
    table: ModuleTable

    def weight(self, component: str, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None: ...


class StateDictSource:
    """A WeightSource over in-memory state dicts keyed by canonical names (e.g. a live diffusers UNet)."""

    def __init__(self, table: ModuleTable, state_dicts: dict[str, dict[str, torch.Tensor]]):
        self.table = table
        self.state_dicts = state_dicts

    def weight(self, component: str, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        sd = self.state_dicts.get(component)
        if sd is None:
            return None
        t = sd.get(name + ".weight")
        if t is None and component != "unet" and name.startswith("text_model."):
            t = sd.get(name[len("text_model."):] + ".weight")  # transformers 5 flattened CLIPTextModel
        return None if t is None else t.to(dtype)


@dataclass
class LayerResult:
    component: str
    name: str
    rank: int
    retained_energy: float  # fraction of ||diff||_F^2 kept
    diff_norm: float


@dataclass
class ExtractReport:
    arch: str
    method: str
    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # below the threshold
    seconds: float = 0.0
    text_encoders: bool = False

    @property
    def mean_retained_energy(self) -> float:
        return sum(x.retained_energy for x in self.layers) / max(len(self.layers), 1)

    @property
    def total_retained_energy(self) -> float:
        """Energy kept over all layers together (weighted by each layer's difference norm)."""
        total = sum(x.diff_norm ** 2 for x in self.layers)
        kept = sum(x.retained_energy * x.diff_norm ** 2 for x in self.layers)
        return kept / total if total > 0 else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_retained_energy"] = self.mean_retained_energy
        d["total_retained_energy"] = self.total_retained_energy
        return d

    def to_text(self, limit: int = 40) -> str:
        lines = [f"{'module':<72}{'rank':>6}{'energy':>9}"]
        for x in sorted(self.layers, key=lambda r: r.retained_energy)[:limit]:
            lines.append(f"{x.component + ':' + x.name:<72}{x.rank:>6}{x.retained_energy:>9.4f}")
        if len(self.layers) > limit:
            lines.append(f"... {len(self.layers) - limit} more layers (lowest retained energy shown first)")
        lines.append(
            f"{len(self.layers)} layers extracted ({self.method} SVD, {self.seconds:.1f} s), {len(self.skipped)} skipped as "
            f"unchanged; retained energy: mean per layer {self.mean_retained_energy:.4f}, overall {self.total_retained_energy:.4f}"
        )
        return "\n".join(lines)


def factorize(diff: torch.Tensor, rank: int | None, energy: float | None, method: str = "randomized",
              oversample: int = 8, niter: int = 2) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up [out, r], down [r, in], retained energy) for a 2-D difference matrix."""
    m, n = diff.shape
    full_rank = min(m, n)
    cap = min(rank or full_rank, full_rank)
    total = float(diff.pow(2).sum())
    if total == 0.0:
        return diff.new_zeros(m, 1), diff.new_zeros(1, n), 1.0
    if method == "full" or cap + oversample >= full_rank:
        U, S, Vh = torch.linalg.svd(diff, full_matrices=False)
    elif method == "randomized":
        q = min(cap + oversample, full_rank)
        U, S, V = torch.svd_lowrank(diff, q=q, niter=niter)
        Vh = V.T
    else:
        raise ConfigError(f"unknown SVD method {method!r}; use 'full' or 'randomized'")
    energies = S.pow(2)
    if energy is not None:
        cum = torch.cumsum(energies, 0) / total
        reached = torch.nonzero(cum >= energy - 1e-12)
        r = int(reached[0]) + 1 if len(reached) else len(S)
        r = max(1, min(r, cap))
    else:
        r = cap
    up = U[:, :r] * S[:r]
    down = Vh[:r]
    retained = float(energies[:r].sum()) / total
    return up, down, min(retained, 1.0)


def extract_lora(
    base: WeightSource,
    tuned: WeightSource,
    rank: int | None = 32,
    energy: float | None = None,
    groups: Iterable[str] = DEFAULT_GROUPS,
    text_encoders: bool | str = "auto",
    conv_rank: int | None = None,
    method: str = "randomized",
    min_diff: float = 1e-6,
    te_min_diff: float = 1e-2,
    clamp_quantile: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> tuple[LoRA, ExtractReport]:
    """Extract a LoRA (see the module docstring).

    `rank`: fixed rank, or the cap when `energy` (0..1] picks a per-layer rank. `groups`: UNet
    layer groups (attn, ff, proj, resnet, conv, embed; Flux/SD3 transformers: attn, ff, proj, mod, embed). 3x3 convs are included only with
    `conv_rank`. `text_encoders`: True, False, or "auto" (only if they differ by more than
    `te_min_diff`, as kohya does). `min_diff`: skip layers whose max |diff| is below it.
    `clamp_quantile`: kohya's outlier clamp of the factors (off by default: it breaks exactness).
    """
    if rank is None and energy is None:
        raise ConfigError("give a rank, an energy fraction, or both (the rank then caps the energy choice)")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy}")
    if base.table.arch != tuned.table.arch:
        raise ModelMismatchError(f"base is {base.table.arch} but the fine-tuned model is {tuned.table.arch}: they must be the same architecture")
    table = base.table
    groups = set(groups)
    if conv_rank:
        groups |= {"resnet", "conv"}
    targets: list[ModuleInfo] = [m for m in table.select((table.denoiser,), groups) if m.kind != "conv" or m.shape[2] == 1 or conv_rank]
    te_targets = [m for m in table.select(TEXT_ENCODERS) if m.kind == "linear" and m.name != "text_projection"]

    include_te = text_encoders is True
    if text_encoders == "auto" and te_targets:
        include_te = any(_max_diff(base, tuned, m) > te_min_diff for m in te_targets if base.weight(m.component, m.name) is not None)
        if not include_te:
            log.info("text encoders are the same (max |diff| <= %g): extracting the UNet only", te_min_diff)
    if include_te:
        targets += te_targets

    report = ExtractReport(table.arch, method, text_encoders=include_te)
    lora = LoRA(table, source_format="extracted")
    reporter = Reporter("extract", len(targets), progress, cancel)
    start = time.perf_counter()
    for i, info in enumerate(targets):
        w0 = base.weight(info.component, info.name)
        w1 = tuned.weight(info.component, info.name)
        if w0 is None or w1 is None:
            report.skipped.append(f"{info.component}:{info.name} (missing in {'base' if w0 is None else 'tuned'})")
            continue
        if w0.shape != w1.shape:
            raise ModelMismatchError(f"{info.component}:{info.name}: base {list(w0.shape)} vs tuned {list(w1.shape)}")
        diff = (w1.to(device, dtype) - w0.to(device, dtype)).flatten(1)
        peak = float(diff.abs().max())
        if peak <= min_diff:
            report.skipped.append(f"{info.component}:{info.name}")
            reporter.update(i + 1, info.name)
            continue
        r = conv_rank if (info.kind == "conv" and info.shape[2] > 1) else rank
        up, down, retained = factorize(diff, r, energy, method)
        if clamp_quantile is not None:
            hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs().float(), clamp_quantile)
            up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
        k = down.shape[0]
        if info.kind == "conv":
            down = down.reshape(k, *info.shape[1:])
            up = up.reshape(info.shape[0], k, 1, 1)
        lora.modules[(info.component, info.name)] = LoRAModule(info, down.contiguous().cpu(), up.contiguous().cpu(), float(k))
        report.layers.append(LayerResult(info.component, info.name, k, retained, float(diff.norm())))
        reporter.update(i + 1, info.name, energy=retained)
    report.seconds = time.perf_counter() - start
    if not lora.modules:
        raise ConfigError(
            f"the two models do not differ in any of the {len(targets)} targeted layers (max |difference| <= {min_diff:g}): "
            "nothing to extract. Did you give the same model twice?")
    lora.metadata["spo_extracted"] = f"{method} svd, " + (f"energy {energy}" if energy else f"rank {rank}")
    return lora, report


def _max_diff(base: WeightSource, tuned: WeightSource, info: ModuleInfo) -> float:
    a, b = base.weight(info.component, info.name), tuned.weight(info.component, info.name)
    if a is None or b is None:
        return 0.0
    return float((b.float() - a.float()).abs().max())
