"""Long actions of the UI: run in a worker thread, polled by a gradio generator handler.

A gradio handler cannot both hold the GPU for minutes and keep the page alive across gradio
3.41 / 4.x / current, so every long action runs as a `Job`: the work function runs in a
thread (inside the host's GPU queue), reports `ProgressEvent`s and checks a cancel flag;
the handler is a generator that yields the job's state (progress bar, metrics, previews)
about twice a second until it ends. Errors become a message in the page, never only a
console traceback. Nothing here imports gradio.
"""

from __future__ import annotations

import html
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import Cancelled, SPOError
from ..progress import WARNING, ProgressEvent

log = logging.getLogger(__name__)

WorkFn = Callable[["Job"], Any]


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def describe_error(exc: BaseException, action: str = "the action") -> str:
    """A message for the page: SPOErrors as they are, OOM with what to do, others with their type."""
    if isinstance(exc, Cancelled):
        detail = str(exc)
        return f"{action} was stopped" + (f": {detail}" if detail and not detail.endswith("was cancelled") else ".")
    if is_out_of_memory(exc):
        return (f"Out of GPU memory during {action}. Free memory (close other generations, unload models), "
                "then lower the batch size, resolution, rank or number of candidates, or use fp16.")
    if isinstance(exc, SPOError):
        return str(exc)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc} (see the console for the traceback)"


@dataclass
class JobState:
    """What the page shows of a job; the handler renders it."""

    title: str
    status: str = "queued"  # queued, running, done, failed, stopped
    step: int = 0
    total: int = 0
    message: str = ""
    stage: str = ""
    history: list[dict[str, float]] = field(default_factory=list)  # metrics per progress event
    preview: Any = None
    result: Any = None
    error: str | None = None
    warning: str = ""  # advice the work sent (e.g. no SPO pairs pass the threshold): shown until it ends
    main_stage: str | None = None  # when set, only this stage moves the bar; the others show as the message
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    @property
    def done(self) -> bool:
        return self.status in ("done", "failed", "stopped")

    @property
    def elapsed(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    def fraction(self) -> float:
        if self.status == "done":
            return 1.0
        return min(max(self.step / self.total, 0.0), 1.0) if self.total > 0 else 0.0


class Job:
    """One long action. `work(job)` gets the job: `job.progress` is a ProgressFn, `job.cancelled`
    a CancelFn; its return value becomes `state.result`."""

    def __init__(self, title: str, work: WorkFn, runner: Callable[[Callable[[], None]], None] | None = None,
                 extra_cancel: Callable[[], bool] | None = None, on_progress: Callable[[ProgressEvent], None] | None = None,
                 main_stage: str | None = None, total: int = 0):
        self.state = JobState(title, main_stage=main_stage, total=total)
        self._work = work
        self._runner = runner or (lambda fn: fn())
        self._extra_cancel = extra_cancel
        self._on_progress = on_progress
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"spo-job-{title}", daemon=True)

    # -- inside the worker ------------------------------------------------------------------
    def progress(self, event: ProgressEvent) -> None:
        with self._lock:
            s = self.state
            if event.stage == WARNING:
                s.warning = event.message
            elif s.main_stage is None or event.stage == s.main_stage:
                s.stage, s.step, s.total, s.message = event.stage, event.step, event.total, event.message
            else:  # a sub-stage (sampling a round, loading): its count goes into the message, not the bar
                s.stage = event.stage
                s.message = f"{event.message} ({event.step}/{event.total})" if event.total else event.message
            if event.metrics:
                s.history.append({"step": float(event.step), **event.metrics})
            if event.preview is not None:
                s.preview = event.preview
        if self._on_progress is not None:
            try:
                self._on_progress(event)
            except Exception:  # a host's progress display must never break the job
                log.debug("host progress hook failed", exc_info=True)

    def cancelled(self) -> bool:
        if self._stop.is_set():
            return True
        return bool(self._extra_cancel and self._extra_cancel())

    def _run(self) -> None:
        def body() -> None:
            self.state.status = "running"
            self.state.started = time.perf_counter()
            self.state.result = self._work(self)

        try:
            self._runner(body)
            if self.state.status == "running":
                self.state.status = "stopped" if self._stop.is_set() else "done"
        except Cancelled as exc:
            self.state.status = "stopped"
            self.state.error = describe_error(exc, self.state.title)
        except BaseException as exc:  # noqa: BLE001 - everything must reach the page
            if not isinstance(exc, SPOError):
                log.error("%s failed:\n%s", self.state.title, traceback.format_exc())
            self.state.status = "failed"
            self.state.error = describe_error(exc, self.state.title)
        finally:
            self.state.finished = time.perf_counter()

    # -- from the UI thread -----------------------------------------------------------------
    def start(self) -> "Job":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> JobState:
        self._thread.join(timeout)
        return self.state

    def poll(self, interval: float = 0.5) -> Iterator[JobState]:
        """Yield the state every `interval` seconds while running, then once more at the end."""
        while self._thread.is_alive():
            yield self.state
            self._thread.join(interval)
        yield self.state


