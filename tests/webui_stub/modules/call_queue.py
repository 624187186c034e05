"""The GPU call queue: one lock, wrap_gradio_gpu_call catching errors into HTML like A1111."""

import html
import threading
from functools import wraps

from modules import shared

queue_lock = threading.Lock()


def wrap_gradio_gpu_call(func, extra_outputs=None):
    @wraps(func)
    def f(*args, **kwargs):
        with queue_lock:
            shared.state.begin(job=None)
            try:
                res = list(func(*args, **kwargs))
            except Exception as e:  # A1111 turns errors into an HTML output
                res = (extra_outputs or [None, ""]) + [f"<div class='error'>{html.escape(str(e))}</div>"]
            shared.state.end()
            shared.state.interrupted = False
        return tuple(res)

    return f
