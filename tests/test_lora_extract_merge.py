"""Extraction from fine-tuned checkpoints, merging into checkpoints, resizing."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from spo_core.errors import ConfigError, ModelMismatchError
from spo_core.lora import (CheckpointReader, StateDictSource, extract_lora, merge_into_checkpoint, merge_into_modules,
                           read_lora, resize_lora, save_lora, table_for_pipeline)
from spo_core.lora.extract import factorize
from spo_core.lora.model import LoRA
from spo_core.lora.tables import live_te_name, load_table
from spo_core.safe_io import save_safetensors
from spo_core.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

from lora_helpers import random_lora, spo_modules


def _known_delta_lora(table, rank=3, with_te=True, seed=5):
    mods = table.select(("unet",), ["attn", "ff", "proj"])
    if with_te:
        mods += [m for m in table.select(("te1", "te2")) if m.kind == "linear" and m.name != "text_projection"]
    return random_lora(table, mods, rank=rank, alpha=float(rank), seed=seed)


def _tuned_pipeline(make, lora):
    pipe = make()
    roots = {"unet": pipe.unet, "te1": pipe.text_encoder, "te2": getattr(pipe, "text_encoder_2", None)}
    merge_into_modules(roots, lora)
    return pipe


def _ldm_single_file(pipe, table, path, dtype=torch.float32):
    """Write a tiny pipeline as an LDM single-file checkpoint (SDXL: OpenCLIP layout for the second encoder)."""
    sd = {}
    for key, value in pipe.unet.state_dict().items():
        module, _, param = key.rpartition(".")
        sd[f"model.diffusion_model.{table.get('unet', module).ldm}.{param}"] = value.to(dtype)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    te1_prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        sd[te1_prefix + key] = value.to(dtype)
    if sdxl:
        sd.update(_openclip_layout(pipe.text_encoder_2, "conditioner.embedders.1.model.", dtype))
    save_safetensors(sd, path)
    return sd


def _openclip_layout(te, prefix, dtype):
    sd = {}
    tm = te.text_model
    for i, layer in enumerate(tm.encoder.layers):
        base = f"{prefix}transformer.resblocks.{i}."
        a = layer.self_attn
        sd[base + "attn.in_proj_weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).to(dtype)
        sd[base + "attn.in_proj_bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).to(dtype)
        sd[base + "attn.out_proj.weight"], sd[base + "attn.out_proj.bias"] = a.out_proj.weight.to(dtype), a.out_proj.bias.to(dtype)
        sd[base + "ln_1.weight"], sd[base + "ln_1.bias"] = layer.layer_norm1.weight.to(dtype), layer.layer_norm1.bias.to(dtype)
        sd[base + "ln_2.weight"], sd[base + "ln_2.bias"] = layer.layer_norm2.weight.to(dtype), layer.layer_norm2.bias.to(dtype)
        sd[base + "mlp.c_fc.weight"], sd[base + "mlp.c_fc.bias"] = layer.mlp.fc1.weight.to(dtype), layer.mlp.fc1.bias.to(dtype)
        sd[base + "mlp.c_proj.weight"], sd[base + "mlp.c_proj.bias"] = layer.mlp.fc2.weight.to(dtype), layer.mlp.fc2.bias.to(dtype)
    sd[prefix + "ln_final.weight"], sd[prefix + "ln_final.bias"] = tm.final_layer_norm.weight.to(dtype), tm.final_layer_norm.bias.to(dtype)
    sd[prefix + "text_projection"] = te.text_projection.weight.T.contiguous().to(dtype)
    sd[prefix + "token_embedding.weight"] = tm.embeddings.token_embedding.weight.to(dtype)
    sd[prefix + "positional_embedding"] = tm.embeddings.position_embedding.weight.to(dtype)
    return sd


def test_openclip_reader_matches_diffusers_converter(tmp_path):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    pipe = tiny_sdxl_pipeline()
    table = table_for_pipeline(pipe)
    sd = _ldm_single_file(pipe, table, tmp_path / "xl.safetensors")
    theirs = convert_open_clip_checkpoint(pipe.text_encoder_2, sd, prefix="conditioner.embedders.1.model.")
    reader = CheckpointReader(tmp_path / "xl.safetensors", arch=table)
    checked = 0
    for m in table.select(("te2",)):
        key = m.name + ".weight"
        if key in theirs:
            torch.testing.assert_close(reader.weight("te2", m.name), theirs[key].float())
            checked += 1
    assert checked >= 13  # q, k, v, out, fc1, fc2 x 2 layers + projection


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_extract_recovers_a_known_low_rank_delta_from_diffusers_folders(tmp_path, method):
    base = tiny_sd15_pipeline()
    table = table_for_pipeline(base)
    truth = _known_delta_lora(table, rank=3)
    base.save_pretrained(tmp_path / "base")
    _tuned_pipeline(tiny_sd15_pipeline, truth).save_pretrained(tmp_path / "tuned")
    with CheckpointReader(tmp_path / "base", arch=table) as b, CheckpointReader(tmp_path / "tuned", arch=table) as t:
        lora, rep = extract_lora(b, t, rank=3, method=method, text_encoders="auto")
    assert rep.text_encoders and set(lora.modules) == set(truth.modules)
    for key, m in truth.modules.items():
        d, e = m.delta(), lora.modules[key].delta()
        assert float((d - e).norm() / d.norm()) <= 1e-4, key
        assert lora.modules[key].rank == 3
    assert rep.total_retained_energy > 0.9999


def test_extract_from_single_file_ldm_checkpoints_sdxl_with_openclip_encoder(tmp_path):
    base = tiny_sdxl_pipeline()
    table = table_for_pipeline(base)
    truth = _known_delta_lora(table, rank=2)
    _ldm_single_file(base, table, tmp_path / "base.safetensors")
    _ldm_single_file(_tuned_pipeline(tiny_sdxl_pipeline, truth), table, tmp_path / "tuned.safetensors")
    with CheckpointReader(tmp_path / "base.safetensors", arch=table) as b, CheckpointReader(tmp_path / "tuned.safetensors", arch=table) as t:
        lora, rep = extract_lora(b, t, rank=2, method="full", text_encoders=True)
    te2 = [k for k in lora.modules if k[0] == "te2"]
    assert len(te2) == 12 and set(lora.modules) == set(truth.modules)
    for key, m in truth.modules.items():
        d = m.delta()
        assert float((d - lora.modules[key].delta()).norm() / d.norm()) <= 1e-4, key


def test_energy_mode_picks_per_layer_ranks_and_skips_unchanged_layers():
    table = load_table("sd15")
    gen = torch.Generator().manual_seed(0)
    mods = spo_modules(table)[:6]
    base = {m.name + ".weight": torch.randn(m.shape, generator=gen) for m in mods}
    tuned = dict(base)
    for i, m in enumerate(mods[:4]):
        rank = i + 1  # exact ranks 1..4
        tuned[m.name + ".weight"] = base[m.name + ".weight"] + torch.randn(m.shape[0], rank, generator=gen) @ torch.randn(rank, m.in_features, generator=gen)
    src_b, src_t = StateDictSource(table, {"unet": base}), StateDictSource(table, {"unet": tuned})
    lora, rep = extract_lora(src_b, src_t, rank=16, energy=0.999999, groups=["attn"], text_encoders=False, method="full")
    assert [lora.modules[("unet", m.name)].rank for m in mods[:4]] == [1, 2, 3, 4]
    assert len(rep.skipped) == len(spo_modules(table)) - 4
    assert all(x.retained_energy > 0.99999 for x in rep.layers)


def test_randomized_svd_keeps_energy_close_to_full():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(320, 24, generator=gen) @ torch.randn(24, 768, generator=gen) + 0.01 * torch.randn(320, 768, generator=gen)
    _, _, e_full = factorize(m, 16, None, "full")
    _, _, e_rand = factorize(m, 16, None, "randomized")
    assert e_rand >= e_full - 0.01


def test_extract_rejects_bad_settings_and_mixed_architectures():
    sd15, sdxl = load_table("sd15"), load_table("sdxl")
    with pytest.raises(ConfigError):
        extract_lora(StateDictSource(sd15, {}), StateDictSource(sd15, {}), rank=None, energy=None)
    with pytest.raises(ModelMismatchError, match="same architecture"):
        extract_lora(StateDictSource(sd15, {}), StateDictSource(sdxl, {}), rank=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_into_single_file_changes_only_lora_weights(tmp_path, dtype):
    pipe = tiny_sdxl_pipeline()
    table = table_for_pipeline(pipe)
    lora = _known_delta_lora(table, rank=2)
    original = _ldm_single_file(pipe, table, tmp_path / "in.safetensors", dtype=dtype)
    merge_into_checkpoint(tmp_path / "in.safetensors", lora, tmp_path / "out.safetensors", strength=0.5)
    merged = load_file(tmp_path / "out.safetensors")
    assert set(merged) == set(original)
    reader = CheckpointReader(tmp_path / "out.safetensors", arch=table)
    changed = set()
    for (comp, name), m in lora.modules.items():
        loc = reader.locations[(comp, name)]
        changed.add(loc.key)
        expected = CheckpointReader(tmp_path / "in.safetensors", arch=table).weight(comp, name) + 0.5 * m.delta()
        torch.testing.assert_close(reader.weight(comp, name), expected, atol=2e-3 if dtype == torch.float16 else 1e-6, rtol=1e-3)
    for key, value in merged.items():
        assert value.dtype == dtype
        if key not in changed:
            assert torch.equal(value, original[key]), key


def test_merge_into_diffusers_folder_equals_diffusers_fuse_lora(tmp_path):
    from diffusers import UNet2DConditionModel

    pipe = tiny_sd15_pipeline()
    table = table_for_pipeline(pipe)
    lora = _known_delta_lora(table, rank=2, with_te=False)
    lora.modules[next(iter(lora.modules))].alpha = 1.0
    pipe.save_pretrained(tmp_path / "base")
    save_lora(lora, tmp_path / "l.safetensors")
    merge_into_checkpoint(tmp_path / "base", read_lora(tmp_path / "l.safetensors", arch=table), tmp_path / "merged")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet").state_dict()
    ref = tiny_sd15_pipeline()
    ref.load_lora_weights(str(tmp_path / "l.safetensors"))
    ref.fuse_lora()
    ref.unload_lora_weights()
    theirs = ref.unet.state_dict()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-5)
    assert (tmp_path / "merged" / "model_index.json").is_file()


def test_merge_refuses_a_lora_for_another_model(tmp_path):
    pipe = tiny_sd15_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    sdxl = load_table("sdxl")
    with pytest.raises(ModelMismatchError):
        merge_into_checkpoint(tmp_path / "base", random_lora(sdxl, spo_modules(sdxl)[:2]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resize_is_exact_at_full_rank_and_truncates_by_energy():
    table = load_table("sd15")
    lora = random_lora(table, spo_modules(table)[:10], rank=8, alpha=4.0)
    same, retained = resize_lora(lora, rank=8)
    for key, m in lora.modules.items():
        torch.testing.assert_close(same.modules[key].delta(), m.delta(), atol=1e-5, rtol=1e-4)
    assert min(retained.values()) > 0.999999
    small, retained = resize_lora(lora, rank=2)
    assert set(small.ranks()) == {2} and max(retained.values()) < 1.0
    by_energy, retained = resize_lora(lora, energy=0.5)
    assert all(v >= 0.5 - 1e-9 for v in retained.values()) and max(by_energy.ranks()) < 8
