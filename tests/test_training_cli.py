"""`spo train` on a saved tiny diffusers model, and multi-process training under `accelerate launch`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spo_core.cli import main
from test_training_support import lora_tensors, single_thread

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from spo_core.testing import tiny_sd15_pipeline

    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_sd15_pipeline().save_pretrained(folder)
    return folder


def _toml(path: Path, out: Path, model: Path, **extra) -> Path:
    lines = [f'model = "{model}"', f'output_dir = "{out}"', 'prompt_list = ["a cat", "a dog", "a boat"]', "steps = 4",
             "k = 2", "sample_batch_size = 2", "train_batch_size = 2", "height = 16", "width = 16", "validate_every = -1",
             'scorer = "jpeg_incompressibility"', "threshold = 0.0", "seed = 3", "[lora]", "rank = 2"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_spo_train_from_a_toml_file_with_flag_overrides_and_resume(model_dir, tmp_path, capsys):
    run = _toml(tmp_path / "run.toml", tmp_path / "out", model_dir)
    with single_thread():
        assert main(["train", "--config", str(run), "--max-steps", "2", "--quiet", "--learning-rate", "1e-3"]) == 0
        printed = capsys.readouterr().out
        assert "LoRA:" in printed and "out/spo_lora.safetensors" in printed
        state = json.loads((tmp_path / "out" / "checkpoints" / "step-000002" / "state.json").read_text())
        assert state["config"]["rank"] == 2 and state["config"]["learning_rate"] == 1e-3 and state["config"]["k"] == 2
        # continuing needs --resume; without it the existing output is refused
        assert main(["train", "--config", str(run), "--max-steps", "3", "--quiet", "--learning-rate", "1e-3"]) == 2
        assert "resume" in capsys.readouterr().err
        assert main(["train", "--config", str(run), "--max-steps", "3", "--quiet", "--learning-rate", "1e-3",
                     "--resume", "auto"]) == 0
    captured = capsys.readouterr()
    assert "steps: 3" in captured.out and "process 1 of 1" in captured.err
    assert lora_tensors(tmp_path / "out" / "spo_lora.safetensors")
    # resuming a finished run says so (not "last loss: nan")
    with single_thread():
        assert main(["train", "--config", str(run), "--max-steps", "3", "--quiet", "--learning-rate", "1e-3",
                     "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and "nan" not in out


def test_print_config_resolves_presets_and_flags(capsys):
    assert main(["train", "--preset", "sdxl", "--prompts", "p.txt", "--rank", "32", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "k = 2" in text and "inner_steps = 3" in text and "rank = 32" in text and "threshold = 0.4" in text


def test_print_config_needs_no_data_and_takes_method_aliases(capsys):
    assert main(["train", "--method", "dpo", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert 'method = "diffusion_dpo"' in text and "beta = 2500.0" in text and "learning_rate = 1e-05" in text
    assert main(["train", "--method", "spo"]) == 2  # a real run still needs its prompts
    assert "prompt" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(capsys):
    assert main(["train", "--prompts", "p.txt"]) == 2
    assert "--model" in capsys.readouterr().err


_ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")


@pytest.mark.slow
@pytest.mark.skipif(_ACCELERATE is None, reason="accelerate is not installed")
def test_two_processes_with_accelerate_share_pairs_and_stay_in_sync(model_dir, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU runs two gloo processes."""
    run = _toml(tmp_path / "run.toml", tmp_path / "out", model_dir, max_steps=2, checkpoint_every=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [_ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "spo_core", "train",
           "--config", str(run), "--quiet", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "out" / "checkpoints" / "step-000002"
    rank0, rank1 = lora_tensors(ckpt / "state.safetensors"), lora_tensors(ckpt / "rank-1.safetensors")
    lora_keys = [k for k in rank0 if k.startswith("lora.")]
    assert lora_keys
    for k in lora_keys:  # gradients were averaged: both processes hold the same LoRA
        torch.testing.assert_close(rank0[k], rank1[k], atol=0, rtol=0)
    assert any(float(rank0[k].abs().max()) > 0 for k in lora_keys if k.endswith(".up"))
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    assert start["world"] == 2
    rounds = [r for r in records if r.get("event") == "round"]
    # each process trains on its half of the pairs gathered from both
    assert rounds and all(r["pairs"] == r["gathered"] // 2 and r["gathered"] >= r["local_pairs"] for r in rounds)
    assert any(r["gathered"] > r["local_pairs"] for r in rounds)
    assert rank0["rng.sample"].shape == rank1["rng.sample"].shape and not torch.equal(rank0["rng.sample"], rank1["rng.sample"])
