"""The LoRA engine under bad input (issue 21): never lose a user's model, refuse ambiguous files,
one clear line for every error. Each test here failed before its fix."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import zipfile
from pathlib import Path

import pytest
import torch

from spo_core.cli import main
from spo_core.errors import CorruptFileError, LoRAFormatError, SPOError, UnsafeFileError
from spo_core.lora import read_lora, save_lora, to_webui
from spo_core.lora.tables import load_table
from spo_core.safe_io import load_state_dict, save_safetensors

from lora_helpers import random_lora, spo_modules


# -- helpers -------------------------------------------------------------------------------------

def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(capsys, *needles: str) -> str:
    """stderr is exactly one `error: ...` line (no traceback) that contains every needle."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny SD1.5-shaped diffusers folder and a LoRA for it (written by the pack: it carries its table)."""
    pytest.importorskip("diffusers")
    from spo_core.lora import table_for_pipeline
    from spo_core.testing import tiny_sd15_pipeline

    root = tmp_path_factory.mktemp("tiny")
    pipe = tiny_sd15_pipeline()
    pipe.save_pretrained(root / "model")
    table = table_for_pipeline(pipe)
    lora = random_lora(table, spo_modules(table), rank=2)
    save_lora(lora, root / "lora.safetensors")
    return root / "model", root / "lora.safetensors", table


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    import shutil

    model, lora, table = tiny_model
    shutil.copytree(model, tmp_path / "model")
    shutil.copy(lora, tmp_path / "lora.safetensors")
    return tmp_path / "model", tmp_path / "lora.safetensors", table


@pytest.fixture
def sd15_lora_file(tmp_path):
    table = load_table("sd15")
    path = tmp_path / "spo.safetensors"
    save_lora(random_lora(table, spo_modules(table), rank=4), path)
    return path


# -- 1-3: data loss ------------------------------------------------------------------------------

def test_merge_refuses_to_write_over_its_input_model(model_copy, capsys):
    model, lora, _ = model_copy
    before = _tree_digest(model)
    assert main(["lora", "merge", "--checkpoint", str(model), "--lora", str(lora), "--overwrite", str(model)]) == 2
    _one_error_line(capsys, "is the input")
    assert _tree_digest(model) == before


@pytest.mark.parametrize("where", ["inside", "contains"])
def test_merge_refuses_an_output_inside_or_around_an_input(model_copy, capsys, where):
    model, lora, _ = model_copy
    before = _tree_digest(model)
    out = model / "unet" / "merged" if where == "inside" else model.parent
    assert main(["lora", "merge", "--checkpoint", str(model), "--lora", str(lora), "--overwrite", str(out)]) == 2
    _one_error_line(capsys, str(model))
    assert _tree_digest(model) == before


def test_convert_and_resize_refuse_writing_over_their_input(sd15_lora_file, capsys):
    before = sd15_lora_file.read_bytes()
    assert main(["lora", "convert", str(sd15_lora_file), str(sd15_lora_file), "--overwrite"]) == 2
    _one_error_line(capsys, "is the input")
    assert main(["lora", "resize", str(sd15_lora_file), str(sd15_lora_file), "--rank", "2", "--overwrite"]) == 2
    _one_error_line(capsys, "is the input")
    assert sd15_lora_file.read_bytes() == before


def test_merge_overwrite_keeps_the_old_output_when_the_write_fails(model_copy, tmp_path, capsys, monkeypatch):
    model, lora, _ = model_copy
    out = tmp_path / "merged"
    assert main(["lora", "merge", "--checkpoint", str(model), "--lora", str(lora), "--strength", "0.5", str(out)]) == 0
    capsys.readouterr()
    before = _tree_digest(out)

    import shutil

    real_copy = shutil.copy2

    def disk_full(src, dst, *a, **k):
        if str(src).endswith("model_index.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copy2", disk_full)
    assert main(["lora", "merge", "--checkpoint", str(model), "--lora", str(lora), "--overwrite", str(out)]) == 2
    _one_error_line(capsys, "No space left on device")
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "merged", "model"]


