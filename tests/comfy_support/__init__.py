"""Test support for the ComfyUI nodes: a stand-in for the `comfy` modules the nodes touch
(`stubs/`, used by the contract tests that run in CI without ComfyUI) and the in-process
harness for a real ComfyUI checkout (`harness.py`, used when COMFYUI_PATH is set)."""
