"""Against a real AUTOMATIC1111 or Forge checkout (WEBUI_PATH; skipped otherwise).

The WebUI is started on CPU with `--api`, a private `--data-dir` (the extension is linked into its
`extensions/` with install.py) and a random-weight SD1.5 checkpoint, then:
1. the SPO sampler, script and tab are registered (/sdapi/v1/samplers, /sdapi/v1/scripts);
2. txt2img with `<lora:spo_test:1>`, a LoRA written by our trainer's LoRA network and writer,
   is applied: its hash is in the infotext and the console shows no LoRA error;
3. txt2img with the SPO sampler and `alwayson_scripts` options runs and records them.

    WEBUI_PATH=/path/to/stable-diffusion-webui [WEBUI_PYTHON=.../venv/bin/python] pytest tests/test_webui_integration.py

The WebUI must be able to start offline: its `repositories/` present, its requirements installed,
and (A1111) the openai/clip-vit-large-patch14 config and tokenizer in the HF cache (this test
writes them into a private HF_HOME, built offline from open_clip's vocabulary). A1111 uses its
random-weight `test/test_files/empty.pt`; Forge needs a real-layout SD1.5 file (WEBUI_CKPT).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.webui, pytest.mark.slow]

WEBUI = os.environ.get("WEBUI_PATH")
ROOT = Path(__file__).resolve().parents[1]
SAMPLER = "SPO Euler a (k candidates)"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, payload: dict | None = None, timeout: float = 600) -> dict | list:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if payload is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else {}


def _is_forge(webui: Path) -> bool:
    return (webui / "modules_forge").is_dir()


def write_clip_cache(hf_home: Path) -> None:
    """openai/clip-vit-large-patch14's config.json and tokenizer files, made offline, in an HF cache."""
    import shutil

    from spo_core.clip_tokenizer import tokenizer_files

    snap = hf_home / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True, exist_ok=True)
    (snap.parents[1] / "refs").mkdir(exist_ok=True)
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    # the slow CLIPTokenizer files, readable by every transformers version (A1111 pins 4.30.2)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_files() / name, snap / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (snap / "special_tokens_map.json").write_text(json.dumps(special))
    (snap / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77, "do_lower_case": True,
                                                            "tokenizer_class": "CLIPTokenizer"}))
    text = json.loads((ROOT / "spo_core" / "configs" / "sd15" / "text_encoder" / "config.json").read_text())
    text = {k: v for k, v in text.items() if k not in ("architectures", "_name_or_path", "torch_dtype")}
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "text_config": text,
              "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "projection_dim": 768}}
    (snap / "config.json").write_text(json.dumps(config))


