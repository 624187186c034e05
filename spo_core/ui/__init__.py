"""The SPO gradio Blocks, shared by the WebUI tab and the standalone `spo ui` app.

`build_blocks(host)` builds the tabs (Train, Sample (standalone), LoRA tools, Score) for a
`UIHost`; `launch(StandaloneHost(...))` serves them. gradio is imported only when building.
"""

from .blocks import build_blocks, launch
from .host import StandaloneHost, UIHost, clean_output_name, list_files

__all__ = ["StandaloneHost", "UIHost", "build_blocks", "clean_output_name", "launch", "list_files"]
