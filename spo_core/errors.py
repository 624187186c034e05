"""The project's exceptions.

Every error a user can cause (a bad file, a wrong model, a bad setting) is an `SPOError`
subclass whose message says what was wrong and what to do, so that each host can show it
as it is: a ComfyUI error dialog, a WebUI page message, a CLI line.
"""

from __future__ import annotations


class SPOError(Exception):
    """Base class of every user-facing error of the pack."""


class FileMissingError(SPOError, FileNotFoundError):
    """A file or folder the user pointed at does not exist."""


class CorruptFileError(SPOError):
    """A file exists but cannot be read (truncated, not the format its name says)."""


class UnsafeFileError(SPOError):
    """A pickle that would run code when loaded: refused, nothing executed."""


class OutputExistsError(SPOError, FileExistsError):
    """An output path exists and overwriting was not asked for."""


class OutputError(SPOError, OSError):
    """An output cannot be written where asked (no such folder, a folder in the way, disk full,
    no permission, or a path that is one of the inputs)."""


class LoRAFormatError(SPOError):
    """A LoRA file whose keys or tensors do not form a LoRA we can read."""


class ModelMismatchError(SPOError):
    """A LoRA, scorer or conditioning made for another base model than the one in use."""


class InvalidTensorError(SPOError):
    """NaN/inf values or wrong shapes in tensors we were given."""


class WeightsNotFoundError(FileMissingError):
    """A scorer or model weights file is missing; the message names it and where to get it."""


class ConfigError(SPOError, ValueError):
    """A setting or argument out of range, or settings that contradict each other."""


class MissingDependencyError(SPOError, ImportError):
    """An optional package (diffusers, transformers, open_clip, gradio...) is needed and absent."""


class Cancelled(SPOError):
    """A long operation was stopped by its cancel check; partial results were saved.

    `steps`: for training, the step the saved state is at (0: nothing was trained or saved)."""

    steps: int | None = None


class TrainingDiverged(SPOError):
    """The loss became NaN/inf; the last good checkpoint was kept."""


def require(module: str, feature: str, extra: str):
    """Import an optional dependency or raise a message that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise MissingDependencyError(
            f"{feature} needs the Python package '{module}', which is not importable here "
            f"({exc}). Install it with: pip install 'spo-pack[{extra}]'"
        ) from exc
