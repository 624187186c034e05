"""Script base class and the loader's sys.path handling (A1111 modules/scripts.py::load_scripts)."""

import importlib.util
import inspect
import os
import sys

AlwaysVisible = object()
scripts_data = []


class Script:
    infotext_fields = None
    alwayson = False

    def title(self):
        raise RuntimeError("scripts must define title()")

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []


def load_script(path, basedir):
    """Execute one scripts/*.py the way A1111 does: a temporary sys.path, restored afterwards."""
    syspath = sys.path
    try:
        sys.path = [basedir] + sys.path
        spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for obj in module.__dict__.values():
            if inspect.isclass(obj) and issubclass(obj, Script) and obj is not Script:
                scripts_data.append(obj)
        return module
    finally:
        sys.path = syspath
