"""WebUI install hook: the WebUI runs this at launch (cwd = WebUI root, its `launch` importable).

It delegates to the pack's install.py, which installs only missing light packages through
`launch.run_pip` and never touches gradio, transformers, diffusers, huggingface_hub, fastapi
or pydantic in the WebUI's venv.
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))
# linked extension: the repo root is the parent; copied extension: install.py and spo_core were copied inside
_ROOT = _HERE if os.path.isdir(os.path.join(_HERE, "spo_core")) else os.path.dirname(_HERE)

_spec = importlib.util.spec_from_file_location("spo_pack_install", os.path.join(_ROOT, "install.py"))
if _spec is None or not os.path.isfile(os.path.join(_ROOT, "install.py")):
    print("[spo-pack] install.py of the pack not found next to the extension; nothing installed")
    sys.exit(0)
_install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_install)
sys.exit(_install.main(["--host", "webui"]))
