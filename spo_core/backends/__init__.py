"""Hosts implemented inside spo_core (the ComfyUI and WebUI ones live in nodes/ and webui_extension/)."""

from .diffusers_backend import BackendSample, DiffusersBackend, DiffusersDenoiser, TinyVAEDecoder

__all__ = ["BackendSample", "DiffusersBackend", "DiffusersDenoiser", "TinyVAEDecoder"]