def trained_lora(path: Path) -> Path:
    """A LoRA from our trainer's LoRA network (injected into a real-size SD1.5 UNet) and its writer."""
    import torch

    from spo_core.lora import load_table, save_lora
    from spo_core.testing import real_unet
    from spo_core.training import LoRARoot, inject_lora

    table = load_table("sd15")
    unet = real_unet("sd15", device="cpu", dtype=torch.float32)
    net = inject_lora(LoRARoot(unet, "diffusers", ""), table, "attn", 4, 4.0, "gaussian", 0, device=torch.device("cpu"))
    with torch.no_grad():  # non-zero up factors: the LoRA must change the image
        g = torch.Generator().manual_seed(0)
        for branch in net.branches.values():
            branch.up.copy_(torch.randn(branch.up.shape, generator=g) * 1e-2)
    lora = net.to_lora()
    net.detach()
    save_lora(lora, path, fmt="webui", title=path.stem)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not WEBUI:
        pytest.skip("set WEBUI_PATH to an AUTOMATIC1111 or Forge checkout to run the WebUI integration tests")
    webui = Path(WEBUI).resolve()
    python = os.environ.get("WEBUI_PYTHON") or str(webui / "venv" / "bin" / "python")
    if not Path(python).exists():
        python = sys.executable
    data = tmp_path_factory.mktemp("webui-data")
    (data / "extensions").mkdir()
    (data / "models" / "Lora").mkdir(parents=True)
    (data / "models" / "SPO").mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    import install

    install.link_webui_extension(str(data))
    trained_lora(data / "models" / "Lora" / "spo_test.safetensors")
    hf_home = data / "hf"
    write_clip_cache(hf_home)
    forge = _is_forge(webui)
    ckpt = os.environ.get("WEBUI_CKPT") or str(webui / "test" / "test_files" / "empty.pt")
    port = _port()
    args = [python, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--no-half", "--precision", "full",
            "--api", "--api-server-stop", "--do-not-download-clip", "--disable-opt-split-attention", "--port", str(port),
            "--data-dir", str(data), "--ckpt", ckpt, "--lora-dir", str(data / "models" / "Lora"),
            "--always-cpu" if forge else "--use-cpu", *([] if forge else ["all"])]
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               GRADIO_ANALYTICS_ENABLED="False", IGNORE_CMD_ARGS_ERRORS="1")
    env.pop("PYTHONPATH", None)
    log_path = data / "webui.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(args, cwd=webui, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + float(os.environ.get("WEBUI_START_TIMEOUT", "600"))
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the WebUI exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}")
        # the API answers a few seconds before start-up ends (Forge registers always-on scripts and the
        # LoRA routes after it): wait for the "Startup time" line both WebUIs print when they are ready
        if "Startup time" in log_path.read_text(errors="replace"):
            try:
                _call(url + "/sdapi/v1/samplers", timeout=5)
                break
            except Exception:
                pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"the WebUI did not start in time:\n{log_path.read_text()[-6000:]}")
    yield {"url": url, "log": log_path, "forge": forge, "data": data}
    try:
        _call(url + "/sdapi/v1/server-stop", {}, timeout=10)
        proc.wait(10)
    except Exception:  # Forge closes its server but keeps its main loop running
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


def test_extension_registered(server):
    samplers = [s["name"] for s in _call(server["url"] + "/sdapi/v1/samplers")]
    assert SAMPLER in samplers
    scripts = _call(server["url"] + "/sdapi/v1/scripts")
    assert "spo sampler" in scripts["txt2img"] and "spo sampler" in scripts["img2img"]
    # Settings > SPO: its components are in the page (Forge's /sdapi/v1/options drops options that
    # extensions add: its pydantic response model is built before they are registered)
    config = _call(server["url"] + "/config")
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert "SPO sampler: default k (candidates per step)" in labels
    # the script's UI was built by this gradio: clicking the policy radio moves the window's top (fk: 999)
    ids = {}
    for c in config["components"]:
        ids.setdefault(c.get("props", {}).get("label"), set()).add(c["id"])
    policy_input = {}
    for index, dep in enumerate(config["dependencies"]):
        targets = [tuple(t) if isinstance(t, list) else (t, dep.get("trigger")) for t in dep["targets"]]
        if set(dep["outputs"]) & ids["window: highest timestep (0-999)"]:
            policy_input.update({i: dep.get("id", index) for i, event in targets if event == "input" and i in ids["policy"]})
    assert len(policy_input) == 2  # txt2img and img2img
    fn_index = next(iter(policy_input.values()))
    for route in ("/run/predict", "/api/predict"):  # the event's function, run by the WebUI's own gradio
        try:
            out = _call(server["url"] + route, {"fn_index": fn_index, "data": ["fk", 751], "session_hash": "spo"})
            break
        except urllib.error.HTTPError:
            continue
    else:
        pytest.fail("the WebUI's gradio runs no function by fn_index at /run/predict or /api/predict")
    assert out["data"][0] == 999
    assert "Error calling" not in server["log"].read_text()
    if not server["forge"]:
        assert _call(server["url"] + "/sdapi/v1/options").get("spo_default_k") == 4


