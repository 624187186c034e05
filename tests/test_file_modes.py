"""What the pack writes for people and other programs honours the umask (0644 under 022), like
ComfyUI's own outputs: a WebUI or ComfyUI running as another user can read it (issue 15)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from PIL import Image

from spo_core.lora import save_lora
from spo_core.lora.tables import load_table

from lora_helpers import random_lora, spo_modules


@pytest.fixture
def umask_022(monkeypatch):
    import spo_core.safe_io as sio

    old = os.umask(0o022)
    monkeypatch.setattr(sio, "_UMASK", 0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_loras_pngs_and_json_are_0644(tmp_path, umask_022):
    from spo_core.cli.sample_cmd import save_images
    from spo_core.plots import save_png
    from spo_core.safe_io import atomic_output

    table = load_table("sd15")
    lora = random_lora(table, spo_modules(table)[:4], rank=2)
    for fmt in ("webui", "diffusers"):
        assert _mode(save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt=fmt)) == 0o644
    peft = save_lora(lora, tmp_path / "peft", fmt="peft")
    assert _mode(peft) == 0o755 and _mode(peft / "adapter_model.safetensors") == 0o644
    save_png(Image.new("RGB", (8, 8)), tmp_path / "plot.png")
    assert _mode(tmp_path / "plot.png") == 0o644
    [png] = save_images(torch.zeros(1, 3, 8, 8), str(tmp_path / "sample.png"), overwrite=False)
    assert _mode(png) == 0o644
    with atomic_output(tmp_path / "report.json") as tmp:
        tmp.write_text("{}")
    assert _mode(tmp_path / "report.json") == 0o644


def test_a_training_runs_files_are_readable_by_others(tmp_path, umask_022):
    from test_training_support import BrightnessScorer, single_thread, spo_config, tiny_host
    from spo_core.training import train

    with single_thread():
        result = train(spo_config(tmp_path, max_steps=1, checkpoint_every=1), tiny_host(), BrightnessScorer())
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".spo-run.lock"]
    assert result.lora_path in files
    bad = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files if _mode(p) & 0o044 != 0o044}
    assert not bad, bad
    folders = [p for p in tmp_path.rglob("*") if p.is_dir()]
    assert all(_mode(p) & 0o055 == 0o055 for p in folders), {str(p): oct(_mode(p)) for p in folders}