def test_convert_to_peft_overwrite_replaces_the_whole_folder(tmp_path, capsys):
    table = load_table("sd15")
    with_te = random_lora(table, spo_modules(table) + [m for m in table.select(("te1",)) if m.kind == "linear"][:4], rank=2)
    unet_only = random_lora(table, spo_modules(table), rank=2, seed=1)
    save_lora(with_te, tmp_path / "a.safetensors")
    save_lora(unet_only, tmp_path / "b.safetensors")
    out = tmp_path / "peft"
    assert main(["lora", "convert", str(tmp_path / "a.safetensors"), str(out), "--to", "peft"]) == 0
    assert (out / "text_encoder").is_dir()
    assert main(["lora", "convert", str(tmp_path / "b.safetensors"), str(out), "--to", "peft", "--overwrite"]) == 0
    assert not (out / "text_encoder").exists()
    assert len(read_lora(out).modules) == len(unet_only.modules) == 128
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- 4-7: wrong numbers written silently ---------------------------------------------------------

def test_the_same_module_under_two_names_is_refused_naming_both_keys(tmp_path, capsys):
    table = load_table("sd15")
    lora = random_lora(table, spo_modules(table)[:3], rank=4, alpha=1.0)
    sd = to_webui(lora)
    m = next(iter(lora.modules.values()))
    sd[f"unet.{m.info.name}.lora.down.weight"] = m.down.clone()
    sd[f"unet.{m.info.name}.lora.up.weight"] = m.up.clone()
    path = tmp_path / "dup.safetensors"
    save_safetensors(sd, path)
    read = read_lora(path)
    assert any("lora_down.weight" in p and "lora.down.weight" in p for p in read.problems), read.problems
    with pytest.raises(LoRAFormatError, match="twice"):
        read.require_clean(allow_partial=True)
    assert main(["lora", "convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert "twice" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_peft_alpha_pattern_resolves_like_peft(tmp_path):
    peft = pytest.importorskip("peft")
    table = load_table("sd15")
    mods = [m for m in spo_modules(table) if m.name.endswith(("attn1.to_q", "attn2.to_q", "attn1.to_k"))][:3]
    lora = random_lora(table, mods, rank=4)
    sd = {f"base_model.model.{m.info.name}.lora_A.weight": m.down for m in lora.modules.values()}
    sd.update({f"base_model.model.{m.info.name}.lora_B.weight": m.up for m in lora.modules.values()})
    patterns = {"to_q": 8, "attn1\\.to_q": 2}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_k"],
              "alpha_pattern": patterns, "rank_pattern": {}, "use_rslora": False}
    folder = tmp_path / "peft"
    folder.mkdir()
    save_safetensors(sd, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    ours = read_lora(folder, arch="sd15")

    # what peft itself computes for these module names
    class Block(torch.nn.Module):
        def __init__(self, names):
            super().__init__()
            for name in names:
                parent = self
                *path, leaf = name.split(".")
                for part in path:
                    if not hasattr(parent, part):
                        parent.add_module(part, torch.nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(leaf, torch.nn.Linear(4, 4))

    names = [m.info.name for m in lora.modules.values()]
    cfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], alpha_pattern=patterns)
    model = peft.get_peft_model(Block(names), cfg)
    for (_, name), module in ours.modules.items():
        theirs = model.base_model.model.get_submodule(name).scaling["default"]
        assert module.scale == pytest.approx(theirs), name
    assert {round(m.alpha) for m in ours.modules.values()} == {8, 4}  # attn1.to_q gets 8 (first pattern), not 2


def test_convert_to_fp16_refuses_values_fp16_cannot_hold(sd15_lora_file, tmp_path, capsys):
    table = load_table("sd15")
    lora = random_lora(table, spo_modules(table)[:3], rank=4)
    first = next(iter(lora.modules.values()))
    first.up[0, 0] = 1e6
    src = tmp_path / "big.safetensors"
    save_lora(lora, src)
    out = tmp_path / "out.safetensors"
    assert main(["lora", "convert", str(src), str(out), "--dtype", "fp16"]) == 2
    line = _one_error_line(capsys, "fp16")
    assert first.info.name.replace(".", "_") in line or first.info.name in line
    assert not out.exists()
    assert main(["lora", "convert", str(src), str(out), "--dtype", "bf16"]) == 0  # bf16 holds it


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf"])
def test_merge_refuses_a_non_finite_strength(model_copy, tmp_path, capsys, strength):
    model, lora, _ = model_copy
    out = tmp_path / "merged"
    assert main(["lora", "merge", "--checkpoint", str(model), "--lora", str(lora), f"--strength={strength}", str(out)]) == 2
    _one_error_line(capsys, "strength")
    assert not out.exists()


def test_merge_refuses_an_overflowing_result_naming_the_tensor(tmp_path, capsys):
    table = load_table("sd15")
    mods = spo_modules(table)[:2]
    base = {f"model.diffusion_model.{m.ldm}.weight": torch.full(m.shape, 60000.0, dtype=torch.float16) for m in mods}
    probe = table.get("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    base[f"model.diffusion_model.{probe.ldm}.weight"] = torch.zeros(probe.shape, dtype=torch.float16)
    save_safetensors(base, tmp_path / "ckpt.safetensors")
    lora = random_lora(table, mods[:1], rank=1, alpha=1.0)
    m = next(iter(lora.modules.values()))
    m.down.fill_(100.0)
    m.up.fill_(100.0)
    save_lora(lora, tmp_path / "big.safetensors")
    out = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", "--checkpoint", str(tmp_path / "ckpt.safetensors"), "--lora",
                 str(tmp_path / "big.safetensors"), str(out)]) == 2
    _one_error_line(capsys, f"model.diffusion_model.{mods[0].ldm}.weight")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors", "ckpt.safetensors"]


