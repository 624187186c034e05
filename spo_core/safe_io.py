"""Reading untrusted weight files and writing outputs atomically.

Rules of the pack: safetensors first; any pickle-based file (.bin/.pt/.ckpt/.pth) is loaded
with `weights_only=True` only, so a pickle carrying code is refused before anything runs;
outputs are written to a temporary file in the target folder and renamed into place, so a
crash never leaves a half-written file, and an existing file is never overwritten unless the
caller asks.

The safetensors writer streams one tensor at a time instead of building the whole file in
memory (the `safetensors` package serializes every tensor to bytes first, which doubles the
peak memory of a conversion).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from .errors import CorruptFileError, FileMissingError, OutputExistsError, UnsafeFileError

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}

_DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPE_TO_ST[getattr(torch, _name)] = _st
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}


def check_exists(path: str | os.PathLike, what: str = "file") -> Path:
    """Return `path` as a Path, or raise a FileMissingError that names it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileMissingError(f"{what} not found: {p}")
    return p


def is_safetensors(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SAFETENSORS_SUFFIXES


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Return (tensor infos, metadata) from a safetensors header without reading the data.

    Validates that the header is complete and that the file is as long as it says, so a
    truncated download is reported as such rather than failing later.
    """
    p = check_exists(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptFileError(f"{p} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CorruptFileError(
                f"{p} is truncated or not a safetensors file (header claims {n} bytes, "
                f"file has {size}). Download it again."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"{p} has a corrupt safetensors header: {exc}") from exc
    metadata = header.pop("__metadata__", None) or {}
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise CorruptFileError(
            f"{p} is truncated: its header describes {8 + n + end} bytes but the file has "
            f"{size}. Download or copy it again."
        )
    return header, metadata


def load_state_dict(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    unwrap: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a state dict and its metadata from a safetensors or (weights-only) pickle file.

    `unwrap` takes the tensors out of a top-level "state_dict" (Lightning .ckpt, HPS .pt)
    or "module" wrapper. Metadata is empty for pickles.
    """
    p = check_exists(path)
    if p.is_dir():
        raise CorruptFileError(f"{p} is a folder; expected a weights file")
    if is_safetensors(p) or _looks_like_safetensors(p):
        read_safetensors_header(p)  # clear errors for truncated files
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="pt", device=str(device)) as f:
                metadata = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as exc:
            raise CorruptFileError(f"cannot read {p}: {exc}") from exc
        return sd, metadata
    obj = load_pickle_weights_only(p, device)
    if unwrap and isinstance(obj, Mapping):
        for key in ("state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CorruptFileError(f"{p} does not hold a state dict (found {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if skipped:
        log.info("%s: ignored %d non-tensor entries (%s)", p.name, len(skipped), ", ".join(map(str, skipped[:5])))
    return sd, {}


def load_pickle_weights_only(path: Path, device: str | torch.device = "cpu"):
    """torch.load with weights_only=True; a pickle that needs code is refused unrun."""
    try:
        return torch.load(str(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"refused to load {path}: it is a pickle that contains more than tensors "
            f"(code or custom objects), and only weights-only loading is allowed. "
            f"Convert it to .safetensors with a tool you trust, or get a safetensors copy. "
            f"Detail: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CorruptFileError(f"cannot read {path} as a PyTorch file: {exc}") from exc


def _looks_like_safetensors(p: Path) -> bool:
    """Detect safetensors content behind an unusual suffix (e.g. a .lora file)."""
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(9)
        return len(head) == 9 and head[8:9] == b"{"
    except OSError:
        return False


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds.

    Refuses an existing `path` unless `overwrite`. The temporary file is removed on any error,
    so an interrupted write leaves nothing behind.
    """
    target = Path(path).expanduser()
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; pass overwrite (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".partial", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if target.exists() and not overwrite:  # created by someone else meanwhile
            raise OutputExistsError(f"{target} appeared while writing; not overwritten")
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_safetensors(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    fsync: bool = False,
) -> Path:
    """Write a safetensors file atomically, streaming one tensor at a time.

    `tensors` may be a mapping or a list of (name, tensor); tensors may live on any device.
    Values of `metadata` must be strings (the format's rule). The temp-file-and-rename makes
    the write atomic against a crashing or killed process; `fsync` also makes it durable
    against a power loss (training checkpoints use it; it costs a disk flush).
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    specs = [LazyTensor(name, t.dtype, tuple(t.shape), (lambda t=t: t)) for name, t in items]
    return save_safetensors_lazy(specs, path, metadata, overwrite, fsync)


class LazyTensor:
    """A tensor to be produced only when the writer reaches it (keeps peak memory at one tensor)."""

    __slots__ = ("name", "dtype", "shape", "produce")

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], produce):
        self.name, self.dtype, self.shape, self.produce = name, dtype, tuple(shape), produce


def save_safetensors_lazy(
    specs: Iterable[LazyTensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    fsync: bool = False,
) -> Path:
    """Write a safetensors file whose tensors are produced one by one while writing.

    Each produced tensor must have the announced dtype and shape (checked).
    """
    specs = list(specs)
    header: dict[str, object] = {}
    offset = 0
    for spec in specs:
        if spec.name in header:
            raise ValueError(f"duplicate tensor name {spec.name!r}")
        if spec.dtype not in _DTYPE_TO_ST:
            raise ValueError(f"tensor {spec.name!r} has unsupported dtype {spec.dtype}")
        numel = 1
        for d in spec.shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=spec.dtype).element_size()
        header[spec.name] = {"dtype": _DTYPE_TO_ST[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
        if bad:
            raise ValueError(f"safetensors metadata values must be strings: {bad}")
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for spec in specs:
                t = spec.produce()
                if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
                    raise ValueError(f"tensor {spec.name!r} is {t.dtype} {tuple(t.shape)}, announced {spec.dtype} {spec.shape}")
                if t.numel() == 0:
                    continue
                flat = t.detach().contiguous().reshape(-1).cpu()
                f.write(memoryview(flat.view(torch.uint8).numpy()))
                del t, flat
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise InvalidTensorError naming every tensor that holds NaN or inf."""
    from .errors import InvalidTensorError

    # a sum is finite iff every element is (barring overflow, re-checked exactly): ~30x faster than isfinite().all()
    suspects = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(torch.sum(v, dtype=torch.float32))]
    bad = [k for k in suspects if not torch.isfinite(tensors[k]).all()]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise InvalidTensorError(f"{what} contains NaN or inf values in {len(bad)} tensors: {shown}")
