"""Stand-in for ComfyUI's `comfy` package (tests only): just what the SPO nodes call."""
