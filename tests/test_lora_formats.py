"""Reading and writing every LoRA format, checked against diffusers and peft themselves."""

import copy
import io
import json
import logging

import pytest
import torch

from spo_core.lora import read_lora, save_lora, table_for_pipeline, to_diffusers, to_peft, to_webui
from spo_core.lora.model import LoRA, LoRAModule
from spo_core.lora.tables import live_te_name, load_table
from spo_core.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

from lora_helpers import assert_same_deltas, random_factors, random_lora, spo_modules


def _tiny_lora(pipe, alpha=3.0, rank=2, seed=0):
    table = table_for_pipeline(pipe)
    te = [m for m in table.select(("te1", "te2")) if m.kind == "linear" and m.name != "text_projection"]
    return random_lora(table, table.select(("unet",), ["attn", "ff", "proj"]) + te, rank=rank, alpha=alpha, seed=seed)


def _weights(pipe):
    out = {"unet": copy.deepcopy(pipe.unet.state_dict()), "te1": copy.deepcopy(pipe.text_encoder.state_dict())}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["te2"] = copy.deepcopy(pipe.text_encoder_2.state_dict())
    return out


def _roots(pipe):
    return {"unet": pipe.unet, "te1": pipe.text_encoder, "te2": getattr(pipe, "text_encoder_2", None)}


@pytest.fixture
def diffusers_warnings():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    yield stream
    for lg in loggers:
        lg.removeHandler(handler)


