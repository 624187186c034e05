"""Progress reporting and cancellation for long operations.

Library code never prints: a long operation takes a `progress` callback and a `cancel`
check. Each host wires them to its own UI (ComfyUI's ProgressBar, the WebUI's shared.state,
a gradio progress bar, a tqdm bar in the CLI) through these small types.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import Cancelled


@dataclass
class ProgressEvent:
    """One progress report. `preview` is an optional PIL image for UIs that show one."""

    stage: str
    step: int
    total: int
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    preview: Any = None
    elapsed_s: float = 0.0

    @property
    def eta_s(self) -> Optional[float]:
        if self.step <= 0 or self.total <= 0:
            return None
        return self.elapsed_s / self.step * max(self.total - self.step, 0)


ProgressFn = Callable[[ProgressEvent], None]

# the stage of an event that carries advice for the user (its message), not progress
WARNING = "warning"
CancelFn = Callable[[], bool]


class Reporter:
    """Forwards progress to an optional callback and raises `Cancelled` when asked to stop."""

    def __init__(self, stage: str, total: int, progress: ProgressFn | None = None, cancel: CancelFn | None = None):
        self.stage = stage
        self.total = total
        self.progress = progress
        self.cancel = cancel
        self.start = time.perf_counter()

    def update(self, step: int, message: str = "", preview: Any = None, **metrics: float) -> None:
        if self.progress is not None:
            self.progress(
                ProgressEvent(
                    stage=self.stage,
                    step=step,
                    total=self.total,
                    message=message,
                    metrics={k: float(v) for k, v in metrics.items()},
                    preview=preview,
                    elapsed_s=time.perf_counter() - self.start,
                )
            )
        self.check_cancel()

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled(f"{self.stage} was cancelled")


class TqdmProgress:
    """A ProgressFn that draws one tqdm bar per stage (for the CLI)."""

    def __init__(self, disable: bool = False, **tqdm_kwargs: Any):
        self.disable = disable
        self.kwargs = tqdm_kwargs
        self.bars: dict[str, Any] = {}
        self.finished: set[str] = set()

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm.auto import tqdm

        if event.stage == WARNING:
            return  # warnings reach the console through logging
        bar = self.bars.get(event.stage)
        if bar is None and event.stage in self.finished and event.step >= event.total:
            return  # a late "done" report of a stage whose bar already finished: no second, instant bar
        if bar is None:
            self.finished.discard(event.stage)
            bar = tqdm(total=event.total, desc=event.stage, disable=self.disable, **self.kwargs)
            if hasattr(bar, "start_t") and event.elapsed_s:  # the stage began before its first report
                bar.start_t -= event.elapsed_s
                bar.last_print_t = bar.start_t
            self.bars[event.stage] = bar
        if bar.total != event.total:
            bar.total = event.total
        bar.n = event.step
        if event.metrics:
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(event.metrics.items())[:6]}, refresh=False)
        bar.refresh()
        if event.step >= event.total:
            bar.close()
            self.bars.pop(event.stage, None)
            self.finished.add(event.stage)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
