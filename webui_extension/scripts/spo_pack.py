"""SPO for AUTOMATIC1111 / Forge: the SPO tab, Settings > SPO, the "SPO Euler a (k candidates)"
sampler and the always-visible script that carries its options (also through the API's
`alwayson_scripts`: {"spo sampler": {"args": [k, policy, window_lo, window_hi, scorer, weights, every]}}).

The WebUI executes only this file; everything else lives in `spo_webui/` beside `scripts/`
and in the pack's `spo_core`. The WebUI runs a script with a temporary copy of sys.path and
then restores the old list (webui.md 1.1), so the pack's folders are added now (for the
imports below) and again from `on_before_ui`, when the restored list is the one that stays.
"""

import os
import sys


def _add_pack_paths() -> None:
    ext_dir = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    # a linked extension sits inside the pack (spo_core next to it); a copied one carries spo_core inside
    root = ext_dir if os.path.isdir(os.path.join(ext_dir, "spo_core")) else os.path.dirname(ext_dir)
    for path in (ext_dir, root):
        if path not in sys.path:
            sys.path.append(path)


_add_pack_paths()

import modules.scripts as scripts  # noqa: E402
from modules import script_callbacks  # noqa: E402

from spo_webui import options as spo_options  # noqa: E402
from spo_webui import sampler as spo_sampler  # noqa: E402
from spo_webui import ui as spo_ui  # noqa: E402

# before the UI is built: the sampler dropdowns are filled when txt2img's page is created
spo_sampler.register_sampler()


class SPOSamplerScript(scripts.Script):
    """Options of the SPO sampler; stored on `p` for the sampler function to read."""

    def title(self):
        return "SPO sampler"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        defaults, choices = spo_ui.script_defaults()
        components, self.infotext_fields = spo_ui.sampler_controls(defaults, choices)
        return components

    def process(self, p, *args):
        try:
            p.spo_options = spo_options.from_args(args, spo_options.defaults_from_settings())
        except Exception as exc:  # the sampler raises it, so that the page shows it when SPO is used
            p.spo_options = spo_options.InvalidOptions(exc)


script_callbacks.on_before_ui(_add_pack_paths)
script_callbacks.on_ui_settings(spo_ui.add_settings)
script_callbacks.on_ui_tabs(spo_ui.build_tab)
