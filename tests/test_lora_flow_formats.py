"""Flux.1 / SD3.5 transformer LoRAs: tables, fused <-> split conversion, and the real loaders.

Real-size architectures are checked on the `meta` device (names, shapes, row ranges against
diffusers' single-file converters and ComfyUI's key maps); values on TINY models of the same
classes: diffusers' own `load_lora_adapter` and a real ComfyUI's LoRA loader (COMFYUI_PATH)
must patch every module with the same delta as ours.
"""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from spo_core.errors import LoRAFormatError, ModelMismatchError
from spo_core.lora import LoRA, LoRAModule, load_table, merge_into_checkpoint, read_lora, save_lora
from spo_core.lora.table_build import build_table, table_from_transformer
from spo_core.lora.tables import FLOW_ARCHS

TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
                 num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32, out_channels=16,
                pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
# norm and parameter names the module tables leave out (no LoRA targets them), diffusers -> original
FLUX_NORMS = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
              "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
              "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
FLUX_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
SD3_NORMS = {"attn.norm_q.weight": "x_block.attn.ln_q.weight", "attn.norm_k.weight": "x_block.attn.ln_k.weight",
             "attn.norm_added_q.weight": "context_block.attn.ln_q.weight",
             "attn.norm_added_k.weight": "context_block.attn.ln_k.weight",
             "attn2.norm_q.weight": "x_block.attn2.ln_q.weight", "attn2.norm_k.weight": "x_block.attn2.ln_k.weight"}


def tiny(cls_name: str, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**(TINY_FLUX if cls_name.startswith("Flux") else TINY_SD3)).eval()
    family = "flux" if cls_name.startswith("Flux") else "sd3"
    return model, table_from_transformer(f"tiny-{family}", family, model)


