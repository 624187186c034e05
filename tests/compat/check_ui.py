"""Gradio compatibility check of the SPO Blocks, self-contained (run it with any Python that has
torch, safetensors, pillow and some gradio; the pack is found from this file's location).

It builds the standalone app's Blocks and the WebUI tab (through tests/webui_stub, loading the
extension's script as A1111 does), serves the standalone app on 127.0.0.1, and drives one action
per tab with gradio_client: LoRA tools (inspect + convert a diffusers LoRA to webui format),
Score (an image with the JPEG scorer), Sample and Train (one DDPO step) on a tiny diffusers model,
only where diffusers imports. It prints a line per check, then 'N passed, N failed', and exits non-zero on a failure.

    python tests/compat/check_ui.py [--json OUT] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class Checks:
    def __init__(self):
        self.results: list[dict] = []

    def run(self, name: str, fn, *args):
        start = time.perf_counter()
        try:
            detail = fn(*args)
            ok, err = True, None
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            ok, err, detail = False, f"{type(exc).__name__}: {exc}", traceback.format_exc()
        seconds = time.perf_counter() - start
        self.results.append({"check": name, "ok": ok, "seconds": round(seconds, 2), "error": err})
        print(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s)" + (f": {err}" if err else ""), flush=True)
        if not ok:
            print(detail, file=sys.stderr)
        return detail if ok else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_assets(folder: Path) -> dict:
    """A diffusers-format SPO-style LoRA for SD1.5 (random), and two PNG images."""
    import torch
    from PIL import Image

    from spo_core.lora import LoRA, LoRAModule, load_table, save_lora

    table = load_table("sd15")
    g = torch.Generator().manual_seed(0)
    lora = LoRA(table)
    for m in table.select(("unet",), ["attn"]):
        if m.name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            lora.modules[(m.component, m.name)] = LoRAModule(
                m, torch.randn((4, m.in_features), generator=g) * 0.1, torch.randn((m.out_features, 4), generator=g) * 0.1, 4.0)
    src = folder / "spo_diffusers.safetensors"
    save_lora(lora, src, fmt="diffusers")
    flat = folder / "flat.png"
    Image.new("RGB", (64, 64), (120, 120, 120)).save(flat)
    noisy = folder / "noisy.png"
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(noisy)
    return {"lora": src, "images": [flat, noisy]}


def build_standalone(out_dir: Path):
    from spo_core.ui import StandaloneHost, build_blocks

    demo = build_blocks(StandaloneHost(out_dir))
    config = demo.get_config_file()
    names = {c.get("props", {}).get("label") for c in config["components"]}
    assert {"LoRA file", "scorer", "images", "prompt"} <= names, names
    return demo


def build_webui_tab(models: Path):
    """The extension loaded against the stand-in modules, as A1111 loads it; its tab and script UI."""
    import gradio as gr

    stub = ROOT / "tests" / "webui_stub"
    os.environ["SPO_STUB_MODELS"] = str(models)
    for sub in ("Lora", "Stable-diffusion", "SPO"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(stub))
    from modules import script_callbacks, scripts, sd_samplers

    scripts.load_script(str(ROOT / "webui_extension" / "scripts" / "spo_pack.py"), str(ROOT / "webui_extension"))
    script_callbacks.before_ui_callback()
    script_callbacks.ui_settings_callback()
    (blocks, title, _), = script_callbacks.ui_tabs_callback()
    assert title == "SPO"
    blocks.get_config_file()
    assert "SPO Euler a (k candidates)" in sd_samplers.all_samplers_map
    script = next(cls() for cls in scripts.scripts_data if cls().title() == "SPO sampler")
    with gr.Blocks(analytics_enabled=False) as txt2img:
        components = script.ui(False)
    txt2img.get_config_file()
    from spo_webui.options import ARG_NAMES

    assert len(components) == len(ARG_NAMES) == 10  # k, policy, window, scorer, weights, every + the FK fields
    return f"tab + {len(components)} script controls"


def client_for(url: str):
    from gradio_client import Client

    try:
        return Client(url, verbose=False)
    except TypeError:
        return Client(url)


def file_arg(path: Path):
    import gradio_client

    handle = getattr(gradio_client, "handle_file", None)
    return handle(str(path)) if handle else str(path)


def text_of(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_inspect(client, assets) -> str:
    status, report = client.predict(str(assets["lora"]), api_name="/lora_inspect")
    assert "128 LoRA" in report and "diffusers" in report, report[:400]
    return report.splitlines()[-1]


def check_convert(client, assets, out_dir: Path) -> str:
    (status,) = _tuple(client.predict(str(assets["lora"]), "webui", "keep", "spo_webui", False, False, api_name="/lora_convert"))
    assert "wrote" in text_of(status), status
    from spo_core.safe_io import read_safetensors_header

    _, meta = read_safetensors_header(out_dir / "spo_webui.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora", meta
    # a second convert to the same name is refused with a message in the page
    (status,) = _tuple(client.predict(str(assets["lora"]), "webui", "keep", "spo_webui", False, False, api_name="/lora_convert"))
    assert "exists" in text_of(status) and "spo-status spo-error" in text_of(status), status
    return "converted, metadata ok, overwrite refused"


def check_score(client, assets) -> str:
    files = [file_arg(p) for p in assets["images"]]
    status, table, gallery = client.predict(files, "", "jpeg_incompressibility", "", 0, api_name="/score")
    assert "done" in text_of(status), status
    table = text_of(table)
    rows = table.count("<tr>") - 1
    assert rows == 2 and table.index("noisy") < table.index("flat"), table  # random pixels compress worst
    return f"{rows} images ranked"


def check_sample(client, model_dir: Path) -> str:
    args = [str(model_dir), "a red cube", "", 4, 5.0, 1, 0, "Karras", 2, "greedy", 0, 999, 1, 1.0, "max", 10.0, False,
            "jpeg_compressibility", ""]
    status, image, grid, summary = client.predict(*args, api_name="/sample")
    assert "done" in text_of(status), status
    assert "4 steps" in summary and "2 candidates" in summary, summary
    return summary


def check_train(client, model_dir: Path, out_dir: Path) -> str:
    args = [str(model_dir), "ddpo", "auto", "a red cube\na blue ball", None, "", "jpeg_compressibility", "", 1, 0, 0, 0,
            2, 2, 0, 4, -1, 0, False, "auto", 0, -1, 1, "compat_ddpo", False, True]
    status, plot, preview, result = client.predict(*args, api_name="/train")
    assert "done" in text_of(status), status
    assert "trained 1 steps" in result and (out_dir / "compat_ddpo.safetensors").is_file(), result
    return result.splitlines()[0]


def _tuple(value):
    return value if isinstance(value, (tuple, list)) else (value,)


def tiny_model_dir(folder: Path) -> Path | None:
    try:
        from spo_core.testing import tiny_sd15_pipeline
    except Exception:
        return None
    try:
        pipe = tiny_sd15_pipeline(seed=0)
    except Exception as exc:  # diffusers/transformers absent or not importable with this gradio's hub
        print(f"note: no Sample check ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    out = folder / "tiny-sd15"
    pipe.save_pretrained(out)
    return out


def versions() -> dict:
    """Versions and locations of the packages whose pins matter (a compat venv must shadow the base venv)."""
    import importlib

    out = {}
    for name in ("gradio", "gradio_client", "fastapi", "pydantic", "huggingface_hub", "httpx", "starlette", "torch"):
        try:
            m = importlib.import_module(name)
            out[name] = {"version": getattr(m, "__version__", "?"), "file": getattr(m, "__file__", "")}
        except Exception as exc:  # noqa: BLE001
            out[name] = {"version": None, "error": f"{type(exc).__name__}: {exc}"[:200]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--keep", help="work folder (default: a temporary one)")
    parser.add_argument("--no-sample", action="store_true", help="skip the Sample check even where diffusers imports")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import gradio

    work = Path(args.keep or tempfile.mkdtemp(prefix="spo_compat_"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "out"
    checks = Checks()
    pins = versions()
    print(f"gradio {gradio.__version__}, python {sys.version.split()[0]}, work folder {work}", flush=True)
    print("  " + ", ".join(f"{k} {v.get('version')}" for k, v in pins.items()), flush=True)
    assets = checks.run("assets", make_assets, work)
    demo = checks.run("build standalone Blocks", build_standalone, out_dir)
    checks.run("build WebUI tab + script (stub modules)", build_webui_tab, work / "webui-models")
    model_dir = None if args.no_sample else tiny_model_dir(work)
    if demo is not None and assets is not None:
        port = free_port()
        demo.queue()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, inbrowser=False)
        try:
            client = checks.run("gradio_client connects", client_for, f"http://127.0.0.1:{port}/")
            if client is not None:
                checks.run("LoRA tools: inspect", check_inspect, client, assets)
                checks.run("LoRA tools: convert", check_convert, client, assets, out_dir)
                checks.run("Score", check_score, client, assets)
                if model_dir is not None:
                    checks.run("Sample", check_sample, client, model_dir)
                    checks.run("Train", check_train, client, model_dir, out_dir)
        finally:
            demo.close()
    passed = sum(r["ok"] for r in checks.results)
    failed = len(checks.results) - passed
    if args.json:
        Path(args.json).write_text(json.dumps({"gradio": gradio.__version__, "python": sys.version.split()[0],
                                               "versions": pins, "results": checks.results}, indent=2))
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
