"""Bad input gets a clear error and nothing is lost."""

import os
import pickle

import pytest
import torch

from spo_core.errors import (CorruptFileError, FileMissingError, InvalidTensorError, LoRAFormatError,
                             ModelMismatchError, OutputExistsError, UnsafeFileError)
from spo_core.lora import convert_lora, read_lora, save_lora, to_webui
from spo_core.lora.tables import load_table
from spo_core.safe_io import LazyTensor, save_safetensors, save_safetensors_lazy

from lora_helpers import random_lora, spo_modules


@pytest.fixture
def sd15_file(tmp_path):
    table = load_table("sd15")
    path = tmp_path / "spo.safetensors"
    save_lora(random_lora(table, spo_modules(table), rank=4), path)
    return path


def test_missing_path_names_the_file(tmp_path):
    with pytest.raises(FileMissingError, match="nope.safetensors"):
        read_lora(tmp_path / "nope.safetensors")


def test_truncated_safetensors(sd15_file, tmp_path):
    data = sd15_file.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_lora(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptFileError):
        read_lora(garbage)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_with_code_is_refused_and_runs_nothing(tmp_path, suffix):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / f"evil{suffix}"
    with open(evil, "wb") as f:
        pickle.dump({"lora_unet_x.lora_down.weight": torch.zeros(1), "boom": _Payload(str(marker))}, f)
    with pytest.raises(UnsafeFileError, match="nothing was run"):
        read_lora(evil)
    assert not marker.exists()


def test_plain_pickle_of_tensors_loads(tmp_path, sd15_file):
    from spo_core.safe_io import load_state_dict

    sd, _ = load_state_dict(sd15_file)
    path = tmp_path / "lora.bin"
    torch.save(sd, path)
    assert read_lora(path).is_clean()


def test_unknown_format_lists_keys(tmp_path):
    path = tmp_path / "weird.safetensors"
    save_safetensors({"encoder.block.0.weight": torch.zeros(2, 2), "decoder.head.bias": torch.zeros(2)}, path)
    with pytest.raises(LoRAFormatError, match="encoder.block.0.weight") as err:
        read_lora(path)
    assert "decoder.head.bias" in str(err.value)


def test_unsupported_loha_keys_are_listed_not_dropped():
    table = load_table("sd15")
    sd = to_webui(random_lora(table, spo_modules(table)[:4]))
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"] = torch.zeros(4, 4)
    lora = read_lora(sd)
    assert lora.unmatched == ["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"]
    with pytest.raises(LoRAFormatError, match="partial match"):
        lora.require_clean()
    lora.require_clean(allow_partial=True)


def test_sdxl_lora_on_sd15_is_refused_with_the_reason():
    sdxl = load_table("sdxl")
    lora = read_lora(to_webui(random_lora(sdxl, spo_modules(sdxl)[:20])))
    assert lora.arch == "sdxl"
    with pytest.raises(ModelMismatchError, match="made for sdxl but the model is sd15"):
        lora.ensure_arch("sd15")
    forced = read_lora(to_webui(random_lora(sdxl, spo_modules(sdxl)[:20])), arch="sd15")
    with pytest.raises(LoRAFormatError):
        forced.require_clean()


def test_mismatched_shapes_are_problems_with_names():
    table = load_table("sd15")
    sd = to_webui(random_lora(table, spo_modules(table)[:3]))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    sd[key] = torch.zeros(4, 999)
    lora = read_lora(sd, arch="sd15")
    assert len(lora.problems) == 1 and key in lora.problems[0] and "999" in lora.problems[0]
    with pytest.raises(LoRAFormatError, match="cannot be used"):
        lora.require_clean(allow_partial=True)


def test_nan_and_inf_are_refused_with_module_names():
    table = load_table("sd15")
    sd = to_webui(random_lora(table, spo_modules(table)[:3]))
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key][0, 0] = float("nan")
    with pytest.raises(InvalidTensorError, match="NaN or inf") as err:
        read_lora(sd)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in str(err.value)


def test_existing_output_is_refused_unless_overwrite(tmp_path, sd15_file):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="overwrite"):
        convert_lora(sd15_file, out)
    assert out.read_bytes() == b"precious"
    convert_lora(sd15_file, out, overwrite=True)
    assert read_lora(out).is_clean()


def test_crash_mid_write_leaves_no_file(tmp_path):
    out = tmp_path / "half.safetensors"

    def boom():
        raise RuntimeError("disk full")

    specs = [LazyTensor("a", torch.float32, (4,), lambda: torch.zeros(4)), LazyTensor("b", torch.float32, (4,), boom)]
    with pytest.raises(RuntimeError, match="disk full"):
        save_safetensors_lazy(specs, out)
    assert os.listdir(tmp_path) == []


def test_interrupted_conversion_keeps_the_old_file(tmp_path, sd15_file, monkeypatch):
    out = tmp_path / "out.safetensors"
    convert_lora(sd15_file, out)
    before = out.read_bytes()
    import spo_core.safe_io as sio

    real = sio.LazyTensor

    class Failing(real):
        def __init__(self, name, dtype, shape, produce):
            def fail():
                raise KeyboardInterrupt

            super().__init__(name, dtype, shape, fail if name.endswith("attn2_to_v.lora_up.weight") else produce)

    monkeypatch.setattr(sio, "LazyTensor", Failing)
    with pytest.raises(KeyboardInterrupt):
        convert_lora(sd15_file, out, overwrite=True, fmt="webui")
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors", "spo.safetensors"]


def test_dora_modules_are_problems_not_silently_plain_loras():
    table = load_table("sd15")
    sd = to_webui(random_lora(table, spo_modules(table)[:2]))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd[name + ".dora_scale"] = torch.ones(1, 320)
    lora = read_lora(sd)
    assert len(lora.modules) == 1 and "DoRA" in lora.problems[0]
    with pytest.raises(LoRAFormatError):
        lora.require_clean(allow_partial=True)