def original_state_dict(table, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers transformer state dict in BFL / MMDiT naming, built from the table's names and row ranges."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        info = table.get("transformer", module)
        if info is not None and info.ldm_rows is not None:
            group = table.groups[info.ldm]
            target = out.setdefault(f"{info.ldm}.{param}", value.new_zeros((group.rows, *value.shape[1:])))
            start = 0
            for a, b in info.ldm_rows:
                target[a:b] = value[start:start + b - a]
                start += b - a
        elif info is not None:
            out[f"{info.ldm}.{param}"] = value
        elif key == "pos_embed.pos_embed":
            out["pos_embed"] = value
        else:
            head, index, rest = key.split(".", 2)
            if table.family == "flux":
                name = (FLUX_NORMS if head == "transformer_blocks" else FLUX_SINGLE_NORMS)[rest]
                out[f"{'double_blocks' if head == 'transformer_blocks' else 'single_blocks'}.{index}.{name}"] = value
            else:
                out[f"joint_blocks.{index}.{SD3_NORMS[rest]}"] = value
    return out


def random_lora(table, rank: int = 4, alpha: float | None = None, seed: int = 0, dtype=torch.float32,
                first_blocks: bool = False) -> LoRA:
    """Random factors on every Linear/Conv of the transformer (`first_blocks`: only blocks 0 and the
    top-level modules, which have every kind of module, to keep real-size deltas cheap)."""
    g = torch.Generator().manual_seed(seed)
    lora = LoRA(table)
    for m in table.select(("transformer",)):
        if first_blocks and m.block not in ("top", "transformer_blocks.0", "single_transformer_blocks.0"):
            continue
        down = (torch.randn((rank, *m.shape[1:]), generator=g) * 0.1).to(dtype)
        up = (torch.randn((m.out_features, rank, *([1, 1] if m.kind == "conv" else [])), generator=g) * 0.1).to(dtype)
        lora.modules[("transformer", m.name)] = LoRAModule(m, down, up, float(alpha if alpha is not None else rank))
    return lora


def fused_kohya_file(table, path, rank: int = 4, alpha: float = 2.0, seed: int = 0, dtype=torch.float32) -> dict:
    """What kohya sd-scripts writes for Flux/SD3: original names, one down per fused weight."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    seen = set()
    for m in table.select(("transformer",)):
        name = m.ldm
        if name in seen:
            continue
        seen.add(name)
        rows = table.groups[name].rows if m.ldm_rows else m.out_features
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = (torch.randn((rank, *m.shape[1:]), generator=g) * 0.1).to(dtype)
        sd[f"{key}.lora_up.weight"] = (torch.randn((rows, rank, *([1, 1] if m.kind == "conv" else [])), generator=g) * 0.1).to(dtype)
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return sd


def assert_same_deltas(a: LoRA, b: LoRA, rel: float = 1e-6) -> None:
    assert set(a.modules) == set(b.modules), set(a.modules) ^ set(b.modules)
    for k, m in a.modules.items():
        da, db = m.delta(), b.modules[k].delta()
        tol = rel * max(float(da.abs().max()), 1e-12)
        assert float((da - db).abs().max()) <= tol, k


def assert_round_trips(lora: LoRA, folder) -> None:
    """Written in every format (files webui/comfy/diffusers.safetensors and a peft folder) and read back: the same
    architecture, every key used, the same deltas."""
    for fmt in ("webui", "comfy", "peft", "diffusers"):
        out = folder / (fmt + ("" if fmt == "peft" else ".safetensors"))
        save_lora(lora, out, fmt=fmt)
        back = read_lora(out)
        assert back.arch == lora.arch and back.is_clean(), (fmt, back.problems, back.unmatched[:3])
        assert_same_deltas(lora, back)


# -- tables --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", FLOW_ARCHS)
def test_shipped_flow_tables_equal_fresh_build_from_meta_models(arch):
    shipped, fresh = load_table(arch), build_table(arch)
    assert shipped.modules == fresh.modules and shipped.family == fresh.family
    assert all(m.ldm for m in shipped.modules.values() if m.component == "transformer")  # every one has its original name
    for group in shipped.groups.values():  # fused parts tile their weight's rows exactly
        rows = sorted(r for p in group.parts for r in p.ldm_rows)
        assert rows[0][0] == 0 and rows[-1][1] == group.rows
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


def test_known_flow_module_counts():
    dev, schnell, medium, large = (load_table(a) for a in ("flux-dev", "flux-schnell", "sd35-medium", "sd35-large"))
    def count(table, comp):
        return sum(c == comp for c, _ in table.modules)

    assert count(dev, "transformer") == 504 and count(schnell, "transformer") == 502  # schnell: no guidance embedder
    # text encoders as kohya numbers them: Flux CLIP-L (no projection) + T5-XXL, SD3 CLIP-L/G with projections + T5
    assert [count(dev, c) for c in ("te1", "te2", "te3")] == [97, 0, 168]
    assert [count(medium, c) for c in ("te1", "te2", "te3")] == [98, 258, 168]
    assert dev.get("te3", "encoder.block.23.layer.1.DenseReluDense.wi_1").shape == (10240, 4096)
    assert medium.get("te1", "text_projection").shape == (768, 768) and dev.get("te1", "text_projection") is None
    assert dev.groups["double_blocks.0.img_attn.qkv"].rows == 3 * 3072
    assert dev.groups["single_blocks.37.linear1"].rows == 3 * 3072 + 4 * 3072
    assert [p.name for p in dev.groups["single_blocks.0.linear1"].parts] == [
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"]
    assert medium.get("transformer", "transformer_blocks.12.attn2.to_q").ldm == "joint_blocks.12.x_block.attn2.qkv"
    assert medium.get("transformer", "transformer_blocks.13.attn2.to_q") is None  # dual attention in blocks 0-12 only
    assert large.get("transformer", "transformer_blocks.0.attn.to_q").shape == (2432, 2432)
    assert medium.get("transformer", "transformer_blocks.0.ff_context.net.0.proj").ldm == "joint_blocks.0.context_block.mlp.fc1"


def _meta(cls_name: str, arch: str):
    import json

    import diffusers

    from spo_core.lora.tables import CONFIG_DIR

    config = json.loads((CONFIG_DIR / arch / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        return getattr(diffusers, cls_name).from_config(config)


@pytest.mark.parametrize("arch,cls_name", [("flux-dev", "FluxTransformer2DModel"), ("flux-schnell", "FluxTransformer2DModel"),
                                           ("sd35-medium", "SD3Transformer2DModel"), ("sd35-large", "SD3Transformer2DModel")])
def test_original_names_match_diffusers_single_file_converter_real_size(arch, cls_name):
    """Real size on meta: the original-named state dict our table builds converts, with diffusers'
    own single-file converter, back to exactly the transformer's keys and shapes."""
    from diffusers.loaders import single_file_utils as sfu

    model = _meta(cls_name, arch)
    sd = model.state_dict()
    original = original_state_dict(load_table(arch), sd)
    convert = (sfu.convert_flux_transformer_checkpoint_to_diffusers if cls_name.startswith("Flux")
               else sfu.convert_sd3_transformer_checkpoint_to_diffusers)
    converted = convert(dict(original))
    assert set(converted) == set(sd)
    assert all(tuple(converted[k].shape) == tuple(sd[k].shape) for k in sd)


def test_sd3_row_ranges_match_diffusers_converter_values():
    """Values on a tiny SD3 (diffusers' SD3 converter reads the sizes from the weights): fused q/k/v,
    dual attention and the swapped adaLN halves come back in place."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model, table = tiny("SD3Transformer2DModel")
    sd = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(original_state_dict(table, sd))
    assert set(converted) == set(sd)
    for k in sd:
        assert torch.equal(converted[k].reshape(sd[k].shape), sd[k]), k


# -- conversions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["flux-dev", "sd35-medium"])
def test_fused_kohya_to_diffusers_and_back_is_bit_identical(arch, tmp_path):
    table = load_table(arch)
    source = fused_kohya_file(table, tmp_path / "k.safetensors", alpha=4.0)  # alpha = rank: nothing to bake
    lora = read_lora(tmp_path / "k.safetensors")
    assert lora.arch == arch and lora.is_clean() and lora.source_format == "kohya"
    q = lora.modules[("transformer", "transformer_blocks.0.attn.to_q")]
    assert q.rank == 4  # split: rank kept, the fused down repeated
    save_lora(lora, tmp_path / "d.safetensors", fmt="diffusers")
    diffusers_keys = load_file(str(tmp_path / "d.safetensors"))
    assert all(k.startswith("transformer.") and ".lora_" in k for k in diffusers_keys)
    back = read_lora(tmp_path / "d.safetensors")
    assert back.arch == arch and back.source_format == "diffusers"
    save_lora(back, tmp_path / "k2.safetensors", fmt="webui")
    again = load_file(str(tmp_path / "k2.safetensors"))
    assert set(again) == set(source)
    for k, v in source.items():
        assert torch.equal(again[k], v), k


@pytest.mark.parametrize("arch", ["flux-schnell", "sd35-large"])
def test_split_lora_to_fused_and_back_keeps_every_delta(arch, tmp_path):
    """Independent q/k/v downs fuse exactly as a rank-3r block-diagonal LoRA; mixed alphas are baked."""
    table = load_table(arch)
    lora = random_lora(table, rank=2, alpha=1.0, first_blocks=True)
    lora.modules[("transformer", "transformer_blocks.0.attn.to_k")].alpha = 8.0  # a different scale in one group
    assert_round_trips(lora, tmp_path)
    fused = load_file(str(tmp_path / "webui.safetensors"))
    prefix = "lora_unet_double_blocks_0_img_attn_qkv" if arch.startswith("flux") else "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert fused[f"{prefix}.lora_down.weight"].shape[0] == 6  # three rank-2 downs concatenated


def test_partial_group_is_filled_with_zero_rows(tmp_path):
    table = load_table("flux-dev")
    lora = LoRA(table)
    g = torch.Generator().manual_seed(1)
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"):
        m = table.get("transformer", name)
        lora.modules[("transformer", name)] = LoRAModule(m, torch.randn(2, m.in_features, generator=g),
                                                         torch.randn(m.out_features, 2, generator=g), 2.0)
    save_lora(lora, tmp_path / "k.safetensors")
    back = read_lora(tmp_path / "k.safetensors")
    assert back.modules[("transformer", "transformer_blocks.0.attn.to_k")].delta().abs().max() == 0
    for key, m in lora.modules.items():
        torch.testing.assert_close(back.modules[key].delta(), m.delta(), rtol=0, atol=0)


def test_fused_lora_with_wrong_row_count_is_refused_in_one_line(tmp_path):
    table = load_table("flux-dev")
    sd = fused_kohya_file(table, tmp_path / "k.safetensors")
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.randn(2 * 3072, 4)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    lora = read_lora(tmp_path / "bad.safetensors")
    assert len(lora.problems) == 1 and "cannot be split" in lora.problems[0] and "\n" not in lora.problems[0]
    with pytest.raises(LoRAFormatError, match="double_blocks.0.img_attn.qkv has 6144 output rows"):
        lora.require_clean()


def test_architecture_mismatch_names_both(tmp_path):
    from lora_helpers import random_lora as sd_random_lora
    from lora_helpers import spo_modules

    sd15 = load_table("sd15")
    save_lora(sd_random_lora(sd15, spo_modules(sd15), rank=2), tmp_path / "sd15.safetensors")
    with pytest.raises(ModelMismatchError, match="sd15.*flux-dev"):
        read_lora(tmp_path / "sd15.safetensors", arch="flux-dev")
    fused_kohya_file(load_table("flux-dev"), tmp_path / "flux.safetensors")
    with pytest.raises(ModelMismatchError, match="flux-dev.*sd15"):
        read_lora(tmp_path / "flux.safetensors", arch="sd15")


def test_cli_inspect_and_convert(tmp_path, capsys):
    from spo_core.cli import main

    fused_kohya_file(load_table("flux-dev"), tmp_path / "k.safetensors")
    assert main(["lora", "inspect", str(tmp_path / "k.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "flux-dev" in out and "kohya" in out
    assert main(["lora", "convert", str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert main(["lora", "inspect", str(tmp_path / "d.safetensors"), "--json"]) == 0
    assert '"arch": "flux-dev"' in capsys.readouterr().out


# -- diffusers' own loader on tiny models ---------------------------------------------------------


def _peft_deltas(model) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {name: mod.get_delta_weight(mod.active_adapters[0]) for name, mod in model.named_modules()
            if isinstance(mod, LoraLayer) and mod.active_adapters}


@pytest.mark.parametrize("cls_name,pipeline", [("FluxTransformer2DModel", "FluxPipeline"),
                                               ("SD3Transformer2DModel", "StableDiffusion3Pipeline")])
def test_diffusers_loads_every_module_with_our_delta(cls_name, pipeline, tmp_path):
    import diffusers

    model, table = tiny(cls_name)
    lora = random_lora(table, rank=2, alpha=1.0)
    # a kohya-style fused source, then our diffusers output: what diffusers is given
    save_lora(lora, tmp_path / "k.safetensors", fmt="webui")
    ours = read_lora(tmp_path / "k.safetensors")
    save_lora(ours, tmp_path / "d.safetensors", fmt="diffusers")
    state = getattr(diffusers, pipeline).lora_state_dict(str(tmp_path / "d.safetensors"))
    state = state[0] if isinstance(state, tuple) else state
    model.load_lora_adapter(state, prefix="transformer", adapter_name="ours")
    deltas = _peft_deltas(model)
    assert set(deltas) == {name for _, name in ours.modules}
    for (_, name), m in ours.modules.items():
        torch.testing.assert_close(deltas[name].float(), m.delta(), rtol=1e-5, atol=1e-7)


def test_diffusers_converts_our_real_size_flux_kohya_file_to_the_same_deltas(tmp_path):
    """diffusers' kohya Flux converter hard-codes Flux.1's sizes (3072, linear1 = 3 x 3072 + 12288), so
    it runs on a real-size file (blocks 0 and the top-level modules) and its factors are compared."""
    from diffusers import FluxPipeline

    # alpha = rank: diffusers 0.42 drops the alphas of final_layer.* ("TODO: alphas"), the swap it does right
    lora = random_lora(load_table("flux-dev"), rank=2, alpha=2.0, first_blocks=True)
    save_lora(lora, tmp_path / "k.safetensors", fmt="webui")
    state = FluxPipeline.lora_state_dict(str(tmp_path / "k.safetensors"))
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    assert {k.rsplit(".lora_", 1)[0] for k in state} == {name for _, name in lora.modules}
    for (_, name), m in lora.modules.items():
        a, b = state[f"{name}.lora_A.weight"].float(), state[f"{name}.lora_B.weight"].float()
        torch.testing.assert_close(b @ a, m.delta(), rtol=1e-5, atol=1e-6)


# -- merge / resize / extract ---------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["FluxTransformer2DModel", "SD3Transformer2DModel"])
def test_merge_into_folder_and_bfl_single_file_then_extract(cls_name, tmp_path):
    from spo_core.lora import CheckpointReader, extract_lora, resize_lora

    model, table = tiny(cls_name)
    folder = tmp_path / "model"
    model.save_pretrained(folder / "transformer")
    sd = model.state_dict()
    single = tmp_path / "original.safetensors"
    save_file({k: v.contiguous() for k, v in original_state_dict(table, sd).items()}, str(single))
    lora = random_lora(table, rank=2, alpha=1.0)
    save_lora(lora, tmp_path / "l.safetensors")  # fused kohya layout, carries the tiny table
    lora = read_lora(tmp_path / "l.safetensors")
    merged_folder = merge_into_checkpoint(folder, lora, tmp_path / "merged", strength=0.5)
    merged_single = merge_into_checkpoint(single, lora, tmp_path / "merged_single.safetensors", strength=0.5)
    with CheckpointReader(merged_folder, arch=table) as a, CheckpointReader(merged_single, arch=table) as b:
        for (_, name), m in lora.modules.items():
            expected = sd[name + ".weight"].float() + 0.5 * m.delta()
            torch.testing.assert_close(a.weight("transformer", name), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.weight("transformer", name), expected, rtol=1e-5, atol=1e-6)
    with CheckpointReader(folder, arch=table) as base, CheckpointReader(merged_single, arch=table) as tuned:
        extracted, report = extract_lora(base, tuned, rank=8, groups=("attn", "ff", "proj", "mod", "embed"), method="full")
    assert len(extracted.modules) == len([m for m in table.select(("transformer",)) if m.kind == "linear"])
    for key, m in extracted.modules.items():
        torch.testing.assert_close(m.delta(), 0.5 * lora.modules[key].delta(), rtol=1e-3, atol=1e-5)
    small, retained = resize_lora(lora, rank=1)
    assert set(small.ranks()) == {1} and min(retained.values()) > 0


# -- a real ComfyUI ------------------------------------------------------------------------------

COMFY = os.environ.get("COMFYUI_PATH")
LORA_WARNINGS = ("lora key not loaded", "NOT LOADED", "ERROR lora", "SHAPE MISMATCH")


@pytest.fixture(scope="module")
def comfy():
    if not COMFY:
        pytest.skip("COMFYUI_PATH not set")
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher

    return comfy


def _comfy_model(comfy, cls_name, original):
    """A tiny ComfyUI Flux / SD3 model holding `original` (our BFL / MMDiT state dict) as its weights."""
    if cls_name.startswith("Flux"):
        h = TINY_FLUX["attention_head_dim"] * TINY_FLUX["num_attention_heads"]
        config = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
                  "vec_in_dim": TINY_FLUX["pooled_projection_dim"], "context_in_dim": TINY_FLUX["joint_attention_dim"],
                  "hidden_size": h, "mlp_ratio": 4.0, "num_heads": TINY_FLUX["num_attention_heads"],
                  "depth": TINY_FLUX["num_layers"], "depth_single_blocks": TINY_FLUX["num_single_layers"],
                  "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True}
    else:
        config = comfy.model_detection.detect_unet_config(original, "")
    model_config = comfy.model_detection.model_config_from_unet_config(config)
    model_config.set_inference_dtype(torch.float32, torch.float32)
    model = model_config.get_model({}, device="cpu")
    missing, unexpected = model.diffusion_model.load_state_dict(original, strict=False)
    assert not unexpected and not [k for k in missing if k in original], (missing, unexpected)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.mark.comfyui
@pytest.mark.parametrize("cls_name", ["FluxTransformer2DModel", "SD3Transformer2DModel"])
def test_comfyui_patches_every_module_with_our_delta(comfy, cls_name, tmp_path, caplog):
    model, table = tiny(cls_name)
    original = {k: v.contiguous() for k, v in original_state_dict(table, model.state_dict()).items()}
    patcher = _comfy_model(comfy, cls_name, original)
    single = tmp_path / "original.safetensors"
    save_file(original, str(single))
    lora = random_lora(table, rank=2, alpha=1.0)
    lora.modules[("transformer", "transformer_blocks.0.attn.to_v")].alpha = 4.0
    merged = load_file(str(merge_into_checkpoint(single, lora, tmp_path / "merged.safetensors")))
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    for fmt in ("webui", "comfy", "diffusers"):
        path = save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt=fmt)
        lora_sd = load_file(str(path))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            patches = comfy.lora.load_lora(lora_sd, key_map)
        assert not [r for r in caplog.records if any(w in r.getMessage() for w in LORA_WARNINGS)], fmt
        p = patcher.clone()
        p.add_patches(patches, 1.0)
        p.patch_model()
        state = p.model.diffusion_model.state_dict()
        changed = {k for k in original if not torch.equal(state[k], original[k])}
        assert changed == {k for k in merged if not torch.equal(merged[k], original[k])}, fmt
        for k in changed:
            torch.testing.assert_close(state[k], merged[k], rtol=1e-5, atol=1e-6)
        p.unpatch_model()


def _linear1_qkv_file(table, path, rank: int = 2, seed: int = 3) -> dict:
    """ComfyUI's key for a LoRA of the q/k/v rows of Flux's linear1 alone (XLabs / USO LoRAs), beside img_attn."""
    g = torch.Generator().manual_seed(seed)
    group = table.groups["single_blocks.0.linear1"]
    h = group.parts[0].out_features
    sd = {"diffusion_model.single_blocks.0.linear1_qkv.lora_down.weight": torch.randn(rank, group.in_features, generator=g) * 0.1,
          "diffusion_model.single_blocks.0.linear1_qkv.lora_up.weight": torch.randn(3 * h, rank, generator=g) * 0.1,
          "diffusion_model.single_blocks.0.linear1_qkv.alpha": torch.tensor(1.0)}
    qkv = table.groups["double_blocks.0.img_attn.qkv"]
    sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"] = torch.randn(rank, qkv.in_features, generator=g) * 0.1
    sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"] = torch.randn(qkv.rows, rank, generator=g) * 0.1
    save_file(sd, str(path))
    return sd


def test_comfyuis_linear1_qkv_keys_read_as_flux_q_k_v_and_convert(tmp_path):
    """`single_blocks.N.linear1_qkv` (the leading 3 x hidden rows of linear1) reads as to_q/to_k/to_v of the single
    block, exactly, and writes back as a full linear1 whose MLP rows are zero."""
    model, table = tiny("FluxTransformer2DModel")
    sd = _linear1_qkv_file(table, tmp_path / "qkv.safetensors")
    lora = read_lora(tmp_path / "qkv.safetensors", arch=table)
    assert lora.is_clean() and not lora.unmatched, (lora.problems, lora.unmatched)
    single = {n for (_, n) in lora.modules if n.startswith("single_transformer_blocks.0.")}
    assert single == {f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"}
    up, down = sd["diffusion_model.single_blocks.0.linear1_qkv.lora_up.weight"], sd["diffusion_model.single_blocks.0.linear1_qkv.lora_down.weight"]
    h = up.shape[0] // 3
    for i, x in enumerate("qkv"):
        want = (up[i * h:(i + 1) * h] @ down) * (1.0 / 2)
        torch.testing.assert_close(lora.modules[("transformer", f"single_transformer_blocks.0.attn.to_{x}")].delta(), want)
    save_lora(lora, tmp_path / "k.safetensors", fmt="webui")
    back = load_file(str(tmp_path / "k.safetensors"))
    full = back["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert full.shape[0] == table.groups["single_blocks.0.linear1"].rows and full[3 * h:].abs().max() == 0
    again = read_lora(tmp_path / "k.safetensors", arch=table)
    assert again.modules.pop(("transformer", "single_transformer_blocks.0.proj_mlp")).delta().abs().max() == 0
    assert_same_deltas(again, lora)


@pytest.mark.comfyui
def test_comfyui_patches_linear1_qkv_files_as_our_converted_file(comfy, tmp_path, caplog):
    """ComfyUI's own loader on the `linear1_qkv` file and on our kohya conversion of it: the same weights."""
    model, table = tiny("FluxTransformer2DModel")
    original = {k: v.contiguous() for k, v in original_state_dict(table, model.state_dict()).items()}
    patcher = _comfy_model(comfy, "FluxTransformer2DModel", original)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    source = _linear1_qkv_file(table, tmp_path / "qkv.safetensors")
    save_lora(read_lora(tmp_path / "qkv.safetensors", arch=table), tmp_path / "k.safetensors", fmt="webui")
    states = []
    for sd in (source, load_file(str(tmp_path / "k.safetensors"))):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            patches = comfy.lora.load_lora(sd, key_map)
        assert not [r for r in caplog.records if any(w in r.getMessage() for w in LORA_WARNINGS)]
        p = patcher.clone()
        p.add_patches(patches, 1.0)
        p.patch_model()
        states.append({k: v.clone() for k, v in p.model.diffusion_model.state_dict().items()})
        p.unpatch_model()
    assert not torch.equal(states[0]["single_blocks.0.linear1.weight"], original["single_blocks.0.linear1.weight"])
    for k in original:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-5, atol=1e-6)


