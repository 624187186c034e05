"""A trainable LoRA network that attaches to a live host model through forward hooks.

Each targeted Linear / Conv2d module (any subclass: diffusers', ComfyUI's comfy.ops and
A1111's layers all subclass torch's) gets a hook that adds `multiplier * (alpha/r) * up(down(x))`
to the module's output. Nothing of the host changes: no parameter, no state-dict key, no copy
of the UNet. Setting the network's `multiplier` to 0 gives the frozen reference model exactly
(the hooks then return at once), which is how SPO and the DPO family get their reference.

Modules are named through the LoRA engine's `ModuleTable`, whether the host uses diffusers
names (our diffusers backend) or LDM names (ComfyUI, the WebUI), so the network converts to a
`spo_core.lora.LoRA` and saves in kohya/webui, diffusers or PEFT format via `save_lora`.

Factors follow kohya's shapes (linear: down [r, in], up [out, r]; conv: down [r, in, kh, kw]
with the host conv's stride/padding/dilation, up [out, r, 1, 1]) and are kept in float32; the
branch runs in the input's dtype (or autocast's), so fp16/bf16 hosts train fp32 LoRA weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, LoRAFormatError, ModelMismatchError
from ..lora.model import LoRA, LoRAModule
from ..lora.tables import ModuleInfo, ModuleTable

log = logging.getLogger(__name__)

SPO_ATTN_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")

# target sets: SPO's attention projections; + feed-forward and transformer in/out projections;
# + the convolutions and linears of resnets and the down/up samplers (kohya's LoCon set)
TARGET_SETS = {
    "attn": ("attn",),
    "attn+ff": ("attn", "ff", "proj"),
    "attn+ff+conv": ("attn", "ff", "proj", "resnet", "conv"),
}
TARGET_ALIASES = {"spo": "attn", "attention": "attn", "transformer": "attn+ff", "attn_ff": "attn+ff",
                  "all": "attn+ff+conv", "attn_ff_conv": "attn+ff+conv", "locon": "attn+ff+conv"}
INITS = ("gaussian", "kaiming")


@dataclass(frozen=True)
class LoRARoot:
    """Where a host's UNet lives and how its modules are named.

    `module` is searched with named_modules(); only names under `prefix` (e.g. "diffusion_model."
    inside ComfyUI's BaseModel) are considered, and the rest of each name is a diffusers module
    path (naming="diffusers") or an LDM/SGM path (naming="ldm").
    """

    module: nn.Module
    naming: str = "diffusers"
    prefix: str = ""


def resolve_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Groups of a target-set name (attn, attn+ff, attn+ff+conv, aliases) or a list of groups."""
    if isinstance(targets, str):
        key = TARGET_ALIASES.get(targets.strip().lower(), targets.strip().lower())
        if key in TARGET_SETS:
            return TARGET_SETS[key]
        groups = tuple(g.strip() for g in key.replace("+", ",").split(",") if g.strip())
    else:
        groups = tuple(targets)
    known = {"attn", "ff", "proj", "resnet", "conv"}
    bad = [g for g in groups if g not in known]
    if bad or not groups:
        raise ConfigError(
            f"unknown LoRA targets {targets!r}; use one of {', '.join(TARGET_SETS)} or a comma list of "
            f"groups from {', '.join(sorted(known))}"
        )
    return groups


def select_modules(table: ModuleTable, targets: str | Iterable[str]) -> list[ModuleInfo]:
    """The denoiser's modules a target set trains: SPO's 'attn' = to_q/k/v/out.0 of every UNet attention;
    on a flow transformer every attention projection, the context stream's too (Flow-GRPO's set: to_q/k/v,
    to_out.0, add_q/k/v_proj, to_add_out)."""
    groups = resolve_targets(targets)
    out = []
    for m in table.select((table.denoiser,), None):
        g = m.group
        if g == "attn" and "attn" in groups:
            if m.component == "transformer" or m.name.endswith(SPO_ATTN_SUFFIXES):
                out.append(m)
        elif g in ("ff", "proj", "resnet") and g in groups:
            out.append(m)
        elif g == "conv" and "conv" in groups and m.block != "top":  # samplers, not conv_in/conv_out (as kohya)
            out.append(m)
    return out


class LoRABranch(nn.Module):
    """The low-rank residual of one host module: (alpha/r) * up(down(x))."""

    def __init__(self, info: ModuleInfo, host: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.info = info
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        if isinstance(host, nn.Conv2d):
            if host.groups != 1 or host.padding_mode != "zeros":
                raise ConfigError(f"cannot attach a LoRA to grouped or non-zero-padded conv {info.name}")
            self.conv = True
            self.stride, self.padding, self.dilation = host.stride, host.padding, host.dilation
            kh, kw = host.kernel_size
            self.down = nn.Parameter(torch.zeros(rank, host.in_channels, kh, kw))
            self.up = nn.Parameter(torch.zeros(host.out_channels, rank, 1, 1))
        else:
            self.conv = False  # [out, in] of the table's module: a part of a fused host weight has fewer rows
            self.down = nn.Parameter(torch.zeros(rank, info.shape[1]))
            self.up = nn.Parameter(torch.zeros(info.shape[0], rank))

    def reset(self, init: str, generator: torch.Generator | None) -> None:
        """peft's initializations: gaussian (down ~ N(0, (1/r)^2)) or kaiming-uniform(a=sqrt 5); up = 0."""
        with torch.no_grad():
            if init == "gaussian":
                self.down.copy_(torch.randn(self.down.shape, generator=generator) / self.rank)
            elif init == "kaiming":
                fan_in = self.down[0].numel()
                gain = math.sqrt(2.0 / (1 + 5.0))  # kaiming_uniform_ with a = sqrt(5)
                bound = gain * math.sqrt(3.0 / fan_in)
                self.down.copy_(torch.rand(self.down.shape, generator=generator) * 2 * bound - bound)
            else:
                raise ConfigError(f"unknown LoRA init {init!r}; choose {' or '.join(INITS)}")
            self.up.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        down, up = self.down.to(dtype), self.up.to(dtype)
        if self.conv:
            h = F.conv2d(x, down, None, self.stride, self.padding, self.dilation)
            return F.conv2d(h, up) * self.scale
        return F.linear(F.linear(x, down), up) * self.scale


class LoRANetwork(nn.Module):
    """LoRA branches hooked onto a host's modules; `multiplier` scales all of them (0 = reference)."""

    def __init__(self, table: ModuleTable, root: LoRARoot, modules: list[ModuleInfo], rank: int = 4,
                 alpha: float | None = None, init: str = "gaussian", seed: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        if init not in INITS:
            raise ConfigError(f"unknown LoRA init {init!r}; choose {' or '.join(INITS)}")
        self.table = table
        self.root = root
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        self.init = init
        self.multiplier = 1.0
        hosts = find_host_modules(root, table, modules)
        missing = [m.name for m in modules if (m.component, m.name) not in hosts]
        if not hosts:
            raise ModelMismatchError(
                f"none of the {len(modules)} target modules was found in the host model (naming "
                f"{root.naming!r}, prefix {root.prefix!r}); is this an {table.arch} model?"
            )
        if missing:
            log.warning("LoRA: %d of %d target modules are not in the host model (first: %s)", len(missing),
                        len(modules), ", ".join(missing[:3]))
        self.missing = missing
        self.branches = nn.ModuleDict()
        self.infos: dict[str, ModuleInfo] = {}
        self._hosts: dict[str, nn.Module] = {}
        gen = torch.Generator().manual_seed(int(seed))
        for m in modules:  # table order: deterministic init
            key = (m.component, m.name)
            if key not in hosts:
                continue
            host = hosts[key]
            branch = LoRABranch(m, host, self.rank, self.alpha)
            branch.reset(init, gen)
            slot = _slot(m.name)
            self.branches[slot] = branch
            self.infos[slot] = m
            self._hosts[slot] = host
        if device is None:
            device = _module_device(next(iter(self._hosts.values())))
        self.to(device=device, dtype=dtype)
        self._handles: list = []
        self.attach()

    # -- hooks ------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        by_host: dict[int, list[str]] = {}
        for slot, host in self._hosts.items():
            by_host.setdefault(id(host), []).append(slot)
        for slots in by_host.values():
            host = self._hosts[slots[0]]
            if len(slots) == 1 and self.infos[slots[0]].shape[0] == host.weight.shape[0]:
                hook = self._make_hook(self.branches[slots[0]])
            else:
                hook = self._make_hook(_fused_delta([(self.branches[s], self.infos[s].ldm_rows) for s in slots],
                                                    int(host.weight.shape[0])))
            self._handles.append(host.register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        """Remove the hooks: the host is exactly as before."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _make_hook(self, delta_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        """A forward hook adding `multiplier * delta_of(input)` to the module's output (nothing at multiplier 0)."""
        net = self

        def hook(module, args, kwargs, output):
            m = net.multiplier
            if m == 0:
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            delta = delta_of(x)
            if m != 1:
                delta = delta * m
            return output + delta.to(output.dtype)

        return hook


    # -- the reference switch ------------------------------------------------------------------
    @contextlib.contextmanager
    def scaled(self, multiplier: float) -> Iterator[None]:
        old = self.multiplier
        self.multiplier = float(multiplier)
        try:
            yield
        finally:
            self.multiplier = old

    def disabled(self):
        """Context in which the host is the frozen base model (the reference)."""
        return self.scaled(0.0)

    def checkpoint_function(self) -> Callable:
        """A gradient-checkpointing function (diffusers' `gradient_checkpointing_func` signature)
        that recomputes a block with the multiplier it had in the forward pass, so a reference
        pass (multiplier 0) with grad and a policy pass can share one checkpointed model."""
        net = self

        def checkpoint(function, *args, **kwargs):
            captured = net.multiplier

            def context_fn():
                return contextlib.nullcontext(), net.scaled(captured)

            fn = function.__call__ if isinstance(function, nn.Module) else function
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

        return checkpoint

    # -- conversion ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def unbounded(self, limit: float) -> str | None:
        """None if every weight is finite and within +-limit, else which one is not (for the message)."""
        for name, p in self.named_parameters():
            peak = float(p.detach().abs().max()) if p.numel() else 0.0
            if not math.isfinite(peak) or peak > limit:
                return f"{name} reaches {peak:.3g}"
        return None

    def to_lora(self, metadata: dict[str, str] | None = None) -> LoRA:
        """The current weights as a `spo_core.lora.LoRA` (float32 CPU copies)."""
        lora = LoRA(self.table, metadata=dict(metadata or {}), source_format="training")
        for slot, branch in self.branches.items():
            info = self.infos[slot]
            lora.modules[(info.component, info.name)] = LoRAModule(
                info, branch.down.detach().float().cpu().clone(), branch.up.detach().float().cpu().clone(), branch.alpha)
        return lora

    def load_lora(self, lora: LoRA, strict: bool = True) -> int:
        """Copy the factors of an existing LoRA into the network (resume or start from a LoRA)."""
        loaded = 0
        by_key = {(i.component, i.name): slot for slot, i in self.infos.items()}
        problems = []
        for key, m in lora.modules.items():
            slot = by_key.get(key)
            if slot is None:
                problems.append(f"{key[1]}: not a trained module")
                continue
            branch = self.branches[slot]
            if m.rank != branch.rank:
                problems.append(f"{key[1]}: rank {m.rank}, network rank {branch.rank}")
                continue
            with torch.no_grad():
                branch.down.copy_(m.down.reshape(branch.down.shape))
                # keep the effective delta when the alphas differ
                branch.up.copy_(m.up.reshape(branch.up.shape).float() * (m.scale / branch.scale))
            loaded += 1
        if strict and (problems or loaded != len(self.branches)):
            absent = len(self.branches) - loaded
            raise LoRAFormatError(
                f"the LoRA does not fit the network ({loaded} of {len(self.branches)} modules loaded, "
                f"{absent} not in the file)" + ("".join(f"\n  {p}" for p in problems[:10]))
            )
        return loaded

    def factor_state(self) -> dict[str, torch.Tensor]:
        """Parameters keyed by module slot (for checkpoints)."""
        return {k: v.detach() for k, v in self.state_dict().items()}


def _fused_delta(parts: list[tuple[LoRABranch, tuple]], rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The delta of one module holding several table modules' rows (a fused q/k/v): each part's delta at its
    own row ranges of the output, zero for rows no part trains."""

    def delta_of(x: torch.Tensor) -> torch.Tensor:
        segments = []
        for branch, ranges in parts:
            delta = branch(x)
            start = 0
            for a, b in ranges:
                segments.append((a, b, delta[..., start:start + b - a]))
                start += b - a
        segments.sort(key=lambda seg: seg[0])
        pieces, at = [], 0
        for a, b, piece in segments:
            if a > at:
                pieces.append(piece.new_zeros(*piece.shape[:-1], a - at))
            pieces.append(piece)
            at = b
        if at < rows:
            pieces.append(pieces[-1].new_zeros(*pieces[-1].shape[:-1], rows - at))
        return torch.cat(pieces, dim=-1)

    return delta_of


def _slot(name: str) -> str:
    return name.replace(".", "__")


def _module_device(module: nn.Module) -> torch.device:
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.device.type != "meta":
        return w.device
    return torch.device("cpu")


def _is_linear_or_conv(mod: nn.Module) -> bool:
    """torch's Linear/Conv2d, or a host's own Linear with a 2-D weight (Forge's ForgeOperations.Linear
    is a plain Module holding `weight`, computing F.linear)."""
    if isinstance(mod, (nn.Linear, nn.Conv2d)):
        return True
    weight = getattr(mod, "weight", None)
    return type(mod).__name__ == "Linear" and isinstance(weight, torch.Tensor) and weight.ndim == 2


def find_host_modules(root: LoRARoot, table: ModuleTable, modules: Iterable[ModuleInfo]) -> dict[tuple[str, str], nn.Module]:
    """Map table modules to live host modules by the host's naming; shapes must agree."""
    wanted = {(m.component, m.name) for m in modules}
    found: dict[tuple[str, str], nn.Module] = {}
    prefix = root.prefix
    for name, mod in root.module.named_modules():
        if not name.startswith(prefix) or not _is_linear_or_conv(mod):
            continue
        rel = name[len(prefix):]
        if root.naming == "ldm":
            group = table.group(rel)
            if group is not None:  # a fused weight (ComfyUI's MMDiT/Flux qkv): its parts share this module
                _check_fused(rel, mod, group, table)
                found.update({(p.component, p.name): mod for p in group.parts if (p.component, p.name) in wanted})
                continue
            info = table.from_ldm(rel)
        elif root.naming == "diffusers":
            info = table.get(table.denoiser, rel)
        else:
            raise ConfigError(f"unknown module naming {root.naming!r}; use 'diffusers' or 'ldm'")
        if info is None or (info.component, info.name) not in wanted:
            continue
        shape = tuple(mod.weight.shape)
        if shape != info.shape:
            raise ModelMismatchError(
                f"module {rel} has weight shape {shape} but the {table.arch} table says {info.shape}; "
                "the model is not the architecture the LoRA is made for"
            )
        found[(info.component, info.name)] = mod
    return found


def _check_fused(rel: str, mod: nn.Module, group, table: ModuleTable) -> None:
    shape = tuple(mod.weight.shape)
    if shape[0] != group.rows or any(p.shape[1:] != shape[1:] for p in group.parts):
        raise ModelMismatchError(
            f"module {rel} has weight shape {shape} but the {table.arch} table fuses {group.rows} rows of "
            f"{group.parts[0].shape[1:]} there; the model is not the architecture the LoRA is made for")


def inject_lora(root: LoRARoot | nn.Module, table: ModuleTable, targets: str | Iterable[str] = "attn", rank: int = 4,
                alpha: float | None = None, init: str = "gaussian", seed: int = 0,
                device: torch.device | str | None = None) -> LoRANetwork:
    """Build a LoRANetwork on the target set of a host UNet (a diffusers UNet may be passed directly)."""
    if isinstance(root, nn.Module):
        root = LoRARoot(root, "diffusers", "")
    modules = select_modules(table, targets)
    if not modules:
        raise ModelMismatchError(f"the {table.arch} table has no module in target set {targets!r}")
    return LoRANetwork(table, root, modules, rank=rank, alpha=alpha, init=init, seed=seed, device=device)