def run_job(job: Job, render: Callable[[JobState], Any], interval: float = 0.5) -> Iterator[Any]:
    """The body of a gradio generator handler: start the job and yield render(state) until it ends."""
    job.start()
    for state in job.poll(interval):
        yield render(state)


# -- rendering helpers (plain HTML: every gradio version shows gr.HTML the same) -------------------

# shown by CSS alone when the page stops getting updates (a stopped or dead server): every update
# re-renders the status, which restarts the hidden notice's delay
_STALE = ("<style>@keyframes spo-stale{to{opacity:1;height:auto}}</style>"
          "<div class='spo-stale' style='opacity:0;height:0;overflow:hidden;color:#b00020;"
          "animation:spo-stale 0s linear {delay}s forwards'>No update from the server for {delay} s: it may have "
          "stopped. Reload the page to see.</div>")


def progress_html(state: JobState, stale_after: float = 20.0) -> str:
    """A progress bar with the step count, the message and the elapsed time, or the error; a
    warning the work sent; and, while running, a notice that appears if the updates stop."""
    title = html.escape(state.title)
    if state.status == "failed":
        return (f"<div class='spo-status spo-error' style='color:#b00020;border:1px solid #b00020;padding:8px;"
                f"border-radius:6px'><b>{title} failed:</b> {html.escape(state.error or 'unknown error')}</div>")
    pct = round(100 * state.fraction())
    label = {"queued": "waiting for the GPU", "running": "running", "done": "done",
             "stopped": "stopped"}.get(state.status, state.status)
    steps = (f"{state.total}/{state.total}" if state.status == "done" else f"{state.step}/{state.total}") if state.total else ""
    msg = html.escape(state.message or "")
    extra = f" - {html.escape(state.error)}" if state.status == "stopped" and state.error else ""
    warning = (f"<div class='spo-warning' style='color:#9a5b00;border-left:3px solid #f59e0b;padding-left:6px'>"
               f"{html.escape(state.warning)}</div>") if state.warning else ""
    stale = _STALE.replace("{delay}", f"{stale_after:g}") if not state.done else ""
    return (
        f"<div class='spo-status spo-{state.status}' data-status='{state.status}'>"
        f"<div><b>{title}</b>: {label} {steps} ({state.elapsed:.1f} s){extra}</div>"
        f"<div style='background:#ddd;border-radius:4px;height:12px;margin:4px 0'>"
        f"<div class='spo-bar' style='width:{pct}%;background:#f97316;height:12px;border-radius:4px'></div></div>"
        f"<div style='font-size:90%;opacity:.8'>{msg}</div>{warning}{stale}</div>"
    )


def message_html(text: str, kind: str = "info") -> str:
    color = {"info": "inherit", "error": "#b00020", "ok": "#1b7f3b"}.get(kind, "inherit")
    cls = "spo-error" if kind == "error" else "spo-message"
    return f"<div class='spo-status {cls}' style='color:{color}'>{html.escape(text)}</div>"


def error_html(exc: BaseException, action: str) -> str:
    return message_html(f"{action} failed: {describe_error(exc, action)}", "error")
