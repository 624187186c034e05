"""install.py: installs only what is missing, never moves a host's pins, links the WebUI extension."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_install():
    spec = importlib.util.spec_from_file_location("spo_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nothing_missing_in_this_environment(capsys):
    install = _load_install()
    assert install.main(["--host", "standalone", "--extras", "all", "--dry-run"]) == 0
    assert "nothing to install" in capsys.readouterr().out


def test_webui_host_never_installs_pinned_packages(monkeypatch, capsys):
    install = _load_install()
    present = {"safetensors", "numpy", "pillow", "tqdm"}
    monkeypatch.setattr(install, "is_installed", lambda dist: dist in present)
    todo = install.missing(install.CORE + install.EXTRAS["all"], "webui")
    assert todo == ["open_clip_torch>=2.20", "accelerate>=0.24"]
    for never in ("gradio", "transformers", "diffusers", "peft", "huggingface_hub", "fastapi", "pydantic", "torch"):
        assert not any(r.startswith(never) for r in todo)


def test_webui_host_goes_through_launch_run_pip(tmp_path):
    """Run install.py as the WebUI does: a subprocess with the WebUI root (with launch.py) on PYTHONPATH."""
    fake = tmp_path / "webui"
    fake.mkdir()
    log = tmp_path / "pip.log"
    (fake / "launch.py").write_text(
        "def is_installed(name):\n    return False\n"
        f"def run_pip(command, desc=None):\n    open({str(log)!r}, 'a').write(command + '\\n')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(fake))
    env.pop("SPO_INSTALL_HOST", None)
    out = subprocess.run([sys.executable, str(ROOT / "webui_extension" / "install.py")], cwd=fake, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # every core package is present here, so nothing is installed, and nothing pinned ever is
    text = log.read_text() if log.exists() else ""
    for never in ("gradio", "transformers", "diffusers", "peft", "huggingface", "fastapi", "pydantic"):
        assert never not in text


def test_constraints_pin_every_installed_distribution():
    install = _load_install()
    path = install.installed_constraints()
    try:
        lines = Path(path).read_text().splitlines()
    finally:
        os.unlink(path)
    names = {line.split("==")[0].lower() for line in lines}
    assert {"torch", "safetensors", "numpy"} <= names
    assert all("==" in line for line in lines)


def test_link_webui_extension(tmp_path):
    install = _load_install()
    (tmp_path / "extensions").mkdir()
    target = install.link_webui_extension(str(tmp_path))
    assert os.path.islink(target) and Path(target, "install.py").is_file()
    with pytest.raises(SystemExit, match="exists"):
        install.link_webui_extension(str(tmp_path))
    copied = install.link_webui_extension(str(tmp_path), copy=True, overwrite=True)
    assert not os.path.islink(copied) and Path(copied, "spo_core", "lora", "tables", "sdxl.json.gz").is_file()
    with pytest.raises(SystemExit, match="WebUI root"):
        install.link_webui_extension(str(tmp_path / "nowhere"))
