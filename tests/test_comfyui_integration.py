"""Integration tests against a real ComfyUI checkout (set COMFYUI_PATH; skipped otherwise).

ComfyUI is loaded in this process (tests/comfy_support/harness.py), the pack through
ComfyUI's own `load_custom_node`, and workflows run through ComfyUI's executor with tiny
models built in code. LoRA key maps are ComfyUI's own for real-size SD1.5 / SDXL models
built on the meta device.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from comfy_support.harness import env_comfy_path, get_harness, meta_model_and_clip, run_node_class  # noqa: E402
from spo_core.errors import ModelMismatchError  # noqa: E402
from spo_core.lora import load_table  # noqa: E402

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(env_comfy_path() is None, reason="COMFYUI_PATH not set")]

SPO_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WARNINGS = ("lora key not loaded", "NOT LOADED", "ERROR lora", "SHAPE MISMATCH")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    return get_harness(tmp_path_factory.mktemp("comfyui"))


def _lora_warnings(h) -> list[str]:
    return [m for m in h.log.messages(logging.WARNING) if any(w in m for w in LORA_WARNINGS)]


# -- the pack loads ------------------------------------------------------------------------------


def test_pack_imports_and_registers_every_node(comfy):
    assert comfy.pack_loaded
    assert not [m for m in comfy.log.messages() if "IMPORT FAILED" in m and "main" in m]
    spo = {k: v for k, v in comfy.nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("SPO")}
    assert {"SPOLoadLoRA", "SPOSaveConvertLoRA", "SPOExtractLoRAFromModels", "SPOExtractLoRAFromFiles",
            "SPOLoadLoRAFromCheckpoint"} <= set(spo)
    for name, cls in spo.items():
        info = cls.GET_NODE_INFO_V1() if hasattr(cls, "GET_NODE_INFO_V1") else None
        assert cls.CATEGORY == "SPO"
        if info is not None:  # what /object_info serves
            assert info["category"] == "SPO" and info["display_name"] == comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[name]


# -- LoRA key maps of real-size SD1.5 / SDXL ---------------------------------------------------------


def _factors(shape, rank, g):
    n_in = 1
    for d in shape[1:]:
        n_in *= d
    return torch.randn(rank, n_in, generator=g) * 0.01, torch.randn(shape[0], rank, generator=g) * 0.01


def _spo_diffusers_file(path: Path, arch: str) -> tuple[list, list]:
    """SPO's released layout: unet.<diffusers path>.lora.down/up.weight on every attention projection."""
    g = torch.Generator().manual_seed(0)
    mods = [m for m in load_table(arch).select(("unet",), ["attn"]) if m.name.endswith(SPO_ATTN)]
    sd = {}
    for m in mods:
        down, up = _factors(m.shape, 1, g)
        sd[f"unet.{m.name}.lora.down.weight"], sd[f"unet.{m.name}.lora.up.weight"] = down, up
    save_file(sd, str(path))
    return mods, []


def _kohya_file(path: Path, arch: str) -> tuple[list, list]:
    """kohya sd-scripts' default targets (transformer Linear/Conv + text-encoder attention/MLP), with alphas."""
    g = torch.Generator().manual_seed(1)
    table = load_table(arch)
    unet = table.select(("unet",), ["attn", "ff", "proj"])
    te = [m for m in table.select(("te1", "te2")) if m.kind == "linear" and m.name != "text_projection"]
    sd = {}
    for m in unet + te:
        if m.component == "unet":
            name = "lora_unet_" + (m.ldm if arch == "sdxl" else m.name).replace(".", "_")
        else:
            name = ("lora_te_" if arch == "sd15" else "lora_te1_" if m.component == "te1" else "lora_te2_") + m.name.replace(".", "_")
        down, up = _factors(m.shape, 1, g)
        sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"], sd[name + ".alpha"] = down, up, torch.tensor(1.0)
    save_file(sd, str(path))
    return unet, te


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind", ["spo_diffusers", "kohya"])
def test_load_spo_lora_patches_every_module_of_real_key_maps(comfy, arch, kind):
    path = comfy.base / "models" / "loras" / f"{kind}_{arch}.safetensors"
    unet_mods, te_mods = (_spo_diffusers_file if kind == "spo_diffusers" else _kohya_file)(path, arch)
    model, clip = meta_model_and_clip(arch)
    comfy.log.clear()
    new_model, new_clip, text = run_node_class(comfy.node_class("SPOLoadLoRA"), model=model, clip=clip,
                                               lora_name=path.name, strength_model=1.0, strength_clip=1.0,
                                               allow_partial=False)
    assert _lora_warnings(comfy) == []
    assert set(new_model.patches) == {f"diffusion_model.{m.ldm}.weight" for m in unet_mods}
    clip_prefix = {"te1": "clip_l", "te2": "clip_g"}
    assert set(new_clip.patcher.patches) == {f"{clip_prefix[m.component]}.transformer.{m.name}.weight" for m in te_mods}
    assert f"applied {len(unet_mods)} UNet modules" in text


def test_sdxl_lora_on_sd15_model_is_refused(comfy):
    path = comfy.base / "models" / "loras" / "spo_diffusers_sdxl.safetensors"
    if not path.exists():
        _spo_diffusers_file(path, "sdxl")
    model, clip = meta_model_and_clip("sd15")
    with pytest.raises(ModelMismatchError, match="made for sdxl but the model is sd15"):
        run_node_class(comfy.node_class("SPOLoadLoRA"), model=model, clip=clip, lora_name=path.name,
                       strength_model=1.0, strength_clip=1.0, allow_partial=True)
    assert model.patches == {}


def test_converted_lora_loads_in_the_stock_lora_loader_without_warnings(comfy):
    src = comfy.base / "models" / "loras" / "spo_diffusers_sdxl.safetensors"
    if not src.exists():
        _spo_diffusers_file(src, "sdxl")
    path, _ = run_node_class(comfy.node_class("SPOSaveConvertLoRA"), lora_name=src.name, format="webui", dtype="fp16",
                             output_name="stock_check", allow_partial=False, overwrite=True)
    model, clip = meta_model_and_clip("sdxl")
    comfy.log.clear()
    name = Path(path).name  # output/loras is a loras search path, as in a running ComfyUI
    new_model, _ = run_node_class(comfy.node_class("LoraLoader"), model=model, clip=clip, lora_name=name,
                                  strength_model=1.0, strength_clip=1.0)
    assert _lora_warnings(comfy) == []
    assert len(new_model.patches) == len([m for m in load_table("sdxl").select(("unet",), ["attn"]) if m.name.endswith(SPO_ATTN)])