def test_reading_a_flow_file_by_its_familys_tables_first_gives_what_every_table_gives(tmp_path, monkeypatch):
    """The family hint (double/single/joint blocks) only saves work: arch, modules, leftovers and notes are the
    same as when every table is compared, for clean files, files with foreign keys and SD files."""
    import spo_core.lora.read as read_module
    from lora_helpers import random_lora as sd_random_lora
    from lora_helpers import spo_modules

    files = {}
    fused_kohya_file(load_table("flux-dev"), tmp_path / "flux.safetensors")
    files["flux"] = tmp_path / "flux.safetensors"
    fused_kohya_file(load_table("sd35-medium"), tmp_path / "sd3.safetensors")
    files["sd3"] = tmp_path / "sd3.safetensors"
    save_lora(random_lora(load_table("flux-schnell"), rank=2, first_blocks=True), tmp_path / "split.safetensors", fmt="diffusers")
    files["split"] = tmp_path / "split.safetensors"
    junk = dict(load_file(str(files["flux"])))
    junk["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 320)
    junk["something_else.weight"] = torch.zeros(1)
    save_file(junk, str(tmp_path / "junk.safetensors"))
    files["junk"] = tmp_path / "junk.safetensors"
    sd15 = load_table("sd15")
    save_lora(sd_random_lora(sd15, spo_modules(sd15), rank=2), tmp_path / "sd15.safetensors")
    files["sd15"] = tmp_path / "sd15.safetensors"

    def summary(lora):
        return lora.arch, sorted(lora.modules), lora.unmatched, lora.problems, lora.notes, lora.source_format

    hinted = {name: summary(read_lora(path)) for name, path in files.items()}
    monkeypatch.setattr(read_module, "_flow_family_hint", lambda keys: None)
    assert {name: summary(read_lora(path)) for name, path in files.items()} == hinted
    assert hinted["junk"][2] and hinted["split"][0] == "flux-schnell"  # dev and schnell fit alike: its metadata decides
