"""`spo sample` on SD3 / Flux single files (the transformer file, its VAE, its text encoders, as ComfyUI users keep
them): assembled through diffusers' `from_single_file` and transformers, they sample the same image as the
diffusers folder they came from. Tiny models; SD3's transformer file in the original MMDiT layout (diffusers
converts it back), Flux's in diffusers' layout (diffusers' BFL converter hard-codes Flux.1's width)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spo_core.cli import main
from spo_core.lora.table_build import table_from_transformer
from spo_core.testing import tiny_flux_pipeline, tiny_sd3_pipeline
from test_lora_flow_formats import original_state_dict

SAMPLE = ["--prompt", "a red apple", "--steps", "3", "--k", "2", "--scorer", "jpeg_compressibility", "--window", "0:1000",
          "--height", "32", "--width", "32", "--no-progress"]


def _save(sd: dict, path: Path) -> str:
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory):
    """A tiny SD3 folder, and the same model as ComfyUI-style files: MMDiT transformer, VAE, CLIP-L, CLIP-G."""
    root = tmp_path_factory.mktemp("sd3files")
    pipe = tiny_sd3_pipeline()
    pipe.save_pretrained(root / "folder")
    table = table_from_transformer("tiny-sd3", "sd3", pipe.transformer)
    original = {f"model.diffusion_model.{k}": v for k, v in original_state_dict(table, pipe.transformer.state_dict()).items()}
    files = {"model": _save(original, root / "sd3_tiny.safetensors"),
             "vae": _save(pipe.vae.state_dict(), root / "vae.safetensors"),
             "clip_l": _save(pipe.text_encoder.state_dict(), root / "clip_l.safetensors"),
             "clip_g": _save(pipe.text_encoder_2.state_dict(), root / "clip_g.safetensors")}
    inside = dict(original)  # an SD3 file that carries its VAE and text encoders, as sd3_medium_incl_clips does
    inside.update({f"first_stage_model.{k}": v for k, v in pipe.vae.state_dict().items()})
    inside.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    inside.update({f"text_encoders.clip_g.transformer.{k}": v for k, v in pipe.text_encoder_2.state_dict().items()})
    files["with_clips"] = _save(inside, root / "sd3_incl_clips.safetensors")
    return root, files


def _sample(tmp_path: Path, name: str, model: str, *extra: str) -> bytes:
    out = tmp_path / f"{name}.png"
    assert main(["sample", "--model", model, *SAMPLE, "--out", str(out), *extra]) == 0
    return out.read_bytes()


def test_sd3_single_files_sample_the_folders_image(sd3_files, tmp_path):
    root, f = sd3_files
    config = str(root / "folder")
    want = _sample(tmp_path, "folder", config)
    assert _sample(tmp_path, "files", f["model"], "--config", config, "--vae", f["vae"],
                   "--text-encoders", f"{f['clip_l']},{f['clip_g']}") == want
    assert _sample(tmp_path, "inside", f["with_clips"], "--config", config) == want  # nothing else needed
    from safetensors.torch import load_file  # the files' weights are the ones used: another CLIP-G, another image

    other = _save({k: v * 1.5 for k, v in load_file(f["clip_g"]).items()}, tmp_path / "clip_g_other.safetensors")
    assert _sample(tmp_path, "other", f["model"], "--config", config, "--vae", f["vae"],
                   "--text-encoders", f"{f['clip_l']},{other}") != want


def test_sd3_single_file_errors_name_what_is_missing(sd3_files, tmp_path, capsys):
    root, f = sd3_files
    config = str(root / "folder")
    out = str(tmp_path / "x.png")
    assert main(["sample", "--model", f["model"], *SAMPLE, "--out", out, "--config", config, "--vae", f["vae"],
                 "--text-encoders", f["clip_l"]]) != 0
    assert "CLIP-G (clip_g.safetensors)" in capsys.readouterr().err
    assert main(["sample", "--model", f["model"], *SAMPLE, "--out", out, "--config", config,
                 "--text-encoders", f"{f['clip_l']},{f['clip_g']}"]) != 0
    assert "holds no VAE: give it with --vae" in capsys.readouterr().err
    assert main(["sample", "--model", f["model"], *SAMPLE, "--out", out, "--config", config, "--vae", f["vae"],
                 "--text-encoders", f"{f['clip_l']},{f['vae']}"]) != 0
    assert "vae.safetensors is not a CLIP or T5 text encoder" in capsys.readouterr().err
    assert main(["sample", "--model", f["model"], *SAMPLE, "--out", out]) != 0  # a tiny model: its configs are needed
    assert "--config DIR" in capsys.readouterr().err
    assert main(["sample", "--model", "world", *SAMPLE, "--out", out, "--vae", f["vae"]]) != 0
    assert "are for SD3/SD3.5/Flux single files" in capsys.readouterr().err
    assert not Path(out).exists()


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxfiles")
    pipe = tiny_flux_pipeline()
    pipe.save_pretrained(root / "folder")
    t5 = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied copy left out
    return root, {"model": _save(pipe.transformer.state_dict(), root / "flux_tiny.safetensors"),
                  "ae": _save(pipe.vae.state_dict(), root / "ae.safetensors"),
                  "clip_l": _save(pipe.text_encoder.state_dict(), root / "clip_l.safetensors"),
                  "t5": _save(t5, root / "t5xxl_fp16.safetensors")}


def test_flux_single_files_sample_the_folders_image(flux_files, tmp_path, capsys):
    root, f = flux_files
    config = str(root / "folder")
    want = _sample(tmp_path, "folder", config)
    tokenizer = str(root / "folder" / "tokenizer_2")
    assert _sample(tmp_path, "files", f["model"], "--config", config, "--vae", f["ae"], "--t5-tokenizer", tokenizer,
                   "--text-encoders", f["t5"], "--text-encoders", f["clip_l"]) == want
    out = str(tmp_path / "x.png")
    assert main(["sample", "--model", f["model"], *SAMPLE, "--out", out, "--config", config, "--vae", f["ae"],
                 "--text-encoders", f["clip_l"]]) != 0
    assert "T5-XXL (t5xxl_fp16.safetensors)" in capsys.readouterr().err
    assert main(["sample", "--model", f["model"], *SAMPLE, "--out", out, "--config", config, "--vae", f["ae"],
                 "--text-encoders", f"{f['clip_l']},{f['t5']}"]) != 0  # offline, no local tokenizer named
    assert "--t5-tokenizer DIR" in capsys.readouterr().err
    assert not Path(out).exists()


def test_flow_file_family_reads_only_the_header(tmp_path):
    from spo_core.backends.flow_files import flow_file_family

    one = torch.zeros(1)
    cases = {"bfl": {"double_blocks.0.img_attn.qkv.weight": one}, "mmdit": {"model.diffusion_model.joint_blocks.0.x": one},
             "sd15": {"model.diffusion_model.input_blocks.0.0.weight": one}, "unet": {"down_blocks.0.resnets.0.conv1.weight": one}}
    got = {name: flow_file_family(_save(sd, tmp_path / f"{name}.safetensors")) for name, sd in cases.items()}
    assert got == {"bfl": "flux", "mmdit": "sd3", "sd15": None, "unet": None}


@pytest.mark.parametrize("arch", ["sd35-medium", "sd35-large", "flux-dev", "flux-schnell"])
def test_shipped_configs_assemble_a_consistent_real_size_pipeline(arch):
    """What single files are converted against: the transformer's text and latent widths match the shipped text
    encoders' and VAE's (built on `meta`), and the scheduler is the model's."""
    import json

    import diffusers

    from spo_core.lora.table_build import _meta_text_encoders
    from spo_core.lora.tables import CONFIG_DIR

    folder = CONFIG_DIR / arch
    family = "flux" if arch.startswith("flux") else "sd3"
    t = json.loads((folder / "transformer" / "config.json").read_text())
    vae = diffusers.AutoencoderKL.load_config(str(folder / "vae"))
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    tes = _meta_text_encoders(folder, family)
    assert tes["te3"].config.d_model == t["joint_attention_dim"] == 4096
    assert vae["latent_channels"] == 16 and t["in_channels"] == (64 if family == "flux" else 16)
    if family == "sd3":
        assert tes["te1"].config.projection_dim + tes["te2"].config.projection_dim == t["pooled_projection_dim"]
        assert sched.config.shift == 3.0 and not sched.config.use_dynamic_shifting
    else:
        assert tes["te1"].config.hidden_size == t["pooled_projection_dim"] and "te2" not in tes
        assert sched.config.use_dynamic_shifting == (arch == "flux-dev")
