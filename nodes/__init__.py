"""ComfyUI nodes of the SPO pack: thin adapters over `spo_core`, registered here only."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