def test_extract_from_identical_models_is_an_error(model_copy, tmp_path, capsys):
    model, _, _ = model_copy
    out = tmp_path / "x.safetensors"
    assert main(["lora", "extract", "--base", str(model), "--tuned", str(model), "--rank", "2", str(out)]) == 2
    _one_error_line(capsys, "do not differ")
    assert not out.exists()


def test_merge_to_a_ckpt_name_reports_the_file_it_wrote(model_copy, tmp_path, capsys):
    table = load_table("sd15")
    mods = spo_modules(table)[:2]
    ckpt = {f"model.diffusion_model.{m.ldm}.weight": torch.zeros(m.shape) for m in mods}
    probe = table.get("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    ckpt[f"model.diffusion_model.{probe.ldm}.weight"] = torch.zeros(probe.shape)
    save_safetensors(ckpt, tmp_path / "in.safetensors")
    save_lora(random_lora(table, mods, rank=1), tmp_path / "l.safetensors")
    assert main(["lora", "merge", "--checkpoint", str(tmp_path / "in.safetensors"), "--lora", str(tmp_path / "l.safetensors"),
                 str(tmp_path / "out.ckpt")]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "out.safetensors") in out and not (tmp_path / "out.ckpt").exists()
    assert (tmp_path / "out.safetensors").is_file()


def test_a_missing_output_folder_is_refused(sd15_lora_file, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "folder" / "out.safetensors"
    assert main(["lora", "convert", str(sd15_lora_file), str(out)]) == 2
    _one_error_line(capsys, "does not exist")
    assert not (tmp_path / "no").exists()


# -- 8: output-side OS errors ------------------------------------------------------------------------

def test_output_under_proc_is_one_line(sd15_lora_file, capsys):
    assert main(["lora", "convert", str(sd15_lora_file), "/proc/spo_out.safetensors"]) == 2
    _one_error_line(capsys, "/proc/spo_out.safetensors")


def test_output_that_is_an_existing_folder_is_one_line(sd15_lora_file, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert main(["lora", "convert", str(sd15_lora_file), str(tmp_path / "folder"), "--overwrite"]) == 2
    _one_error_line(capsys, "is a folder")
    assert (tmp_path / "folder").is_dir()


def test_peft_output_onto_an_existing_file_is_one_line(sd15_lora_file, tmp_path, capsys):
    target = tmp_path / "file.safetensors"
    target.write_bytes(b"keep me")
    assert main(["lora", "convert", str(sd15_lora_file), str(target), "--to", "peft", "--overwrite"]) == 2
    _one_error_line(capsys, "is a file")
    assert target.read_bytes() == b"keep me"


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(sd15_lora_file, tmp_path, capsys, monkeypatch):
    import spo_core.safe_io as sio

    real_open = open

    class FullFile(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *a, **k):
        if "w" in mode and Path(path).name.startswith(".out.safetensors"):
            return FullFile(path, "w")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(sio, "open", fake_open, raising=False)
    out = tmp_path / "out.safetensors"
    assert main(["lora", "convert", str(sd15_lora_file), str(out)]) == 2
    _one_error_line(capsys, "No space left on device", str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spo.safetensors"]


# -- 9-11: malformed files -------------------------------------------------------------------------

def _raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize("header", [b"[1,2,3]", b"12345678", b'{"a": 5}', b'{"a": {"dtype": "F32", "shape": [1]}}',
                                    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}',
                                    b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
                                    b'{"a": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}}',
                                    b'{"__metadata__": [1], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                                    b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}'])
def test_malformed_safetensors_headers_are_one_line(tmp_path, capsys, header):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 16)
    with pytest.raises(CorruptFileError):
        read_lora(path)
    assert main(["lora", "inspect", str(path)]) == 2
    _one_error_line(capsys, str(path))


def test_an_alpha_of_two_values_and_a_rank_zero_module_are_problems(tmp_path, capsys):
    table = load_table("sd15")
    lora = random_lora(table, spo_modules(table)[:3], rank=4)
    sd = to_webui(lora)
    names = sorted({k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")})
    sd[names[0] + ".alpha"] = torch.tensor([1.0, 2.0])
    sd[names[1] + ".lora_down.weight"] = torch.zeros(0, sd[names[1] + ".lora_down.weight"].shape[1])
    sd[names[1] + ".lora_up.weight"] = torch.zeros(sd[names[1] + ".lora_up.weight"].shape[0], 0)
    path = tmp_path / "odd.safetensors"
    save_safetensors(sd, path)
    read = read_lora(path)
    text = "\n".join(read.problems)
    assert "alpha" in text and "rank 0" in text, read.problems
    for verb in (["convert", str(path), str(tmp_path / "o.safetensors"), "--to", "diffusers"],
                 ["resize", str(path), str(tmp_path / "r.safetensors"), "--rank", "1"]):
        assert main(["lora", *verb]) == 2
        assert "Traceback" not in capsys.readouterr().err


def _mutations(data: bytes, count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        buf = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4, 16))):
            kind = rng.random()
            pos = rng.randrange(len(buf))
            if kind < 0.6:
                buf[pos] = rng.randrange(256)
            elif kind < 0.8:
                del buf[pos: pos + rng.randrange(1, 64)]
            else:
                buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        # bias toward the header, where structure lives
        yield bytes(buf)


def _fuzz(reader, data: bytes, path: Path, count: int, seed: int) -> dict[str, int]:
    outcomes = {"ok": 0, "refused": 0}
    for mutated in _mutations(data, count, seed):
        path.write_bytes(mutated)
        try:
            reader(path)
            outcomes["ok"] += 1
        except SPOError:
            outcomes["refused"] += 1
    return outcomes


def _small_lora(table, n=3):
    return random_lora(table, spo_modules(table)[:n], rank=2)


def test_fuzz_the_safetensors_lora_reader(tmp_path):
    table = load_table("sd15")
    src = tmp_path / "src.safetensors"
    save_lora(_small_lora(table), src)
    header_len = int.from_bytes(src.read_bytes()[:8], "little")
    data = src.read_bytes()[: 8 + header_len + 64]  # the header and a little data: mutations land in the structure
    data = data + src.read_bytes()[8 + header_len + 64:]
    outcomes = _fuzz(read_lora, data, tmp_path / "m.safetensors", 1000, seed=21)
    assert outcomes["refused"] > 0


def test_fuzz_the_pickle_lora_reader(tmp_path):
    table = load_table("sd15")
    sd = to_webui(_small_lora(table))
    buf = io.BytesIO()
    torch.save(sd, buf)
    outcomes = _fuzz(read_lora, buf.getvalue(), tmp_path / "m.pt", 1000, seed=22)
    assert outcomes["refused"] > 0


def test_fuzz_the_checkpoint_reader(tmp_path):
    from spo_core.lora import CheckpointReader

    table = load_table("sd15")
    mods = spo_modules(table)[:2]
    ckpt = {f"model.diffusion_model.{m.ldm}.weight": torch.zeros(8) for m in mods}
    ckpt["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(4, 768)
    src = tmp_path / "c.safetensors"
    save_safetensors(ckpt, src)

    def read(path):
        with CheckpointReader(path) as r:
            for loc in r.locations.values():
                r.files.get(loc.file, loc.key)

    outcomes = _fuzz(read, src.read_bytes(), tmp_path / "m.safetensors", 1000, seed=23)
    assert outcomes["refused"] > 0


def test_a_zip_bomb_pt_is_refused_before_inflating(tmp_path, monkeypatch):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/version", b"3\n")
        with z.open("archive/data/0", "w", force_zip64=True) as f:
            block = b"\0" * (1 << 20)
            for _ in range(256):
                f.write(block)
    assert path.stat().st_size < 2 << 20

    def no_load(*a, **k):
        raise AssertionError("torch.load was called on a zip bomb")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CorruptFileError, match="inflate"):
        read_lora(path)


def test_random_bytes_named_bin_are_not_called_a_pickle_with_code(tmp_path, capsys):
    path = tmp_path / "random.bin"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CorruptFileError) as err:
        load_state_dict(path)
    text = str(err.value)
    assert "not a" in text and "code" not in text and "weights_only" not in text
    assert main(["lora", "inspect", str(path)]) == 2
    line = _one_error_line(capsys, str(path))
    assert "weights_only" not in line


def test_a_pickle_with_code_never_suggests_unsafe_loading(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(UnsafeFileError) as err:
        load_state_dict(path)
    text = str(err.value)
    assert "weights_only=False" not in text and "system" in text


# -- 12-13 ----------------------------------------------------------------------------------------

def _lycoris_file(tmp_path, kind: str) -> Path:
    table = load_table("sd15")
    sd = {}
    for m in spo_modules(table)[:4]:
        name = "lora_unet_" + m.name.replace(".", "_")
        out_f, in_f = m.shape
        if kind == "loha":
            sd.update({f"{name}.hada_w1_a": torch.zeros(out_f, 4), f"{name}.hada_w1_b": torch.zeros(4, in_f),
                       f"{name}.hada_w2_a": torch.zeros(out_f, 4), f"{name}.hada_w2_b": torch.zeros(4, in_f)})
        elif kind == "lokr":
            sd.update({f"{name}.lokr_w1": torch.zeros(4, 4), f"{name}.lokr_w2": torch.zeros(out_f // 4, in_f // 4)})
        else:  # dora
            sd.update({f"{name}.lora_down.weight": torch.zeros(4, in_f), f"{name}.lora_up.weight": torch.zeros(out_f, 4),
                       f"{name}.dora_scale": torch.ones(1, in_f)})
        sd[f"{name}.alpha"] = torch.tensor(4.0)
    path = tmp_path / f"{kind}.safetensors"
    save_safetensors(sd, path)
    return path


@pytest.mark.parametrize("kind, label", [("loha", "LoHa"), ("lokr", "LoKr"), ("dora", "DoRA")])
def test_lycoris_and_dora_files_name_their_format_as_unsupported(tmp_path, capsys, kind, label):
    path = _lycoris_file(tmp_path, kind)
    with pytest.raises(LoRAFormatError, match=label) as err:
        read_lora(path).require_clean(allow_partial=True)
    assert "not supported" in str(err.value) and "unknown" not in str(err.value)
    assert main(["lora", "inspect", str(path)]) != 0
    captured = capsys.readouterr()
    assert label in captured.out + captured.err and "base model  unknown" not in captured.out


def test_a_lora_at_a_non_utf8_path_reads(tmp_path, sd15_lora_file, capsys):
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    folder.mkdir()
    path = folder / "lora.safetensors"
    path.write_bytes(sd15_lora_file.read_bytes())
    assert read_lora(path).is_clean()
    # the CLI in a real process (its stdout gets the path's original bytes back)
    import subprocess
    import sys

    for verb in (["inspect", path], ["convert", path, folder / "b.safetensors", "--to", "diffusers"]):
        done = subprocess.run([sys.executable, "-m", "spo_core", "lora", *map(os.fsencode, verb)], capture_output=True)
        assert done.returncode == 0, done.stderr
        assert b"caf\xe9" in done.stdout and b"all keys matched" in done.stdout
    assert read_lora(folder / "b.safetensors").is_clean()


# -- also: different alphas and diffusers ---------------------------------------------------------

def test_inspect_warns_when_attention_modules_carry_different_alphas(tmp_path, capsys):
    table = load_table("sd15")
    lora = random_lora(table, spo_modules(table)[:8], rank=4)
    for i, m in enumerate(lora.modules.values()):
        m.alpha = 1.0 if i % 2 else 4.0
    path = tmp_path / "mixed.safetensors"
    save_lora(lora, path)
    assert main(["lora", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "different alphas" in out and "--to diffusers" in out


def test_non_finite_names_exactly_the_bad_tensors_large_and_batched():
    from spo_core.safe_io import non_finite

    big = torch.zeros(1 << 17, dtype=torch.bfloat16)
    bad_big = big.clone()
    bad_big[12345] = float("nan")
    small = {f"s{i}": torch.full((7, 3), float(i), dtype=torch.float16) for i in range(50)}
    small["s17"][2, 1] = float("inf")
    tensors = {"big": big, "bad_big": bad_big, **small, "ints": torch.arange(5), "empty": torch.zeros(0)}
    assert non_finite(tensors) == ["bad_big", "s17"]