@pytest.mark.parametrize("make_pipe", [tiny_sd15_pipeline, tiny_sdxl_pipeline], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("fmt", ["webui", "diffusers"])
def test_our_files_load_in_diffusers_with_no_stray_keys_and_exact_weights(tmp_path, make_pipe, fmt, diffusers_warnings, recwarn):
    lora = _tiny_lora(make_pipe())
    path = tmp_path / f"lora_{fmt}.safetensors"
    save_lora(lora, path, fmt=fmt)
    pipe = make_pipe()
    base = _weights(pipe)
    pipe.load_lora_weights(str(path))
    messages = diffusers_warnings.getvalue() + " ".join(str(w.message) for w in recwarn)
    for word in ("unexpected", "missing", "inconsistency", "not found"):
        assert word not in messages.lower(), messages
    pipe.fuse_lora()
    roots = _roots(pipe)
    for (comp, name), m in lora.modules.items():
        live = name if comp == "unet" else live_te_name(name, roots[comp])
        module = roots[comp].get_submodule(live)
        weight = (module.base_layer.weight if hasattr(module, "base_layer") else module.weight).detach()
        expected = base[comp][live + ".weight"] + m.delta()
        torch.testing.assert_close(weight, expected, atol=1e-6, rtol=1e-5)


def test_read_diffusers_save_lora_weights_output(tmp_path):
    """The official SPO LoRAs were written by diffusers' save_lora_weights from a peft UNet."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = tiny_sd15_pipeline()
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    pipe.unet.add_adapter(config)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(str(tmp_path), unet_lora_layers=sd, safe_serialization=True)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lora = read_lora(path, arch=table_for_pipeline(tiny_sd15_pipeline()))
    assert lora.is_clean() and lora.source_format == "diffusers"
    peft_modules = {n: m for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    assert len(lora.modules) == len(peft_modules) > 0
    for name, module in peft_modules.items():
        expected = module.get_delta_weight("default")
        torch.testing.assert_close(lora.modules[("unet", name)].delta(), expected, atol=1e-7, rtol=1e-5)


def test_read_peft_folder_with_alpha_and_rank_patterns(tmp_path):
    from peft import LoraConfig, get_peft_model

    pipe = tiny_sd15_pipeline()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_in"],
                        rank_pattern={"proj_in": 2}, alpha_pattern={"to_v": 3}, init_lora_weights="gaussian")
    model = get_peft_model(pipe.unet, config)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(str(tmp_path / "adapter"))
    lora = read_lora(tmp_path / "adapter", arch=table_for_pipeline(tiny_sd15_pipeline()))
    assert lora.is_clean() and lora.source_format == "peft", (lora.unmatched, lora.problems)
    peft_modules = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(lora.modules) == len(peft_modules)
    for name, module in peft_modules.items():
        torch.testing.assert_close(lora.modules[("unet", name)].delta(), module.get_delta_weight("default"), atol=1e-7, rtol=1e-5)
    assert {m.rank for m in lora.modules.values()} == {2, 4}


def test_our_peft_output_loads_with_peft(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    pipe = tiny_sd15_pipeline()
    table = table_for_pipeline(pipe)
    mods = table.select(("unet",), ["attn", "proj"])
    lora = random_lora(table, mods, rank=3, alpha=5.0)
    lora.modules[next(iter(lora.modules))].alpha = 2.0  # one module with its own alpha -> alpha_pattern
    save_lora(lora, tmp_path / "peft", fmt="peft")
    config = LoraConfig.from_pretrained(str(tmp_path / "peft"))
    unet = copy.deepcopy(pipe.unet)
    inject_adapter_in_model(config, unet)
    sd = {k.removeprefix("base_model.model."): v for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    result = set_peft_model_state_dict(unet, sd)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora" in k]
    for (comp, name), m in lora.modules.items():
        torch.testing.assert_close(unet.get_submodule(name).get_delta_weight("default"), m.delta(), atol=1e-7, rtol=1e-5)


def test_old_diffusers_attention_processor_keys():
    table = load_table("sd15")
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for m in spo_modules(table)[:8]:
        proc = m.name.replace(".to_out.0", ".processor.to_out").replace(".to_q", ".processor.to_q").replace(".to_k", ".processor.to_k").replace(".to_v", ".processor.to_v")
        down, up = random_factors(m, 4, gen)
        sd[f"unet.{proc}_lora.down.weight"] = down
        sd[f"unet.{proc}_lora.up.weight"] = up
    lora = read_lora(sd)
    assert lora.arch == "sd15" and lora.is_clean() and lora.source_format == "diffusers_old"
    assert {n for _, n in lora.modules} == {m.name for m in spo_modules(table)[:8]}


def test_comfy_generic_format_with_flattened_conv_and_full_diffs():
    """ComfyUI's trainer: diffusion_model.<ldm>.lora_up/down (conv down flattened 2-D), alpha 1, .diff / .diff_b."""
    table = load_table("sd15")
    gen = torch.Generator().manual_seed(2)
    conv = table.get("unet", "down_blocks.0.resnets.0.conv1")  # 3x3
    lin = table.get("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    norm = table.get("unet", "down_blocks.0.attentions.0.norm")
    sd = {}
    for m in (conv, lin):
        down, up = random_factors(m, 4, gen)
        sd[f"diffusion_model.{m.ldm}.lora_down.weight"] = down.flatten(1)
        sd[f"diffusion_model.{m.ldm}.lora_up.weight"] = up.flatten(1)
        sd[f"diffusion_model.{m.ldm}.alpha"] = torch.tensor(1.0)
    sd[f"diffusion_model.{norm.ldm}.diff"] = torch.randn(norm.shape, generator=gen)
    sd[f"diffusion_model.{norm.ldm}.diff_b"] = torch.randn(norm.shape, generator=gen)
    lora = read_lora(sd)
    assert lora.arch == "sd15" and lora.is_clean() and lora.source_format == "comfy"
    c = lora.modules[("unet", conv.name)]
    assert c.down.shape == (4, 320, 3, 3) and c.up.shape == (320, 4, 1, 1) and c.scale == 0.25
    expected = (sd[f"diffusion_model.{conv.ldm}.lora_up.weight"] @ sd[f"diffusion_model.{conv.ldm}.lora_down.weight"]).reshape(conv.shape) * 0.25
    torch.testing.assert_close(c.delta(), expected)
    assert ("unet", norm.name) in lora.diffs
    again = read_lora(to_webui(lora))  # kohya keeps the diffs
    assert ("unet", norm.name) in again.diffs and again.is_clean()
    with pytest.raises(Exception, match="cannot hold full weight differences"):
        to_diffusers(lora)


def test_locon_tucker_mid_is_folded_exactly():
    table = load_table("sd15")
    m = table.get("unet", "up_blocks.1.resnets.0.conv2")
    gen = torch.Generator().manual_seed(3)
    down = torch.randn(4, m.shape[1], 1, 1, generator=gen)
    mid = torch.randn(4, 4, 3, 3, generator=gen)
    up = torch.randn(m.out_features, 4, 1, 1, generator=gen)
    name = "lora_unet_" + m.name.replace(".", "_")
    lora = read_lora({f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid,
                      f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)})
    # the reference: apply down, then mid, then up as convolutions on an input, vs one conv with the delta
    x = torch.randn(1, m.shape[1], 6, 6, generator=gen)
    ref = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid, padding=1), up) * 0.5
    ours = torch.nn.functional.conv2d(x, lora.modules[("unet", m.name)].delta(), padding=1)
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())  # float32 rounding only


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl"])
def test_detects_architecture_from_shapes_for_every_naming(arch):
    table = load_table(arch)
    lora = random_lora(table, spo_modules(table)[:40], rank=2)
    for sd in (to_webui(lora), to_diffusers(lora)):
        assert read_lora(sd).arch == arch
    # kohya with LDM names, ComfyUI generic and lycoris prefixes, for every arch
    ldm, comfy, ly = {}, {}, {}
    for (c, n), m in lora.modules.items():
        for prefix, sd in ((f"lora_unet_{m.info.ldm.replace('.', '_')}", ldm), (f"diffusion_model.{m.info.ldm}", comfy),
                           (f"lycoris_{n.replace('.', '_')}", ly)):
            sd[prefix + ".lora_down.weight"], sd[prefix + ".lora_up.weight"] = m.down, m.up
    assert read_lora(ldm).source_format == "kohya-ldm" and read_lora(ldm).arch == arch
    assert read_lora(comfy).source_format == "comfy" and read_lora(comfy).arch == arch
    got = read_lora(ly)
    assert got.arch == arch and got.source_format == "lycoris"


def test_kohya_ldm_names_on_sd15_and_dtype_choice(tmp_path):
    table = load_table("sd15")
    lora = random_lora(table, spo_modules(table), rank=4, alpha=1.0)
    sd = {}
    for m in lora.modules.values():
        name = "lora_unet_" + m.info.ldm.replace(".", "_")
        sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"], sd[name + ".alpha"] = m.down, m.up, torch.tensor(1.0)
    got = read_lora(sd)
    assert got.source_format == "kohya-ldm" and got.arch == "sd15"
    assert_same_deltas(lora, got)
    path = save_lora(got, tmp_path / "half.safetensors", dtype="fp16")
    half = read_lora(path)
    assert {m.down.dtype for m in half.modules.values()} == {torch.float16}
    assert_same_deltas(lora, half, rel=2e-3)


def test_peft_dict_layout():
    table = load_table("sdxl")
    lora = random_lora(table, spo_modules(table)[:4] + [table.get("te2", "text_model.encoder.layers.0.mlp.fc1")], rank=2)
    out = to_peft(lora)
    assert set(out) == {"unet", "te2"}
    sd, cfg = out["te2"]
    assert list(sd)[0].startswith("base_model.model.text_model.")
    assert cfg["r"] == 2 and cfg["target_modules"] == ["text_model.encoder.layers.0.mlp.fc1"]
    json.dumps(cfg)