def test_txt2img_applies_our_lora(server):
    _call(server["url"] + "/sdapi/v1/refresh-loras", {})
    loras = [x["name"] for x in _call(server["url"] + "/sdapi/v1/loras")]
    assert "spo_test" in loras
    common = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler a", "seed": 1}
    r = _call(server["url"] + "/sdapi/v1/txt2img", {"prompt": "a red cube <lora:spo_test:1>", **common})
    plain = _call(server["url"] + "/sdapi/v1/txt2img", {"prompt": "a red cube", **common})
    info = json.loads(r["info"])
    text = info["infotexts"][0]
    log = server["log"].read_text()
    assert "Networks with errors" not in text and "Networks with errors" not in log
    assert "Could not find a module type" not in log and "Lora not found" not in log
    if not server["forge"]:
        assert "Lora hashes: \"spo_test" in text or "spo_test:" in text, text
    else:
        assert "[LORA] Loaded" in log and "spo_test.safetensors" in log and "(skipped 0 keys)" in log
    assert abs(_pixels(r["images"][0]) - _pixels(plain["images"][0])).max() > 0  # the LoRA changes the image


def test_txt2img_with_the_spo_sampler(server):
    args = [2, "greedy", 0, 999, "jpeg_compressibility", "None", 1]
    r = _call(server["url"] + "/sdapi/v1/txt2img", {
        "prompt": "a red cube", "steps": 3, "width": 64, "height": 64, "sampler_name": SAMPLER, "seed": 7, "batch_size": 2,
        "alwayson_scripts": {"spo sampler": {"args": args}}})
    info = json.loads(r["info"])
    text = info["infotexts"][0]
    assert f"Sampler: {SAMPLER}" in text and "SPO k: 2" in text and "SPO scorer: jpeg_compressibility" in text, text
    assert len(r["images"]) == 2


def test_txt2img_with_fk_steering_over_the_api(server):
    """policy fk with the three trailing FK arguments: k particles per image, resampled by the scorer."""
    args = [3, "fk", 0, 999, "jpeg_compressibility", "None", 1, "diff", 5.0, False]
    r = _call(server["url"] + "/sdapi/v1/txt2img", {
        "prompt": "a red cube", "steps": 3, "width": 64, "height": 64, "sampler_name": SAMPLER, "seed": 7, "batch_size": 2,
        "alwayson_scripts": {"spo sampler": {"args": args}}})
    text = json.loads(r["info"])["infotexts"][0]
    assert "SPO policy: fk" in text and "SPO potential: diff" in text and "SPO lambda: 5" in text, text
    assert "SPO resamplings:" in text, text
    assert len(r["images"]) == 2


def _pixels(image_b64: str):
    import base64
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_b64.split(",", 1)[-1]))).convert("RGB")).astype(int)


def test_spo_sampler_with_one_candidate_is_the_stock_euler_a(server):
    """k = 1 draws the WebUI's own noise (p.rng): the same seed gives Euler a's image, image for image."""
    common = {"prompt": "a red cube", "steps": 4, "width": 64, "height": 64, "seed": 11, "batch_size": 2,
              "scheduler": "Karras"}
    stock = _call(server["url"] + "/sdapi/v1/txt2img", {**common, "sampler_name": "Euler a"})
    ours = _call(server["url"] + "/sdapi/v1/txt2img", {**common, "sampler_name": SAMPLER, "alwayson_scripts": {
        "spo sampler": {"args": [1, "greedy", 0, 999, "jpeg_compressibility", "None", 1]}}})
    assert len(stock["images"]) == len(ours["images"]) == 2
    for a, b in zip(stock["images"], ours["images"]):
        pa, pb = _pixels(a), _pixels(b)
        assert pa.shape == pb.shape and abs(pa - pb).max() <= 1, abs(pa - pb).max()
    other = _call(server["url"] + "/sdapi/v1/txt2img", {**common, "seed": 12, "sampler_name": SAMPLER, "alwayson_scripts": {
        "spo sampler": {"args": [1, "greedy", 0, 999, "jpeg_compressibility", "None", 1]}}})
    assert abs(_pixels(other["images"][0]) - _pixels(ours["images"][0])).max() > 1  # the seed matters


