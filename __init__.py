"""ComfyUI entry point of the SPO pack.

ComfyUI imports this folder as a package from `custom_nodes/`. The shared library
`spo_core` lives next to it; the folder is put on sys.path so that `import spo_core`
resolves to this copy. All nodes are registered in one place, `nodes/__init__.py`.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
