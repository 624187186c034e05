"""The SPO Blocks: one gradio app for the WebUI tab and the standalone `spo ui`."""

from __future__ import annotations

import logging
from typing import Any

from .host import StandaloneHost, UIHost
from .widgets import gr

log = logging.getLogger(__name__)

TITLE = "SPO: step-aware preference optimization"


def build_blocks(host: UIHost) -> Any:
    """The gr.Blocks with every tab this host supports (built, not launched)."""
    g = gr()
    from .tab_lora import build_lora_tab
    from .tab_score import build_score_tab

    with g.Blocks(analytics_enabled=False, title=TITLE) as demo:
        g.Markdown(f"### {TITLE}\n{host.describe()}", elem_id="spo_header")
        if host.shows_train_tab:
            build_train = _train_tab_builder()
            if build_train is not None:
                build_train(host)
        if host.shows_sample_tab and isinstance(host, StandaloneHost):
            from .tab_sample import build_sample_tab

            build_sample_tab(host)
        build_lora_tab(host)
        build_score_tab(host)
    return demo


def launch(host: StandaloneHost, listen: str = "127.0.0.1", port: int | None = None, block: bool = True) -> Any:
    """Serve the Blocks (queue on: long actions are generators)."""
    demo = build_blocks(host)
    demo.queue()
    kwargs: dict[str, Any] = dict(server_name=listen, server_port=port, share=False, inbrowser=False,
                                  prevent_thread_lock=not block, show_error=True)
    if _accepts(demo.launch, "quiet"):
        kwargs["quiet"] = False
    demo.launch(**kwargs)
    return demo


def _train_tab_builder():
    """The Train tab, when the trainer is part of this install."""
    try:
        from .tab_train import build_train_tab
    except ImportError as exc:
        log.info("no Train tab: %s", exc)
        return None
    return build_train_tab


def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