CLIENT_SNIPPET = r'''
import json, os, sys
import gradio_client
from gradio_client import Client
url, payload = sys.argv[1], json.loads(sys.argv[2])
try:
    client = Client(url, verbose=False)
except TypeError:
    client = Client(url)
# a file input: a path for gradio_client 0.x (A1111), handle_file(path) from 1.0 on (Forge)
wrap = getattr(gradio_client, "handle_file", None)
payload = [wrap(a) if wrap and isinstance(a, str) and os.path.isfile(a) else a for a in payload]
out = client.predict(*payload, api_name="/train")
print(json.dumps(list(out) if isinstance(out, (list, tuple)) else [out], default=str))
'''


TRAIN_INPUTS = ["model", "method", "preset", "prompts", "prompt_file", "pairs", "scorer", "weights", "max_steps", "lr", "rank",
                "k", "sample_bs", "train_bs", "size", "steps", "threshold", "beta", "gradient_checkpointing",
                "mixed_precision", "checkpoint_every", "validate_every", "seed", "name", "resume", "overwrite"]


def _train_payload(**values) -> list:
    defaults = dict(model="", method="spo", preset="auto", prompts="", prompt_file=None, pairs="", scorer="spm", weights=None,
                    max_steps=1, lr=0, rank=0, k=0, sample_bs=0, train_bs=0, size=0, steps=20, threshold=-1, beta=0,
                    gradient_checkpointing=False, mixed_precision="no", checkpoint_every=0, validate_every=-1, seed=1,
                    name="spo_lora", resume=False, overwrite=True)
    defaults.update(values)
    return [defaults[k] for k in TRAIN_INPUTS]


def test_train_tab_on_the_loaded_checkpoint(server, tmp_path):
    """The SPO tab's Train action through the WebUI's own gradio, driven with the WebUI's own
    gradio_client (0.5 on A1111: a real file for the file input, plain values back): SPO with a
    JPEG scorer, k 2, 64 px on the loaded checkpoint, the LoRA lands in the LoRA folder, and
    txt2img applies it."""
    python = os.environ.get("WEBUI_PYTHON") or sys.executable
    name = "spo_tab_trained"
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red cube\na blue ball\n")
    args = _train_payload(prompts="a red cube", prompt_file=str(prompt_file), scorer="jpeg_compressibility", max_steps=1,
                          k=2, sample_bs=2, train_bs=2, size=64, steps=4, name=name)
    proc = subprocess.run([python, "-c", CLIENT_SNIPPET, server["url"] + "/", json.dumps(args)], capture_output=True,
                          text=True, timeout=1800, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-4000:] + server["log"].read_text()[-4000:]
    status, _plot, _preview, result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "done" in status and "trained 1 steps" in result, (status, result, server["log"].read_text()[-4000:])
    lora = server["data"] / "models" / "Lora" / f"{name}.safetensors"
    assert lora.is_file() and "LoRA list refreshed" in result
    r = _call(server["url"] + "/sdapi/v1/txt2img", {"prompt": f"a red cube <lora:{name}:1>", "steps": 2, "width": 64,
                                                    "height": 64, "sampler_name": "Euler a", "seed": 1})
    text = json.loads(r["info"])["infotexts"][0]
    assert "Networks with errors" not in text and "Networks with errors" not in server["log"].read_text()
    if not server["forge"]:
        assert name in text, text


def test_a_run_without_pairs_says_what_to_change_and_publishes_nothing(server, tmp_path):
    """An impossible threshold makes no pairs: the tab says what was measured and what to change, and
    nothing is published."""
    python = os.environ.get("WEBUI_PYTHON") or sys.executable
    name = "spo_tab_nopairs"
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red cube\n")
    args = _train_payload(prompts="a red cube", prompt_file=str(prompt_file), scorer="jpeg_compressibility", max_steps=1, k=2, sample_bs=1, train_bs=1,
                          size=64, steps=3, threshold=0.9999, name=name)
    proc = subprocess.run([python, "-c", CLIENT_SNIPPET, server["url"] + "/", json.dumps(args)], capture_output=True,
                          text=True, timeout=1800, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])[0]
    assert "no candidate pair passed the threshold" in status and "Lower the threshold" in status, status
    assert not (server["data"] / "models" / "Lora" / f"{name}.safetensors").exists()
