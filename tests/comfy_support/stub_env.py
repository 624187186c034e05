"""Import the pack as ComfyUI does (a package from the pack's folder under a path-like
name), with the stand-in `comfy` / `folder_paths` / `comfy_api` on sys.path, then put
every module back as it was (so a real ComfyUI loaded by other tests is not disturbed)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

STUBS = Path(__file__).parent / "stubs"
PACK_DIR = Path(__file__).resolve().parents[2]
HOST_ROOTS = ("comfy", "comfy_api", "comfy_execution", "folder_paths", "latent_preview", "node_helpers", "nodes",
              "execution", "server", "utils", "comfy_extras", "comfy_config")


def _is_host(name: str) -> bool:
    return name.split(".")[0] in HOST_ROOTS


@dataclass
class StubPack:
    module: object
    form: str  # "v3" or "v1"
    base: Path

    @property
    def nodes(self) -> dict:
        return self.module.NODE_CLASS_MAPPINGS

    def run(self, node_id: str, unique_id: str = "7", **inputs):
        """Execute a node the way ComfyUI does for its form; returns (values tuple, ui dict or None)."""
        cls = self.nodes[node_id]
        if self.form == "v3":
            clone = cls.PREPARE_CLASS_CLONE({"UNIQUE_ID": unique_id})
            out = clone.execute(**inputs)
            return tuple(out.args), out.ui
        hidden = cls.INPUT_TYPES().get("hidden", {})
        if "unique_id" in hidden:
            inputs["unique_id"] = unique_id
        out = getattr(cls(), cls.FUNCTION)(**inputs)
        if isinstance(out, dict):
            return tuple(out["result"]), out.get("ui")
        return tuple(out), None


@contextlib.contextmanager
def stub_pack(base: Path, form: str = "v3"):
    saved = {k: v for k, v in sys.modules.items() if _is_host(k)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(STUBS))
    name = f"spo_pack_under_test_{form}_{uuid.uuid4().hex[:8]}"
    try:
        if form == "v1":
            sys.modules["comfy_api"] = None  # `import comfy_api.latest` raises ImportError, as on old ComfyUI
        import folder_paths

        folder_paths.reset(str(base))
        spec = importlib.util.spec_from_file_location(name, PACK_DIR / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        yield StubPack(module, form, base)
    finally:
        for k in [k for k in sys.modules if _is_host(k) or k == name or k.startswith(name + ".")]:
            del sys.modules[k]
        sys.modules.update(saved)
        sys.path.remove(str(STUBS))
