"""What the shared Blocks need from the program they run in.

The same tabs run inside the AUTOMATIC1111 / Forge WebUI (files chosen from its model
folders, GPU work through its call queue, progress in `shared.state`, the loaded checkpoint
for training) and standalone (`spo ui`: paths typed, a lock instead of a queue, diffusers
models). A `UIHost` answers those questions; `StandaloneHost` is the standalone answer and
the WebUI's lives in `webui_extension/spo_webui/host.py`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError, FileMissingError
from ..progress import ProgressEvent

log = logging.getLogger(__name__)

# kinds of files the tabs ask for
LORA, CHECKPOINT, SCORER, IMAGE_DIR = "lora", "checkpoint", "scorer", "images"
LORA_SUFFIXES = (".safetensors", ".sft", ".bin", ".pt", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".bin")
_SAFE_NAME = re.compile(r"^[\w\-. ()\[\]+,@]+$")


def clean_output_name(name: str, what: str = "output name") -> str:
    """A file stem without folders or odd characters (outputs inside a host's folders)."""
    name = (name or "").strip()
    for suffix in (".safetensors", ".sft"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    if not name:
        raise ConfigError(f"the {what} is empty: type a name such as my_spo_lora")
    if "/" in name or "\\" in name or name in (".", "..") or not _SAFE_NAME.match(name):
        raise ConfigError(f"the {what} {name!r} must be a plain file name (letters, digits, - _ . space), "
                          "without folders; the file is written into the host's LoRA folder")
    return name


def list_files(folder: Path, suffixes: tuple[str, ...], folders: bool = False) -> list[str]:
    """Paths under `folder` (recursive) relative to it, sorted; optionally also sub-folders that
    hold a model (config.json / model_index.json / adapter_config.json)."""
    if not folder.is_dir():
        return []
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = Path(root).relative_to(folder)
        for f in sorted(files):
            if f.lower().endswith(suffixes) and not f.startswith("."):
                out.append(str(rel_root / f) if str(rel_root) != "." else f)
        if folders and str(rel_root) != "." and any(
                (Path(root) / marker).is_file() for marker in ("config.json", "model_index.json", "adapter_config.json")):
            out.append(str(rel_root))
    return sorted(out, key=str.lower)


class UIHost:
    """Defaults shared by every host; subclasses override what differs."""

    name = "host"
    free_paths = True  # True: inputs are typed paths; False: dropdowns of the host's model folders
    shows_sample_tab = False
    shows_train_tab = True

    # -- files -----------------------------------------------------------------------------
    def folders(self, kind: str) -> list[Path]:
        """Folders whose files the tabs offer (and to which inputs are limited when free_paths is False)."""
        return []

    def choices(self, kind: str) -> list[str]:
        suffixes = {LORA: LORA_SUFFIXES, CHECKPOINT: CHECKPOINT_SUFFIXES, SCORER: (".safetensors", ".bin", ".pt", ".pth")}[kind]
        out: list[str] = []
        for folder in self.folders(kind):
            out += list_files(folder, suffixes, folders=kind in (CHECKPOINT, SCORER, LORA))
        return out

    def resolve_input(self, kind: str, value: str | None, what: str) -> Path:
        """The file a user chose; with free_paths False only inside the host's folders."""
        value = (value or "").strip().strip('"')
        if not value:
            raise ConfigError(f"choose a {what}")
        if self.free_paths:
            p = Path(value).expanduser()
            if not p.exists():
                raise FileMissingError(f"{what} not found: {p}")
            return p
        for folder in self.folders(kind):
            p = (folder / value).resolve()
            base = folder.resolve()
            if (p == base or base in p.parents) and p.exists():
                return p
        allowed = ", ".join(str(f) for f in self.folders(kind)) or "(none)"
        raise FileMissingError(f"{what} {value!r} is not in the allowed folders ({allowed}); press the refresh button "
                               "and choose a listed file")

    def output_path(self, kind: str, name: str, suffix: str = ".safetensors") -> Path:
        """Where an output named `name` goes: a clean file name inside the kind's first folder."""
        folders = self.folders(kind)
        if not folders:
            raise ConfigError(f"{self.name} has no folder for {kind} outputs")
        folders[0].mkdir(parents=True, exist_ok=True)
        return folders[0] / (clean_output_name(name) + suffix)

    def training_dir(self, name: str) -> Path:
        """The working folder of a training run (checkpoints, log, curves, previews)."""
        folders = self.folders(LORA)
        if not folders:
            raise ConfigError(f"{self.name} has no folder for training runs")
        return folders[0].parent / "spo-train" / clean_output_name(name)

    def after_write(self, kind: str, path: Path) -> str:
        """Called after a LoRA/checkpoint was written (the WebUI refreshes its lists); returns a note for the page."""
        return ""

    # -- running ---------------------------------------------------------------------------
    def run_exclusive(self, fn: Callable[[], None]) -> None:
        """Run `fn` holding the host's GPU (in the WebUI: its call queue); exceptions propagate."""
        fn()

    def busy_reason(self) -> str | None:
        """Why a GPU job cannot start now (e.g. the WebUI is generating), or None."""
        return None

    def host_cancel(self) -> bool:
        """The host's own stop button (the WebUI's Interrupt)."""
        return False

    def on_progress(self, event: ProgressEvent) -> None:
        """Mirror progress into the host's own display (the WebUI's progress bar)."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.float32

    # -- models ----------------------------------------------------------------------------
    def model_arch(self) -> str | None:
        """The base architecture of the model in use (sd15/sd2/sdxl), if known."""
        return None

    def model_label(self) -> str:
        return "no model loaded"

    def training_host(self, **options) -> Any:
        """The TrainingHost the trainer runs on (the loaded checkpoint / a diffusers model)."""
        raise ConfigError(f"training is not available in {self.name}")

    def describe(self) -> str:
        return f"{self.name}: {self.model_label()}"


class StandaloneHost(UIHost):
    """`spo ui`: typed paths, outputs in a folder, a diffusers model folder for sampling and training."""

    name = "standalone"
    free_paths = True
    shows_sample_tab = True

    def __init__(self, output_dir: str | os.PathLike = "spo-outputs", model: str | None = None,
                 device: str | None = None, dtype: str | None = None):
        self.output_dir = Path(output_dir).expanduser()
        self.model_path = model
        self._device = torch.device(device) if device else None
        self._dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype or "", None)
        self._lock = threading.Lock()
        self._backends: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self._device or super().device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype or super().dtype

    def folders(self, kind: str) -> list[Path]:
        return [self.output_dir]

    def output_path(self, kind: str, name: str, suffix: str = ".safetensors") -> Path:
        name = (name or "").strip().strip('"')
        if not name:
            raise ConfigError("the output name is empty: type a file name or path")
        p = Path(name).expanduser()
        if not p.is_absolute():
            p = self.output_dir / p
        if suffix and p.suffix.lower() not in (".safetensors", ".sft") and suffix != "/":
            p = p.with_name(p.name + suffix)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def run_exclusive(self, fn: Callable[[], None]) -> None:
        with self._lock:
            fn()

    def busy_reason(self) -> str | None:
        return "another job is running in this app; wait for it or press Stop" if self._lock.locked() else None

    # -- the diffusers model ----------------------------------------------------------------
    def backend(self, path: str | None = None):
        """The diffusers backend of a model folder / single file (cached; one model at a time)."""
        from ..backends import DiffusersBackend

        path = (path or self.model_path or "").strip()
        if not path:
            raise ConfigError("no model: type the path of a diffusers model folder (SD1.5/SDXL, SD3/SD3.5, Flux; or an "
                              "SD1.5/SDXL .safetensors file), or start the app with --model PATH")
        from ..backends.flow_backend import is_flow_model_spec, load_flow_model

        key = str(Path(path).expanduser().resolve())
        if key not in self._backends:
            self._backends.clear()  # one model in memory at a time
            if is_flow_model_spec(path):  # world-flow, SD3/SD3.5 and Flux folders
                self._backends[key] = load_flow_model(path, device=self.device, dtype=self.dtype)
            else:
                self._backends[key] = DiffusersBackend.from_pretrained(Path(path).expanduser(), device=self.device,
                                                                       dtype=self.dtype)
        self.model_path = path
        return self._backends[key]

    def training_dir(self, name: str) -> Path:
        return self.output_dir / "train" / clean_output_name(name)

    def training_host(self, model: str | None = None, **options) -> Any:
        """The trainer's host over the diffusers model (loaded once, shared with the Sample tab)."""
        from ..training import DiffusersTrainingHost, FlowTrainingHost

        backend = self.backend(model)
        host_cls = FlowTrainingHost if getattr(backend, "is_flow", False) else DiffusersTrainingHost
        return host_cls(backend, model_name=Path(self.model_path or "model").name)

    def model_arch(self) -> str | None:
        if not self._backends:
            return None
        return next(iter(self._backends.values())).arch

    def model_label(self) -> str:
        return f"model {self.model_path}" if self.model_path else "no model chosen"
