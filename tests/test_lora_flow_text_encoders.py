"""SD3 / Flux LoRAs that also train their text encoders: CLIP-L (te1), CLIP-G (te2, SD3) and T5-XXL (te3).

kohya sd-scripts writes them as `lora_te1_` / `lora_te2_` / `lora_te3_`, OneTrainer's Flux files number
T5 `lora_te2_`, diffusers keys them by pipeline attribute (`text_encoder_3.` in SD3, `text_encoder_2.`
in Flux) and ComfyUI by its CLIP object (`text_encoders.t5xxl.transformer.`). Checked against diffusers'
own converter and loader, and (with COMFYUI_PATH) ComfyUI's text-encoder key map on its real SD3 / Flux
CLIP models built on `meta`.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from spo_core.lora import LoRA, LoRAModule, load_table, read_lora, save_lora
from spo_core.lora.table_build import table_from_transformer
from spo_core.lora.tables import live_te_name
from test_lora_flow_formats import LORA_WARNINGS, assert_round_trips, assert_same_deltas, comfy, random_lora, tiny  # noqa: F401 (fixture)

TE_COMPONENTS = {"flux": ("te1", "te3"), "sd3": ("te1", "te2", "te3")}


def add_text_encoders(lora: LoRA, rank: int = 2, seed: int = 1, layers: tuple[int, ...] | None = (0, 1)) -> LoRA:
    """Random factors on the text encoders' Linears (of `layers` only, to keep real-size files small)."""
    g = torch.Generator().manual_seed(seed)
    table = lora.table
    for m in table.select(TE_COMPONENTS[table.family]):
        index = next((int(p) for p in m.name.split(".") if p.isdigit()), None)
        if layers is not None and index is not None and index not in layers:
            continue
        down = torch.randn((rank, m.in_features), generator=g) * 0.1
        up = torch.randn((m.out_features, rank), generator=g) * 0.1
        lora.modules[(m.component, m.name)] = LoRAModule(m, down, up, 1.0)
    return lora


@pytest.mark.parametrize("arch", ["flux-dev", "sd35-medium"])
def test_text_encoder_modules_go_through_every_format(arch, tmp_path):
    table = load_table(arch)
    lora = add_text_encoders(random_lora(table, rank=2, alpha=1.0, first_blocks=True), layers=(0,))
    assert set(lora.components()) == {"transformer", *TE_COMPONENTS[table.family]}
    assert_round_trips(lora, tmp_path)
    kohya = load_file(str(tmp_path / "webui.safetensors"))
    comfy_keys = load_file(str(tmp_path / "comfy.safetensors"))
    diffusers_keys = load_file(str(tmp_path / "diffusers.safetensors"))
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in kohya
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.lora_up.weight" in comfy_keys
    t5 = "text_encoder_2" if table.family == "flux" else "text_encoder_3"
    assert f"{t5}.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in diffusers_keys
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight" in diffusers_keys
    folders = sorted(p.parent.name for p in (tmp_path / "peft").rglob("adapter_config.json"))
    assert folders == (["peft", "text_encoder", "text_encoder_2"] if table.family == "flux"
                       else ["peft", "text_encoder", "text_encoder_2", "text_encoder_3"])
    if table.family == "sd3":
        assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.alpha" in kohya


def test_onetrainer_flux_t5_keys_read_as_t5(tmp_path):
    """OneTrainer numbers Flux's T5 second (`lora_te2_`), as ComfyUI reads it; kohya writes it back as `lora_te3_`."""
    table = load_table("flux-dev")
    lora = add_text_encoders(LoRA(table), layers=(0,))
    save_lora(lora, tmp_path / "k.safetensors")
    sd = {k.replace("lora_te3_", "lora_te2_"): v for k, v in load_file(str(tmp_path / "k.safetensors")).items()}
    save_file(sd, str(tmp_path / "onetrainer.safetensors"))
    back = read_lora(tmp_path / "onetrainer.safetensors")
    assert back.arch == "flux-dev" and back.is_clean() and "te3" in back.components()
    assert_same_deltas(lora, back)


def test_text_encoder_only_sd_loras_keep_their_architecture(tmp_path):
    """SD3 reuses SDXL's CLIP-L/G names and Flux SD1.5's CLIP-L: a text-encoder-only SD LoRA still reads as SD."""
    for arch in ("sd15", "sdxl"):
        table = load_table(arch)
        lora = LoRA(table)
        g = torch.Generator().manual_seed(0)
        for m in table.select(("te1", "te2")):
            if ".layers.0." in m.name:
                lora.modules[(m.component, m.name)] = LoRAModule(m, torch.randn(2, m.in_features, generator=g),
                                                                 torch.randn(m.out_features, 2, generator=g), 2.0)
        for fmt in ("webui", "diffusers"):
            save_lora(lora, tmp_path / f"{arch}-{fmt}.safetensors", fmt=fmt)
            assert read_lora(tmp_path / f"{arch}-{fmt}.safetensors").arch == arch, (arch, fmt)


