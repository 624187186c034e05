"""The SPO Blocks on the gradio versions the hosts pin: tests/compat/check_ui.py run inside the
compat venvs built by tests/compat/make_venvs.sh (gradio 3.41.2 with A1111's pins, 4.40.0 with
Forge's). Each venv is skipped when it has not been built; SPO_COMPAT_DIR points elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPAT_DIR = Path(os.environ.get("SPO_COMPAT_DIR", ROOT / ".compat"))
CHECK = ROOT / "tests" / "compat" / "check_ui.py"
# venv name -> pins that must resolve inside the venv (not from the base venv appended by its .pth)
VENVS = {
    "gradio-3.41": {"gradio": "3.41.2", "fastapi": "0.94.0", "pydantic": "1.10.17", "huggingface_hub": "0.25.2"},
    "gradio-4.40": {"gradio": "4.40.0", "fastapi": "0.104.1", "pydantic": "2.8.2", "huggingface_hub": "0.26.2"},
}


def _run_check(python: str, tmp_path: Path, extra: list[str]) -> dict:
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.run([python, str(CHECK), "--json", str(out), "--keep", str(tmp_path / "work"), *extra],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"check failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VENVS))
def test_blocks_on_pinned_gradio(name, tmp_path):
    venv = COMPAT_DIR / name
    python = venv / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{venv} not built (bash tests/compat/make_venvs.sh)")
    result = _run_check(str(python), tmp_path, ["--no-sample"])
    for package, version in VENVS[name].items():
        got = result["versions"][package]
        assert got["version"] == version, (package, got)
        assert str(venv.resolve()) in str(Path(got["file"]).resolve()), f"{package} resolved outside {venv}: {got['file']}"
    checks = {r["check"]: r["ok"] for r in result["results"]}
    assert all(checks.values()) and len(checks) >= 7, checks


@pytest.mark.slow
def test_blocks_on_installed_gradio_with_sampling(tmp_path):
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
    pytest.importorskip("diffusers")
    result = _run_check(sys.executable, tmp_path, [])
    checks = {r["check"]: r["ok"] for r in result["results"]}
    assert checks.get("Sample") and checks.get("Train") and all(checks.values()), checks
