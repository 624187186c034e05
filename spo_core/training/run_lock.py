"""One training run per output folder.

Two runs writing the same folder would overwrite each other's checkpoints, log and LoRA and
both report success. A run holds an exclusive lock on `<output_dir>/.spo-run.lock` for its
whole life; a second run refuses at once, naming the holder. The lock is an OS file lock
(fcntl / msvcrt), so a killed run releases it with its process: there is never a stale lock
to delete by hand.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import ConfigError

LOCK_NAME = ".spo-run.lock"


class RunLock:
    """An exclusive, non-blocking lock on a run folder; `release()` (or process exit) frees it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(
                f"another training run is writing {self.folder}{holder}: wait for it to finish, stop it, "
                "or give this run another output folder")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        _unlock(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" (process {info['pid']} on {info['host']})"
    except (OSError, ValueError, KeyError, AttributeError):
        return ""


try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        try:
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