def _tiny_with_text_encoders(family: str):
    """A tiny transformer with tiny CLIP(s) and T5 encoder: a table whose text encoders diffusers can load into."""
    import transformers

    from spo_core.testing import tiny_text_config

    model, _ = tiny("FluxTransformer2DModel" if family == "flux" else "SD3Transformer2DModel")
    torch.manual_seed(0)
    clip = (transformers.CLIPTextModel if family == "flux" else transformers.CLIPTextModelWithProjection)(tiny_text_config())
    t5 = transformers.T5EncoderModel(transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                                           vocab_size=64, feed_forward_proj="gated-gelu"))
    tes = {"te1": clip.eval(), "te3": t5.eval()}
    return model, tes, table_from_transformer(f"tiny-{family}", family, model, tes)


@pytest.mark.parametrize("family,pipeline", [("flux", "FluxPipeline"), ("sd3", "StableDiffusion3Pipeline")])
def test_diffusers_loads_our_text_encoder_modules_with_our_deltas(family, pipeline, tmp_path):
    import diffusers

    from test_lora_flow_formats import _peft_deltas

    _, tes, table = _tiny_with_text_encoders(family)
    lora = add_text_encoders(random_lora(table, rank=2, alpha=1.0), layers=None)
    save_lora(lora, tmp_path / "d.safetensors", fmt="diffusers")
    cls = getattr(diffusers, pipeline)
    state = cls.lora_state_dict(str(tmp_path / "d.safetensors"))
    state = state[0] if isinstance(state, tuple) else state
    te1 = {k: v for k, v in state.items() if k.startswith("text_encoder.")}
    cls.load_lora_into_text_encoder(te1, network_alphas=None, text_encoder=tes["te1"], prefix="text_encoder",
                                    adapter_name="ours")
    deltas = _peft_deltas(tes["te1"])
    ours = {live_te_name(n, tes["te1"]): m for (c, n), m in lora.modules.items() if c == "te1"}
    assert set(deltas) == set(ours) and len(ours) == len(table.select(("te1",)))
    for name, m in ours.items():
        torch.testing.assert_close(deltas[name].float(), m.delta(), rtol=1e-5, atol=1e-7)


