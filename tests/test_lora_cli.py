"""`spo lora` end to end: inspect, convert, extract, merge, resize, and their error exits."""

import json

import pytest
import torch

from spo_core.cli import main
from spo_core.lora import read_lora, save_lora
from spo_core.lora.merge import merge_into_modules
from spo_core.lora.tables import load_table
from spo_core.safe_io import save_safetensors
from spo_core.testing import real_unet

from lora_helpers import random_lora, spo_modules


@pytest.fixture
def diffusers_file(tmp_path):
    table = load_table("sd15")
    lora = random_lora(table, spo_modules(table), rank=4)
    sd = {}
    for m in lora.modules.values():
        sd[f"unet.{m.info.name}.lora.down.weight"], sd[f"unet.{m.info.name}.lora.up.weight"] = m.down, m.up
    path = tmp_path / "spo-sd-v1-5_lora_diffusers.safetensors"
    save_safetensors(sd, path)
    return path


def test_inspect_table_and_json(diffusers_file, capsys):
    assert main(["lora", "inspect", str(diffusers_file)]) == 0
    out = capsys.readouterr().out
    assert "diffusers LoRA for sd15: 128 modules (unet), rank 4; all keys matched" in out
    assert "down_blocks.0" in out and "mid_block" in out
    assert main(["lora", "inspect", "--json", str(diffusers_file)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["arch"] == "sd15" and data["modules"] == 128 and data["ok"]


def test_convert_to_webui_and_back(diffusers_file, tmp_path, capsys):
    webui = tmp_path / "spo_webui.safetensors"
    assert main(["lora", "convert", str(diffusers_file), str(webui)]) == 0
    lora = read_lora(webui)
    assert lora.source_format == "kohya" and lora.metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert main(["lora", "convert", str(diffusers_file), str(webui)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["lora", "convert", str(webui), str(webui), "--overwrite"]) == 2  # never over its own input
    assert "is the input" in capsys.readouterr().err
    assert main(["lora", "convert", str(webui), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert read_lora(tmp_path / "peft").source_format == "peft"


def test_bad_file_exits_2_with_a_message(tmp_path, capsys):
    assert main(["lora", "inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_extract_merge_resize_on_single_file_checkpoints(tmp_path, capsys):
    """Real SD1.5-size single-file checkpoints would be 3.4 GB; a UNet-only LDM file of the
    real architecture is enough to exercise the CLI path (attention modules only)."""
    table = load_table("sd15")
    gen = torch.Generator().manual_seed(0)
    mods = spo_modules(table)[:8]
    base = {f"model.diffusion_model.{m.ldm}.weight": torch.randn(m.shape, generator=gen) for m in mods}
    truth = random_lora(table, mods, rank=2, alpha=2.0)
    tuned = {k: v.clone() for k, v in base.items()}
    for m in mods:
        tuned[f"model.diffusion_model.{m.ldm}.weight"] += truth.modules[("unet", m.name)].delta()
    # cross-attention probe key so the architecture is detected from the file itself
    probe = table.get("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    for sd in (base, tuned):
        sd[f"model.diffusion_model.{probe.ldm}.weight"] = torch.zeros(probe.shape)
    save_safetensors(base, tmp_path / "base.safetensors")
    save_safetensors(tuned, tmp_path / "tuned.safetensors")
    out = tmp_path / "extracted.safetensors"
    assert main(["lora", "extract", "--base", str(tmp_path / "base.safetensors"), "--tuned", str(tmp_path / "tuned.safetensors"),
                 "--rank", "2", "--svd", "full", "--dtype", "fp32", "--report", str(tmp_path / "rep.json"), str(out)]) == 0
    text = capsys.readouterr().out
    assert "8 layers extracted" in text
    lora = read_lora(out)
    assert len(lora.modules) == 8 and lora.arch == "sd15"
    assert json.loads((tmp_path / "rep.json").read_text())["total_retained_energy"] > 0.9999

    merged = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", "--checkpoint", str(tmp_path / "base.safetensors"), "--lora", str(out), str(merged)]) == 0
    from safetensors.torch import load_file

    got = load_file(merged)
    for key, value in tuned.items():
        torch.testing.assert_close(got[key], value, atol=1e-4, rtol=1e-4)

    resized = tmp_path / "r1.safetensors"
    assert main(["lora", "resize", str(out), str(resized), "--rank", "1"]) == 0
    assert set(read_lora(resized).ranks()) == {1}


def test_inspect_a_custom_model_lora_says_unknown_then_fits_with_model(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from spo_core.world import load_world_backend

    from spo_core.lora import to_webui

    table = load_world_backend().module_table()
    path = tmp_path / "world_lora.safetensors"
    # a file without the module table the pack writes into its own LoRAs (e.g. from another trainer)
    save_safetensors(to_webui(random_lora(table, spo_modules(table), rank=4)), path)
    assert main(["lora", "inspect", str(path)]) == 1  # its shapes fit no SD model
    out = capsys.readouterr().out
    assert "base model  unknown" in out and "--model" in out
    assert main(["lora", "inspect", str(path), "--model", "world", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["modules"] == len(spo_modules(table)) and data["arch"].startswith("custom")
    assert main(["lora", "inspect", str(path), "--model", "world", "--arch", "sd15"]) == 2
    capsys.readouterr()
    # the pack's own LoRA of the same model carries the model's table: every verb reads it as it is
    own = tmp_path / "own.safetensors"
    save_lora(random_lora(table, spo_modules(table), rank=4), own, fmt="webui")
    assert main(["lora", "inspect", str(own), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == table.arch
    assert main(["lora", "convert", str(own), str(tmp_path / "own_diffusers.safetensors"), "--to", "diffusers"]) == 0
    assert main(["lora", "resize", str(own), str(tmp_path / "own_r2.safetensors"), "--rank", "2"]) == 0
