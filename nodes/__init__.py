"""ComfyUI nodes of the SPO pack: thin adapters over `spo_core`, registered here only.

Each node family module lists its `NodeSpec`s; `spec.build_mappings` turns them into V3
`io.ComfyNode` classes where `comfy_api.latest` exists, classic V1 classes otherwise, and
both go into `NODE_CLASS_MAPPINGS` (ComfyUI runs V3 classes from that map too).
"""

from __future__ import annotations

from . import lora_nodes, resampler_nodes, scorer_nodes, train_nodes
from .host import register_folders
from .spec import build_mappings

register_folders()

SPECS = [*lora_nodes.SPECS, *scorer_nodes.SPECS, *resampler_nodes.SPECS, *train_nodes.SPECS]

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = build_mappings(SPECS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "SPECS"]
