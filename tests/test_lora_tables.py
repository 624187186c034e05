"""The module tables against the real architectures and diffusers' own LDM converter."""

import subprocess
import sys

import pytest
import torch

from spo_core.lora.table_build import build_table
from spo_core.lora.tables import KNOWN_ARCHS, load_table
from spo_core.testing import real_config, real_unet


@pytest.mark.parametrize("arch", KNOWN_ARCHS)
def test_shipped_tables_equal_fresh_build_from_meta_models(arch):
    shipped, fresh = load_table(arch), build_table(arch)
    assert shipped.modules == fresh.modules


def test_known_module_counts():
    sd15, sdxl = load_table("sd15"), load_table("sdxl")
    assert len(sd15.select(("unet",), ["attn"])) == 128  # 16 transformer blocks x 2 attn x 4 projections
    assert len(sdxl.select(("unet",), ["attn"])) == 560  # 70 transformer blocks x 2 x 4
    assert sd15.cross_attention_dim == 768 and sdxl.cross_attention_dim == 2048
    assert load_table("sd2").cross_attention_dim == 1024
    assert len([m for m in sd15.modules.values() if m.component == "te1" and m.kind == "linear"]) == 72
    te2 = [m for m in sdxl.modules.values() if m.component == "te2" and m.kind == "linear" and m.name != "text_projection"]
    assert len(te2) == 32 * 6


@pytest.mark.parametrize("arch", KNOWN_ARCHS)
def test_ldm_names_match_diffusers_single_file_converter(arch):
    """Every module's LDM name holds, under diffusers' own LDM->diffusers conversion, exactly
    that module's weight: keys and values (each tensor carries a unique id)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    table = load_table(arch)
    unet_keys = list(real_unet(arch).state_dict())
    ldm, ids = {}, {}
    for i, key in enumerate(unet_keys):
        module, _, param = key.rpartition(".")
        info = table.get("unet", module)
        assert info is not None and info.ldm, key
        ldm[f"model.diffusion_model.{info.ldm}.{param}"] = torch.full((1,), float(i))
        ids[key] = float(i)
    converted = convert_ldm_unet_checkpoint(ldm, real_config(arch, "unet"))
    assert set(converted) == set(unet_keys)
    for key, value in converted.items():
        assert float(value.flatten()[0]) == ids[key], key


def test_ldm_rule_on_a_tiny_custom_unet():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from spo_core.lora.table_build import table_for_pipeline
    from spo_core.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    table = table_for_pipeline(pipe)
    sd = pipe.unet.state_dict()
    ldm = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        ldm[f"model.diffusion_model.{table.get('unet', module).ldm}.{param}"] = value
    converted = convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config))
    assert set(converted) == set(sd)
    for key in sd:
        torch.testing.assert_close(converted[key].reshape(sd[key].shape), sd[key])


def test_lora_engine_imports_with_only_torch_safetensors_numpy():
    """The WebUI has no diffusers/peft and an old transformers: the engine must not need them."""
    code = (
        "import sys\n"
        "for name in ('diffusers', 'transformers', 'peft', 'open_clip', 'gradio', 'accelerate'):\n"
        "    sys.modules[name] = None\n"
        "import spo_core.lora as L\n"
        "t = L.load_table('sdxl')\n"
        "assert len(t.modules) > 1000\n"
        "import spo_core.cli.lora_cmd\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
