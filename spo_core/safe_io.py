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

from .errors import CorruptFileError, FileMissingError, OutputError, OutputExistsError, SPOError, UnsafeFileError

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


# -- reading safetensors -------------------------------------------------------------------------

_HEADER_LIMIT = 100_000_000


def _element_size(st_dtype: str) -> int:
    return torch.empty((), dtype=_ST_TO_DTYPE[st_dtype]).element_size()


def _validate_header(p: Path, header: object, data_size: int) -> tuple[dict[str, dict], dict[str, str]]:
    """Check every entry of a parsed header against the format (the parser only checked the JSON)."""
    def bad(why: str) -> CorruptFileError:
        return CorruptFileError(f"{p} has a corrupt safetensors header: {why}")

    if not isinstance(header, dict):
        raise bad(f"expected a JSON object, found {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is {type(info).__name__}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_TO_DTYPE:
            raise bad(f"entry {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"entry {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(f"entry {name!r} has invalid data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * _element_size(dtype):
            raise bad(f"entry {name!r}: {offsets[1] - offsets[0]} bytes for {dtype} {shape}")
        if offsets[1] > data_size:
            raise CorruptFileError(
                f"{p} is truncated: its header describes {offsets[1]} bytes of data but the file holds "
                f"{data_size}. Download or copy it again.")
    return header, metadata


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Return (tensor infos, metadata) from a safetensors header without reading the data.

    Validates the whole header (every entry's dtype, shape and offsets) and that the file is as
    long as it says, so a truncated download or a damaged file is reported as such rather than
    failing later inside a reader.
    """
    p = check_exists(path)
    if p.is_dir():
        raise CorruptFileError(f"{p} is a folder; expected a weights file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptFileError(f"{p} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > _HEADER_LIMIT:
            raise CorruptFileError(
                f"{p} is truncated or not a safetensors file (header claims {n} bytes, "
                f"file has {size}). Download it again."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CorruptFileError(f"{p} has a corrupt safetensors header: {exc}") from exc
    return _validate_header(p, header, size - 8 - n)


class _SafetensorsFile:
    """What both readers share: the validated header, and tensors by name."""

    header: dict[str, dict]
    _metadata: dict[str, str]

    def keys(self) -> list[str]:
        return list(self.header)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _MmapSafetensors(_SafetensorsFile):
    """A safetensors reader over mmap for paths the Rust library refuses (names that are not UTF-8).

    The header is validated by `read_safetensors_header`; tensors are views of the mapped file.
    """

    def __init__(self, path: Path):
        import mmap

        self.header, self._metadata = read_safetensors_header(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self._base = 8 + n
            size = os.fstat(f.fileno()).st_size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""

    def get_tensor(self, key: str) -> torch.Tensor:
        info = self.header[key]
        dtype, shape = _ST_TO_DTYPE[info["dtype"]], tuple(info["shape"])
        start, end = info["data_offsets"]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - start, offset=self._base + start)
        return flat.view(dtype).reshape(shape)


class _RustSafetensors(_SafetensorsFile):
    """safetensors' own memory-mapped reader, with every error turned into a CorruptFileError."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.header, self._metadata = read_safetensors_header(path)
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # SafetensorError and friends
            raise CorruptFileError(f"cannot read {path}: {exc}") from exc

    def get_tensor(self, key: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise CorruptFileError(f"cannot read tensor {key!r} of {self.path}: {exc}") from exc


def open_safetensors(path: str | os.PathLike):
    """A memory-mapped safetensors reader (keys, metadata, get_tensor, shape) over a validated header."""
    p = Path(path)
    try:
        os.fsencode(p).decode("utf-8")
    except UnicodeDecodeError:
        return _MmapSafetensors(p)
    return _RustSafetensors(p)


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
        f = open_safetensors(p)
        sd = {k: f.get_tensor(k) for k in f.keys()}
        if str(device) != "cpu":
            sd = {k: v.to(device) for k, v in sd.items()}
        return sd, f.metadata()
    obj = load_pickle_weights_only(p, device)
    if unwrap and isinstance(obj, Mapping):
        for key in ("state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CorruptFileError(f"{p} does not hold a state dict (found {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    skipped = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if skipped:
        log.info("%s: ignored %d non-tensor entries (%s)", p.name, len(skipped), ", ".join(map(str, skipped[:5])))
    return sd, {}


# -- reading pickles (weights only) ----------------------------------------------------------------

# what torch's weights-only unpickler is built to allow (plain containers and tensor rebuilding)
_PLAIN_GLOBALS = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray",
                  "_codecs.encode")
_MAX_INFLATE = 64 << 20  # bytes a zip's entries may exceed twice the file's size by


def _file_kind(p: Path) -> str:
    """'zip' (PyTorch's format since 1.6), 'pickle' (legacy torch.save / plain pickle) or 'other'."""
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    return "other"


def _check_zip(p: Path) -> None:
    """Refuse a damaged zip, and one whose entries would inflate far beyond its size (a zip bomb),
    before torch allocates anything."""
    import zipfile

    size = p.stat().st_size
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except Exception as exc:  # BadZipFile, struct.error, ValueError ...: a damaged archive
        raise CorruptFileError(f"{p} is a damaged zip archive, not a readable PyTorch file ({type(exc).__name__})") from exc
    inflated = sum(max(i.file_size, 0) for i in infos)
    if inflated > 2 * size + _MAX_INFLATE:
        raise CorruptFileError(
            f"refused {p}: its entries would inflate to {inflated / 1e6:,.0f} MB from a {size / 1e6:,.1f} MB file "
            "(PyTorch stores weights uncompressed; this is damaged or a zip bomb)")
    if not any(i.filename.endswith("data.pkl") for i in infos):
        raise CorruptFileError(f"{p} is a zip archive but not a PyTorch weights file (no data.pkl inside)")


def _pickle_globals(p: Path, kind: str) -> list[str] | None:
    """The globals (module.name) a pickle references, read without running it; None if unreadable."""
    import pickletools

    if kind == "zip":
        import zipfile

        try:
            with zipfile.ZipFile(p) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                data = z.read(name)
        except Exception:
            return None
        streams = [data]
    else:
        with open(p, "rb") as f:
            streams = [f.read(64 << 20)]
    found: list[str] = []
    strings: list[str] = []
    for data in streams:
        pos = 0
        try:
            while pos < len(data):  # a legacy torch file is several pickles in a row
                last = None
                for op, arg, at in pickletools.genops(data[pos:]):
                    last = at
                    if op.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                        strings.append(arg)
                pos += (last or 0) + 1
        except Exception:  # not (or no longer) a pickle: what was found so far is the answer
            if not found and pos == 0:
                return None
    return found


def _torch_detail(exc: BaseException) -> str:
    """The first line of torch's message, unless it is advice about unsafe loading."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return "" if "weights_only" in text or "Weights only" in text else text[:200]


def load_pickle_weights_only(path: Path, device: str | torch.device = "cpu", mmap: bool = False):
    """torch.load with weights_only=True; a pickle that needs code is refused unrun.

    Before torch sees the file: anything that is neither a zip nor a pickle is named as not a
    weights file, and a zip whose entries would inflate far beyond its size is refused, so a zip
    bomb never allocates. Errors never repeat torch's advice to load unsafely.
    """
    path = Path(path)
    kind = _file_kind(path)
    if kind == "other":
        raise CorruptFileError(
            f"{path} is not a weights file: neither safetensors nor a PyTorch checkpoint (zip or pickle)")
    if kind == "zip":
        _check_zip(path)
    try:
        if mmap and kind == "zip":
            return torch.load(str(path), map_location=device, weights_only=True, mmap=True)
        return torch.load(str(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        refs = _pickle_globals(path, kind)
        custom = sorted({g for g in refs or () if not g.startswith(_PLAIN_GLOBALS)})
        if custom:
            raise UnsafeFileError(
                f"refused to load {path}: it is a pickle that references code or custom objects "
                f"({', '.join(custom[:6])}); only plain tensors may be loaded, and nothing was run. "
                "Ask its publisher for a .safetensors copy."
            ) from exc
        raise CorruptFileError(f"{path} is damaged or not a PyTorch weights file"
                               + (f" ({_torch_detail(exc)})" if _torch_detail(exc) else "")) from exc
    except MemoryError as exc:
        raise CorruptFileError(f"{path} asks for more memory than this machine has: damaged or not a weights file") from exc
    except Exception as exc:  # RuntimeError, EOFError, ValueError, KeyError ...: a damaged file
        detail = _torch_detail(exc)
        raise CorruptFileError(f"cannot read {path} as a PyTorch file" + (f": {detail}" if detail else "")) from exc


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


# -- writing -------------------------------------------------------------------------------------------


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _honour_umask(path: Path, folder: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700; give outputs the permissions any other new file gets
    (0644/0755 under umask 022), so a host running as another user can read them."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_UMASK)


def _output_error(target: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if getattr(exc, "filename", None) and str(exc.filename) != str(target) else ""
    return OutputError(f"cannot write {target}: {reason}{where}")


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(child: Path, parent: Path) -> bool:
    c, p = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return c != p and p in c.parents


def check_output_path(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                      folder: bool = False, create_parent: bool = False) -> Path:
    """Refuse an output that would destroy an input or cannot be written, before any work is done.

    Refused: an output that is an input, lies inside one (a model folder) or contains one; a file
    output where a folder exists (and the reverse); a missing parent folder unless `create_parent`.
    """
    out = Path(output).expanduser()
    for item in inputs:
        if item is None:
            continue
        inp = Path(item).expanduser()
        if _same_path(out, inp):
            raise OutputError(f"the output {out} is the input {inp}: write to a new path (nothing was changed)")
        if _inside(out, inp):
            raise OutputError(f"the output {out} lies inside the input {inp}: write it somewhere else")
        if _inside(inp, out):
            raise OutputError(f"the output {out} contains the input {inp}: replacing it would delete the input")
    if out.is_dir() and not folder:
        raise OutputError(f"{out} is a folder: give a file name for the output (e.g. {out / 'name.safetensors'})")
    if out.exists() and not out.is_dir() and folder:
        raise OutputError(f"{out} is a file, and this output is a folder: give a folder name")
    parent = out.parent
    if not parent.exists():
        if not create_parent:
            raise OutputError(f"the folder {parent} does not exist: create it first, or check the output path")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _output_error(out, exc) from exc
    elif not parent.is_dir():
        raise OutputError(f"{parent} is not a folder, so {out} cannot be written")
    return out


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds.

    Refuses an existing `path` unless `overwrite`, and a folder in its place. The temporary file
    is removed on any error, so an interrupted write leaves nothing behind; OS errors (disk full,
    no permission) become one OutputError line naming the target. The file gets the permissions
    the umask gives new files.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputError(f"{target} is a folder: give a file name for the output")
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; pass overwrite (--overwrite) to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".partial", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise _output_error(target, exc) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if target.exists() and not overwrite:  # created by someone else meanwhile
            raise OutputExistsError(f"{target} appeared while writing; not overwritten")
        _honour_umask(tmp_path)
        os.replace(tmp_path, target)
    except OSError as exc:
        if isinstance(exc, SPOError):
            raise
        raise _output_error(target, exc) from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it into place only if the block succeeds.

    An existing folder is replaced (with `overwrite`) only after the new one is complete: it is
    renamed aside, the new one renamed in, and the old one deleted last, so a failed write (disk
    full, a crash, a cancel) leaves the old output exactly as it was and no stray folder.
    """
    import shutil
    import uuid

    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} is a file, and this output is a folder: give a folder name")
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; pass overwrite (--overwrite) to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as exc:
        raise _output_error(target, exc) from exc
    try:
        yield tmp
        _honour_umask(tmp, folder=True)
        old = None
        if target.exists():
            if not overwrite:
                raise OutputExistsError(f"{target} appeared while writing; not overwritten")
            old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if isinstance(exc, SPOError):
            raise
        raise _output_error(target, exc) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


_CHECK_CHUNK = 1 << 22  # elements per batched check (8 MB of fp16/bf16): bounded extra memory, cache-sized
_CHECK_ALONE = 1 << 12  # a tensor this large is reduced where it lies (a copy into a batch would cost more)


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf.

    The minimum and maximum are finite iff every element is (NaN propagates through both; exact, no
    overflow), and torch's aminmax runs at memory speed in the tensor's own dtype (5x isfinite().all()).
    Large tensors are reduced in place; small ones (a LoRA's thousands of alphas and small factors) are
    concatenated by dtype and device into chunks, one reduction per chunk instead of one per tensor; a
    chunk that fails is re-checked tensor by tensor to name the culprits."""
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    suspects: list[str] = []
    for k, v in tensors.items():
        if not v.is_floating_point() or not v.numel():
            continue
        if v.numel() >= _CHECK_ALONE:
            if not _finite_bounds(v.reshape(-1)):
                suspects.append(k)
        else:
            groups.setdefault((v.dtype, v.device), []).append((k, v))
    for items in groups.values():
        start = 0
        while start < len(items):
            end, size = start, 0
            while end < len(items) and (end == start or size + items[end][1].numel() <= _CHECK_CHUNK):
                size += items[end][1].numel()
                end += 1
            chunk = items[start:end]
            flat = chunk[0][1].reshape(-1) if len(chunk) == 1 else torch.cat([v.reshape(-1) for _, v in chunk])
            if not _finite_bounds(flat):
                suspects.extend(k for k, _ in chunk)
            start = end
    return [k for k in suspects if not torch.isfinite(tensors[k]).all()]


def _finite_bounds(flat: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(flat)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def name_list(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise InvalidTensorError naming every tensor that holds NaN or inf."""
    from .errors import InvalidTensorError

    bad = non_finite(tensors)
    if bad:
        raise InvalidTensorError(f"{what} contains NaN or inf values in {len(bad)} tensors: {name_list(bad)}")
