"""Building blocks of the tabs, written against the component subset that behaves the same on
gradio 3.41.2 (A1111), 4.40 (Forge) and the current release: Blocks/Tab/Row/Column/Accordion,
Textbox, Number, Slider, Checkbox, Dropdown (string choices), Radio, Button, Markdown, HTML,
JSON, Gallery, Image(type="pil"), File, State; `gr.update(...)` returns; generator handlers.
No `.style()`, `gr.Box`, `Component.update`, `_js`/`js`, or Blocks(css=/theme=)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterator

from ..errors import ConfigError
from .host import UIHost
from .jobs import Job, JobState, error_html, progress_html

log = logging.getLogger(__name__)


def gr():
    import gradio

    return gradio


def gradio_version() -> tuple[int, int]:
    parts = gr().__version__.split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def file_picker(host: UIHost, kind: str, label: str, placeholder: str = "path to a file or folder",
                elem_id: str | None = None) -> Any:
    """A typed path (standalone) or a dropdown of the host's model folders with a refresh button (WebUI)."""
    g = gr()
    if host.free_paths:
        return g.Textbox(label=label, placeholder=placeholder, lines=1, elem_id=elem_id)
    with g.Row():
        dd = g.Dropdown(choices=host.choices(kind), value=None, label=label, interactive=True, elem_id=elem_id)
        refresh = g.Button("Refresh list")
    refresh.click(fn=lambda: g.update(choices=host.choices(kind)), inputs=None, outputs=dd)
    return dd


class ActiveJobs:
    """The running job of each tab, so that its Stop button can reach it."""

    def __init__(self):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def set(self, key: str, job: Job) -> None:
        with self._lock:
            self._jobs[key] = job

    def stop(self, key: str) -> str:
        with self._lock:
            job = self._jobs.get(key)
        if job is None or job.state.done:
            return "<div class='spo-status'>nothing is running</div>"
        job.stop()
        return "<div class='spo-status'>stopping after the current step...</div>"

    def running(self) -> list[str]:
        with self._lock:
            return [k for k, j in self._jobs.items() if not j.state.done]


ACTIVE = ActiveJobs()


def display_image(image, min_side: int = 256):
    """An image the page can show: small ones (the world's 32 px) enlarged with sharp pixels,
    not shown as specks; the file on disk keeps its real size."""
    if image is None or min(image.size) >= min_side:
        return image
    from PIL import Image

    factor = -(-min_side // min(image.size))
    return image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST)


def run_job_handler(host: UIHost, key: str, title: str, prepare: Callable[[], Callable[[Job], Any]],
                    render: Callable[[JobState], tuple], n_outputs: int, exclusive: bool = True,
                    interval: float = 0.5, main_stage: str | None = None, total: int = 0) -> Iterator[tuple]:
    """Generator body of a long action's click handler.

    `prepare()` validates the inputs (raising SPOError with a message for the page) and returns
    the work function; `render(state)` gives the outputs, the first of which is the status HTML.
    `main_stage`: the stage whose steps fill the bar (e.g. "training"; sampling rounds inside it
    show as the message), out of `total`.
    """
    blank = tuple(g_update() for _ in range(n_outputs - 1))
    try:
        if exclusive:
            reason = host.busy_reason()
            if reason:
                raise ConfigError(f"cannot start {title} now: {reason}")
        if key in ACTIVE.running():
            raise ConfigError(f"{title} is already running; wait for it or press Stop")
        work = prepare()
    except Exception as exc:  # noqa: BLE001 - shown in the page
        yield (error_html(exc, title),) + blank
        return
    job = Job(title, work, runner=host.run_exclusive if exclusive else None, extra_cancel=host.host_cancel,
              on_progress=host.on_progress if exclusive else None, main_stage=main_stage, total=total)
    ACTIVE.set(key, job)
    job.start()
    for state in job.poll(interval):
        try:
            yield render(state)
        except Exception as exc:  # noqa: BLE001 - a rendering bug must not hide the job's state
            log.exception("rendering %s failed", title)
            yield (error_html(exc, title),) + blank


def quick_handler(title: str, fn: Callable[..., tuple], n_outputs: int) -> Callable[..., tuple]:
    """Wrap a short action so that its errors become a message (first output) instead of a traceback."""

    def handler(*args):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - shown in the page
            if not hasattr(exc, "__module__") or not type(exc).__module__.startswith("spo_core"):
                log.exception("%s failed", title)
            return (error_html(exc, title),) + tuple(g_update() for _ in range(n_outputs - 1))

    handler.__name__ = title.lower().replace(" ", "_")
    return handler


def g_update(**kwargs) -> Any:
    return gr().update(**kwargs)


def status_box(label: str = "status", elem_id: str | None = None) -> Any:
    return gr().HTML(value="", label=label, elem_id=elem_id, elem_classes=["spo-status-box"])


def render_basic(state: JobState, result_formatter: Callable[[Any], Any] | None = None) -> tuple:
    """(status html, result text) for jobs whose result is a text."""
    result = state.result if state.status == "done" else None
    text = result_formatter(result) if (result is not None and result_formatter) else (result if isinstance(result, str) else "")
    return progress_html(state), text if state.status == "done" else g_update()