def test_diffusers_converts_our_kohya_flux_clip_modules(tmp_path):
    """diffusers' kohya Flux converter turns our `lora_te1_` keys into text_encoder LoRA factors (its old
    `to_q_lora` names, which the pack reads too) with our deltas, and, as it says, leaves T5 out."""
    from diffusers import FluxPipeline

    lora = add_text_encoders(random_lora(load_table("flux-dev"), rank=2, alpha=2.0, first_blocks=True))
    save_lora(lora, tmp_path / "k.safetensors", fmt="webui")
    state = FluxPipeline.lora_state_dict(str(tmp_path / "k.safetensors"))
    te = {k: v for k, v in state.items() if k.startswith("text_encoder")}
    assert any("to_q_lora" in k for k in te) and not any("encoder.block." in k for k in te)
    theirs = read_lora(te, arch="flux-dev")
    assert theirs.is_clean() and theirs.components() == ["te1"]
    te1 = LoRA(lora.table, modules={k: m for k, m in lora.modules.items() if k[0] == "te1"})
    assert_same_deltas(te1, theirs, rel=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_merge_text_encoder_modules_into_folder_and_single_file(family, tmp_path):
    """A diffusers folder (Flux's T5 in text_encoder_2, SD3's in text_encoder_3) and an SD3-style single file
    carrying its text encoders under ComfyUI's names take the text-encoder modules too."""
    from spo_core.lora import CheckpointReader, merge_into_checkpoint
    from test_lora_flow_formats import original_state_dict

    model, tes, table = _tiny_with_text_encoders(family)
    folder = tmp_path / "model"
    model.save_pretrained(folder / "transformer")
    tes["te1"].save_pretrained(folder / "text_encoder")
    tes["te3"].save_pretrained(folder / ("text_encoder_2" if family == "flux" else "text_encoder_3"))
    single = {f"model.diffusion_model.{k}": v.contiguous() for k, v in original_state_dict(table, model.state_dict()).items()}
    for comp, owner in (("te1", "clip_l"), ("te3", "t5xxl")):
        single.update({f"text_encoders.{owner}.transformer.{k}": v.clone().contiguous() for k, v in tes[comp].state_dict().items()})
    save_file(single, str(tmp_path / "single.safetensors"))
    lora = add_text_encoders(random_lora(table, rank=2, alpha=1.0), layers=None)
    save_lora(lora, tmp_path / "l.safetensors")
    lora = read_lora(tmp_path / "l.safetensors")
    assert lora.components() == ["transformer", "te1", "te3"]
    for source in (folder, tmp_path / "single.safetensors"):
        merged = merge_into_checkpoint(source, lora, tmp_path / f"merged-{source.stem}", strength=0.5)
        with CheckpointReader(source, arch=table) as base, CheckpointReader(merged, arch=table) as after:
            for (comp, name), m in lora.modules.items():
                expected = base.weight(comp, name) + 0.5 * m.delta()
                torch.testing.assert_close(after.weight(comp, name), expected, rtol=1e-5, atol=1e-6)


def test_merge_into_a_transformer_only_file_names_the_text_encoders_and_the_way_out(tmp_path, capsys):
    from spo_core.cli import main
    from spo_core.errors import ModelMismatchError
    from spo_core.lora import merge_into_checkpoint
    from test_lora_flow_formats import original_state_dict

    model, tes, table = _tiny_with_text_encoders("flux")
    save_file({k: v.contiguous() for k, v in original_state_dict(table, model.state_dict()).items()},
              str(tmp_path / "flux.safetensors"))
    save_lora(add_text_encoders(random_lora(table, rank=2), layers=None), tmp_path / "l.safetensors")
    lora = read_lora(tmp_path / "l.safetensors")
    with pytest.raises(ModelMismatchError, match=r"te1 \(CLIP-L\).*te3 \(T5-XXL\).*--only transformer"):
        merge_into_checkpoint(tmp_path / "flux.safetensors", lora, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    args = ["lora", "merge", "--checkpoint", str(tmp_path / "flux.safetensors"), "--lora", str(tmp_path / "l.safetensors")]
    assert main([*args, "--only", "transformer", str(tmp_path / "out.safetensors")]) == 0
    assert f"merged {len(lora.only(['transformer']).modules)} modules" in capsys.readouterr().out
    assert main([*args, "--only", "te2", str(tmp_path / "out2.safetensors")]) != 0
    assert "no te2 modules" in capsys.readouterr().err


def test_spo_sample_merges_text_encoder_modules_into_the_pipeline():
    """`spo sample --lora` on a flow pipeline merges te1/te2/te3 into the pipeline's own text encoders."""
    from spo_core.cli.sample_cmd import flow_lora_targets

    class Pipe:
        text_encoder, text_encoder_2, text_encoder_3 = "clip-l", "clip-g", "t5"

    class Backend:
        transformer = "dit"
        pipe = Pipe()

    assert flow_lora_targets(Backend(), "sd3") == {"transformer": "dit", "te1": "clip-l", "te2": "clip-g", "te3": "t5"}
    assert flow_lora_targets(Backend(), "flux") == {"transformer": "dit", "te1": "clip-l", "te3": "clip-g"}
    Backend.pipe = None
    assert flow_lora_targets(Backend(), "flux") == {"transformer": "dit"}


def test_spo_sample_refuses_a_text_encoder_lora_the_pipeline_cannot_take(tmp_path, monkeypatch):
    """An SD3.5 pipeline loaded without its T5 and a LoRA that changes T5: refused by name, nothing merged."""
    import spo_core.lora
    from spo_core.cli.sample_cmd import _merge_lora
    from spo_core.errors import ConfigError

    table = load_table("sd35-medium")
    lora = add_text_encoders(LoRA(table), layers=(0,))

    class Pipe:
        text_encoder, text_encoder_2, text_encoder_3 = "clip-l", "clip-g", None

    class Backend:
        is_flow, transformer, pipe = True, "dit", Pipe()

        def module_table(self):
            return table

    monkeypatch.setattr(spo_core.lora, "read_lora", lambda path, arch=None: lora)
    monkeypatch.setattr(spo_core.lora, "merge_into_modules", lambda *a: pytest.fail("merged"))
    with pytest.raises(ConfigError, match="no te3 to apply"):
        _merge_lora(Backend(), str(tmp_path / "with_t5.safetensors"))


# -- a real ComfyUI ------------------------------------------------------------------------------


@pytest.mark.comfyui
@pytest.mark.parametrize("arch", ["flux-dev", "sd35-large"])
def test_comfyui_clip_key_map_takes_every_text_encoder_module(comfy, arch, tmp_path, caplog):  # noqa: F811
    """ComfyUI's own CLIP key map (its SD3 / Flux CLIP built on meta) takes every te module of our files, each
    on the weight of the same module with the same shape."""
    from comfy.text_encoders import flux, sd3_clip

    table = load_table(arch)
    clip = (flux.FluxClipModel if arch.startswith("flux") else sd3_clip.SD3ClipModel)(device="meta", dtype=torch.float16)
    shapes = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    key_map = comfy.lora.model_lora_keys_clip(clip, {})
    lora = add_text_encoders(LoRA(table), layers=(0, 11, 23))
    owner = {"te1": "clip_l", "te2": "clip_g", "te3": "t5xxl"}
    expected = {f"{owner[c]}.transformer.{n}.weight": table.get(c, n).shape for (c, n) in lora.modules}
    for fmt in ("webui", "comfy"):
        sd = load_file(str(save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt=fmt)))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            patches = comfy.lora.load_lora(sd, key_map)
        assert not [r for r in caplog.records if any(w in r.getMessage() for w in LORA_WARNINGS)], fmt
        assert {k if isinstance(k, str) else k[0] for k in patches} == set(expected), fmt
        for key, shape in expected.items():
            assert shapes[key] == shape, key
