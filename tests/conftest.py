"""Shared test setup: no network, offline hubs, a private cache, tiny models only."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # unix socket path
        return True
    host = address[0] if isinstance(address, tuple) and address else ""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self, address):
    if not _is_local(address):
        raise RuntimeError(f"test tried to open a network connection to {address!r}; tests must stay offline")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_local(address):
        raise RuntimeError(f"test tried to open a network connection to {address!r}; tests must stay offline")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep the tokenizer cache and every other cache of the pack inside the test run."""
    cache = tmp_path_factory.mktemp("spo_cache")
    old = os.environ.get("SPO_CACHE_DIR")
    os.environ["SPO_CACHE_DIR"] = str(cache)
    from spo_core import clip_tokenizer

    clip_tokenizer.tokenizer_files.cache_clear()
    yield cache
    if old is None:
        os.environ.pop("SPO_CACHE_DIR", None)
    else:
        os.environ["SPO_CACHE_DIR"] = old
