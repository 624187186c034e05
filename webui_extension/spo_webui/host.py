"""The WebUI as a `UIHost` for the shared Blocks: files from its model folders, GPU work under
its call queue (`wrap_gradio_gpu_call`, and Forge's main thread), progress and Interrupt
through `shared.state`, list refreshes after writing, the loaded checkpoint."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from spo_core.progress import ProgressEvent
from spo_core.ui.host import CHECKPOINT, LORA, SCORER, UIHost

from . import webui

log = logging.getLogger(__name__)


def loaded_model() -> Any:
    """The loaded checkpoint without triggering a load (A1111's shared.sd_model property loads one)."""
    from modules import sd_models

    data = getattr(sd_models, "model_data", None)
    model = getattr(data, "sd_model", None) if data is not None else None
    if model is None:
        from modules import shared

        model = shared.__dict__.get("sd_model")
    return model


def ensure_model() -> Any:
    """The checkpoint the WebUI has selected, loaded now if no generation has loaded it yet (a user
    may open the SPO tab first). A1111 loads it through `model_data.get_sd_model`, Forge through
    `forge_model_reload`."""
    from modules import sd_models

    if hasattr(sd_models, "forge_model_reload"):  # Forge: a FakeInitialModel stands in until the first load
        model, _ = sd_models.forge_model_reload()
        return model
    model = loaded_model()
    if model is not None:
        return model
    return sd_models.model_data.get_sd_model()


def model_arch_of(model: Any) -> str | None:
    if model is None:
        return None
    if getattr(model, "is_sdxl", False):
        return "sdxl"
    if getattr(model, "is_sd2", False):
        return "sd2"
    if getattr(model, "is_sd1", False):
        return "sd15"
    return None


class WebUIHost(UIHost):
    free_paths = False
    shows_sample_tab = False  # the WebUI samples in txt2img with the SPO sampler

    def __init__(self):
        self.name = "Forge" if webui.is_forge() else "AUTOMATIC1111"

    # -- files -----------------------------------------------------------------------------
    def folders(self, kind: str) -> list[Path]:
        if kind == LORA:
            return [webui.lora_dir()]
        if kind == CHECKPOINT:
            return webui.checkpoint_dirs()
        if kind == SCORER:
            return [webui.scorer_dir()]
        return []

    def output_path(self, kind: str, name: str, suffix: str = ".safetensors") -> Path:
        from spo_core.ui.host import clean_output_name

        folder = webui.lora_dir() if kind == LORA else webui.checkpoint_dirs()[-1]
        folder.mkdir(parents=True, exist_ok=True)
        return folder / (clean_output_name(name) + ("" if suffix == "/" else suffix))

    def training_dir(self, name: str) -> Path:
        """Checkpoints, log, curves and previews of a run: <webui data>/outputs/spo-train/<name>."""
        from spo_core.ui.host import clean_output_name

        return webui.data_path() / "outputs" / "spo-train" / clean_output_name(name)

    def training_host(self, **options) -> Any:
        from .training import WebUITrainingHost

        return WebUITrainingHost()

    def after_write(self, kind: str, path: Path) -> str:
        try:
            if kind == LORA:
                networks = sys.modules.get("networks")  # the built-in Lora extension's module (A1111 and Forge)
                if networks is not None and hasattr(networks, "list_available_networks"):
                    networks.list_available_networks()
                    return f"LoRA list refreshed: use <lora:{path.stem}:1> in the prompt"
                return f"use <lora:{path.stem}:1> in the prompt (refresh the Lora cards to see it)"
            if kind == CHECKPOINT:
                from modules import sd_models

                sd_models.list_models()
                return "checkpoint list refreshed"
        except Exception as exc:  # noqa: BLE001 - the file is written; a failed refresh is only a note
            log.warning("refreshing the WebUI lists failed: %s", exc)
            return f"written; refresh the lists by hand ({exc})"
        return ""

    # -- running ---------------------------------------------------------------------------
    def run_exclusive(self, fn: Callable[[], None]) -> None:
        """Run under the WebUI's GPU queue, as its own txt2img does (Forge: on its main thread)."""
        from modules import call_queue

        box: dict[str, BaseException] = {}

        def guarded() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, outside the WebUI's wrapper
                box["exc"] = exc

        def body(*_args):
            from modules import shared

            shared.state.job = "SPO"
            shared.state.job_count = 1
            if webui.is_forge():
                from modules_forge import main_thread

                main_thread.run_and_wait_result(guarded)
            else:
                guarded()
            return [""]

        call_queue.wrap_gradio_gpu_call(body, extra_outputs=[])()
        if "exc" in box:
            raise box["exc"]

    def busy_reason(self) -> str | None:
        from modules import call_queue, shared

        state = shared.state
        if getattr(state, "job_count", 0) or getattr(state, "job", ""):
            return f"the WebUI is busy ({state.job or 'generating'}); wait until it finishes, then start again"
        lock = call_queue.queue_lock
        if lock.acquire(blocking=False):
            lock.release()
            return None
        return "the WebUI is generating; wait until it finishes, then start again"

    def host_cancel(self) -> bool:
        from modules import shared

        return bool(shared.state.interrupted)

    def on_progress(self, event: ProgressEvent) -> None:
        from modules import shared

        state = shared.state
        state.sampling_steps = max(int(event.total), 1)
        state.sampling_step = int(event.step)
        state.textinfo = f"SPO {event.stage}: {event.message}"
        if event.preview is not None and hasattr(state, "assign_current_image"):
            state.assign_current_image(event.preview)

    @property
    def device(self) -> torch.device:
        from modules import devices

        return torch.device(devices.device)

    @property
    def dtype(self) -> torch.dtype:
        from modules import devices

        return torch.float32 if torch.device(devices.device).type == "cpu" else devices.dtype

    # -- the loaded model ------------------------------------------------------------------
    def model_arch(self) -> str | None:
        return model_arch_of(loaded_model())

    def model_label(self) -> str:
        model = loaded_model()
        if model is None:
            return "no checkpoint loaded yet"
        info = getattr(model, "sd_checkpoint_info", None)
        title = getattr(info, "title", None) or getattr(info, "name_for_extra", None) or "checkpoint"
        arch = self.model_arch()
        return f"checkpoint {title}" + (f" ({arch})" if arch else "")

    def describe(self) -> str:
        return (f"{self.name}: LoRAs are written to `{webui.lora_dir()}`; scorer weights are read from "
                f"`{webui.scorer_dir()}`. The SPO sampler is in txt2img/img2img's sampler list.")
