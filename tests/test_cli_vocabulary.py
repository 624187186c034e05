"""One vocabulary across the `spo` verbs, `world` everywhere a model or its scorer is named,
and one clear line (never a traceback) for the inputs a new user gets wrong (issue 15)."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from spo_core.cli import build_parser, main


def _parse(*argv):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("verb", [["sample", "--model", "m", "--prompt", "p"], ["score", "x.png"],
                                  ["train"]])
def test_scorer_weights_has_one_name_and_the_old_ones_still_work(verb):
    for flag in ("--scorer-weights", "--weights", "--scorer-path"):
        assert _parse(*verb, flag, "w.safetensors").scorer_weights == "w.safetensors"


def test_guidance_negative_progress_and_output_names_are_shared():
    sample = _parse("sample", "--model", "m", "--prompt", "p", "--guidance-scale", "7", "--negative-prompt", "blurry",
                    "--no-progress")
    assert (sample.guidance_scale, sample.negative_prompt, sample.no_progress) == (7.0, "blurry", True)
    old = _parse("sample", "--model", "m", "--prompt", "p", "--cfg", "3", "--negative", "dark")
    assert (old.guidance_scale, old.negative_prompt) == (3.0, "dark")
    train = _parse("train", "--guidance-scale", "4", "--negative-prompt", "x", "--no-progress")
    assert (train.guidance_scale, train.negative_prompt, train.no_progress) == (4.0, "x", True)
    assert _parse("train", "--quiet").no_progress and _parse("train", "--cfg", "2").guidance_scale == 2.0
    demo = _parse("demo", "--output-dir", "d", "--max-steps", "5")
    assert (demo.output_dir, demo.max_steps) == ("d", 5)
    old_demo = _parse("demo", "--out", "e", "--steps", "6")
    assert (old_demo.output_dir, old_demo.max_steps) == ("e", 6)


def test_help_shows_only_the_one_name(capsys):
    hidden = {"sample": ("--weights ", "--scorer-path", "--cfg ", "--negative ", "--quiet"),
              "train": ("--weights ", "--scorer-path", "--cfg ", "--negative ", "--quiet"),
              "score": ("--weights ", "--scorer-path"), "demo": ("--out ", "--steps ", "--quiet")}
    for verb, flags in hidden.items():
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = capsys.readouterr().out
        for flag in flags:
            assert flag not in text, (verb, flag)


def test_a_config_file_with_the_old_setting_name_still_loads(tmp_path):
    from spo_core.training.config import TrainConfig

    path = tmp_path / "run.toml"
    path.write_text('prompt_list = ["a"]\nscorer_path = "spm.safetensors"\n')
    assert TrainConfig.from_file(path).scorer_weights == "spm.safetensors"


# -- world ----------------------------------------------------------------------------------------

def test_sample_with_model_world_uses_the_world_spm_by_default(tmp_path, capsys):
    out = tmp_path / "w.png"
    assert main(["sample", "--model", "world", "--prompt", "a red circle", "--steps", "4", "--k", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert out.is_file() and "pooled with k = 2" in capsys.readouterr().out


def test_score_with_model_world(tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(img)
    assert main(["score", "--model", "world", "--prompt", "a red square", str(img), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["scorer"] == "spm" and len(data["scores"]) == 1


def test_train_with_model_world_needs_nothing_else(tmp_path, capsys):
    assert main(["train", "--model", "world", "--print-config"]) == 0
    text = capsys.readouterr().out
    for line in ('preset = "spo-world"', 'scorer_weights = "world"', 'prompts = "world"', "beta = 100.0", "threshold = 0.1"):
        assert line in text, line
    out = tmp_path / "run"
    assert main(["train", "--model", "world", "--max-steps", "1", "--sample-batch-size", "2", "--train-batch-size", "2",
                 "--steps", "4", "--threshold", "0", "--output-dir", str(out), "--no-progress", "--validate-every", "-1"]) == 0
    assert (out / "spo_lora.safetensors").is_file()
    assert main(["lora", "inspect", str(out / "spo_lora.safetensors")]) == 0  # the trained LoRA reads as it is


def test_lora_verbs_take_world_as_the_model(tmp_path, capsys):
    from lora_helpers import random_lora, spo_modules
    from spo_core.lora import save_lora
    from spo_core.world import load_world_backend

    table = load_world_backend().module_table()
    lora = tmp_path / "l.safetensors"
    save_lora(random_lora(table, spo_modules(table), rank=2), lora)
    assert main(["lora", "inspect", str(lora), "--model", "world"]) == 0
    assert main(["lora", "merge", "--checkpoint", "world", "--lora", str(lora), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "unet").is_dir()
    capsys.readouterr()
    assert main(["lora", "extract", "--base", "world", "--tuned", str(tmp_path / "merged"), "--rank", "2",
                 str(tmp_path / "x.safetensors")]) == 0


# -- one line, never a traceback --------------------------------------------------------------

def _one_error_line(capsys, needle: str = "") -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "notes.safetensors.txt"
    path.write_text("these are my notes, not weights\n" * 20)
    return path


@pytest.mark.parametrize("argv", [
    ["lora", "inspect", "{t}"],
    ["lora", "convert", "{t}", "{d}/o.safetensors"],
    ["sample", "--model", "{t}", "--prompt", "p", "--k", "1", "--out", "{d}/s.png"],
    ["sample", "--model", "world", "--prompt", "p", "--k", "1", "--lora", "{t}", "--out", "{d}/s.png"],
    ["train", "--model", "{t}", "--prompt-list", "a", "--scorer", "jpeg_compressibility", "--output-dir", "{d}/r"],
    ["train", "--model", "world", "--init-lora", "{t}", "--max-steps", "1", "--output-dir", "{d}/r2"],
    ["score", "--scorer", "spm", "--scorer-weights", "{t}", "--prompt", "p", "{img}"],
    ["scorer", "convert", "{t}", "{d}/spm.safetensors"],
])
def test_a_text_file_given_as_weights_is_one_line(argv, text_file, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "i.png"
    Image.new("RGB", (8, 8)).save(img)
    args = [a.format(t=text_file, d=tmp_path, img=img) for a in argv]
    assert main(args) == 2
    _one_error_line(capsys, "notes.safetensors.txt")


def test_ui_refuses_a_missing_model_and_a_busy_port(capsys, tmp_path):
    pytest.importorskip("gradio")
    assert main(["ui", "--model", str(tmp_path / "nope")]) == 2
    _one_error_line(capsys, "not found")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
        _one_error_line(capsys, str(port))
