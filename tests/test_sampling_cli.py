"""`spo sample` end to end on a tiny diffusers folder: image, trace grid, and clear errors."""

import pytest
import torch
from PIL import Image

from spo_core.cli import main
from spo_core.testing import tiny_sd15_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_sd15_pipeline().save_pretrained(folder)
    return folder


def test_sample_writes_image_and_trace(model_dir, tmp_path, capsys):
    pytest.importorskip("spo_core.scorers")
    out, grid = tmp_path / "img.png", tmp_path / "grid.png"
    args = ["sample", "--model", str(model_dir), "--prompt", "a red circle", "--k", "3", "--steps", "4",
            "--height", "32", "--width", "32", "--window", "0:999", "--scorer", "jpeg_incompressibility",
            "--decoder", "rgb", "--out", str(out), "--trace", str(grid), "--no-progress", "--seed", "5"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "4 pooled" in text and "denoiser evaluations" in text
    assert Image.open(out).size == (32, 32)
    assert Image.open(grid).size[1] > 4 * 96  # one row per pooled step
    first = out.read_bytes()
    assert main(args[:-2] + ["--seed", "5", "--overwrite"]) == 0  # same seed, same image
    assert out.read_bytes() == first
    assert main(args) == 2  # the outputs exist and --overwrite is not given
    assert "exists" in capsys.readouterr().err


def test_plain_sampling_needs_no_scorer(model_dir, tmp_path):
    out = tmp_path / "plain.png"
    assert main(["sample", "--model", str(model_dir), "--prompt", "x", "--k", "1", "--steps", "3", "--height", "32",
                 "--width", "32", "--out", str(out), "--no-progress", "--num-images", "2"]) == 0
    assert (tmp_path / "plain_0.png").is_file() and (tmp_path / "plain_1.png").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--k", "2"], "need a scorer"),
    (["--k", "2", "--eta", "0", "--scorer", "jpeg_compressibility"], "identical"),
    (["--k", "0"], "at least 1"),
    (["--window", "5"], "LO:HI"),
    (["--k", "2", "--window", "960:990", "--scorer", "jpeg_compressibility"], "no step of this schedule"),
    (["--k", "1", "--trace", "g.png"], "needs --k > 1"),
])
def test_bad_input_is_a_clear_error(model_dir, tmp_path, capsys, extra, message):
    pytest.importorskip("spo_core.scorers")
    code = main(["sample", "--model", str(model_dir), "--prompt", "x", "--steps", "3", "--height", "32", "--width", "32",
                 "--out", str(tmp_path / "o.png"), "--no-progress", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_progress_bar_counts_steps(model_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(model_dir), "--prompt", "x", "--k", "1", "--steps", "3", "--height", "32",
                 "--width", "32", "--out", str(tmp_path / "p.png")]) == 0
    assert "3/3" in capsys.readouterr().err
