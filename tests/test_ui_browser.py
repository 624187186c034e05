"""The standalone app in a real browser: Debian's chromium driven headless by Playwright.

`spo ui` is started in its own process on a free 127.0.0.1 port; the test converts a LoRA (diffusers -> webui) and
scores images through the page, and checks what the page shows: the status line, the written
file's metadata, the error shown when the same output is written twice, the score table.
Skips when chromium or playwright is absent (CI: `apt-get install -y chromium` and
`pip install playwright`; never `playwright install`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("SPO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
TIMEOUT_MS = 90_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    if not CHROMIUM:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api")
    pytest.importorskip("gradio")
    from spo_core.lora import load_table, save_lora

    work = tmp_path_factory.mktemp("browser")
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from lora_helpers import random_lora, spo_modules
    finally:
        sys.path.remove(str(Path(__file__).parent))
    table = load_table("sd15")
    lora = save_lora(random_lora(table, spo_modules(table)), work / "spo_release.safetensors", fmt="diffusers")
    flat, noisy = work / "flat.png", work / "noisy.png"
    Image.new("RGB", (64, 64), (40, 90, 200)).save(flat)
    g = torch.Generator().manual_seed(1)
    Image.fromarray((torch.rand((64, 64, 3), generator=g) * 255).to(torch.uint8).numpy()).save(noisy)

    out = work / "out"
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    log = open(work / "app.log", "w")
    # the app as a user starts it: `spo ui`, in its own process
    proc = subprocess.Popen([sys.executable, "-m", "spo_core", "ui", "--port", str(port), "--output-dir", str(out)],
                            cwd=str(Path(__file__).resolve().parents[1]), env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"spo ui exited with {proc.returncode}:\n{(work / 'app.log').read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except Exception:
            if time.time() > deadline:
                proc.kill()
                pytest.fail(f"spo ui did not start:\n{(work / 'app.log').read_text()[-4000:]}")
            time.sleep(0.5)
    yield {"url": url, "lora": lora, "images": [flat, noisy], "out": out, "work": work}
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app["url"], wait_until="domcontentloaded")
        page.get_by_text("SPO: step-aware preference optimization").first.wait_for()
        yield page
        browser.close()


def _fill(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(text)
    box.dispatch_event("input")
    box.blur()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).first.click()


def test_convert_a_lora_in_the_page(app, page):
    from spo_core.safe_io import read_safetensors_header

    _tab(page, "LoRA tools")
    _tab(page, "Convert")
    _fill(page, "spo_convert_src", str(app["lora"]))
    _fill(page, "spo_convert_out", "spo_for_webui")
    page.locator("#spo_convert_btn").click()
    status = page.locator("#spo_convert_status")
    status.get_by_text("wrote").wait_for()
    text = status.inner_text()
    assert "diffusers LoRA for sd15: 128 modules" in text and "spo_for_webui.safetensors" in text
    _, meta = read_safetensors_header(app["out"] / "spo_for_webui.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"

    # the same output again: refused, and the page says why
    page.locator("#spo_convert_btn").click()
    page.locator("#spo_convert_status .spo-error").wait_for()
    assert "exists" in page.locator("#spo_convert_status").inner_text()
    page.screenshot(path=str(app["work"] / "convert.png"))


def test_score_images_in_the_page(app, page):
    _tab(page, "Score")
    page.locator("#spo_score_images input[type=file]").set_input_files([str(p) for p in app["images"]])
    page.locator("#spo_score_images").get_by_text("noisy.png").first.wait_for()
    page.locator("#spo_score_btn").click()
    table = page.locator("#spo_score_table table.spo-scores")
    table.wait_for()
    rows = table.locator("tbody tr")
    assert rows.count() == 2
    names = [rows.nth(i).locator("td").nth(1).inner_text() for i in range(2)]
    scores = [float(rows.nth(i).locator("td").nth(2).inner_text()) for i in range(2)]
    # default scorer jpeg_compressibility = minus the JPEG size: the flat image ranks first
    assert names == ["flat.png", "noisy.png"] and scores[0] > scores[1]
    assert "jpeg_compressibility" in table.locator("thead").inner_text()
    assert "done" in page.locator("#spo_score_status").inner_text()
    page.screenshot(path=str(app["work"] / "score.png"))
