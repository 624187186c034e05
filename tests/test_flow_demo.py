"""`spo demo --flow` and `spo sample --model world-flow`: steering on the world's rectified-flow model,
at equal evaluations, end to end on the shipped weights."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from spo_core.cli import main  # noqa: E402
from spo_core.world.flow_demo import FlowDemoConfig, run_flow_demo  # noqa: E402


def test_flow_demo_compares_steering_with_best_of_n_at_equal_evaluations(tmp_path):
    cfg = FlowDemoConfig(out=tmp_path / "demo", eval_prompts=2, seeds_per_prompt=1, budget=2, grid_rows=2, train_steps=1)
    report = run_flow_demo(cfg)
    arms = report["arms"]
    assert list(arms) == ["plain", "best-of-2", "greedy k=2, every step", "FK 2 particles", "spo LoRA (1 steps)"]
    assert report["training"]["steps"] == 1 and report["training"]["transformer_evaluations"] > 0
    assert arms["spo LoRA (1 steps)"]["denoiser_evaluations_per_image"] == 20  # plain sampling of the merged LoRA
    assert "vs_best_of_n" not in arms["spo LoRA (1 steps)"] and "spo LoRA: 1 steps" in (tmp_path / "demo" / "report.md").read_text()
    assert arms["plain"]["denoiser_evaluations_per_image"] == 20  # 20 steps, CFG inside one row
    best = arms["best-of-2"]["denoiser_evaluations_per_image"]
    assert best == 40
    for name in ("greedy k=2, every step", "FK 2 particles"):
        assert abs(arms[name]["denoiser_evaluations_per_image"] - best) <= 0.05 * best  # equal compute, within 5%
        assert set(arms[name]["vs_best_of_n"]) >= {"mean_delta", "ci95"}
    assert 0 <= arms["plain"]["mean"] <= 1
    assert (tmp_path / "demo" / "flow_steering.png").is_file()
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["eval_set"]["images"] == 2
    assert "| FK 2 particles |" in (tmp_path / "demo" / "report.md").read_text()


def test_spo_sample_world_flow(tmp_path, capsys):
    out = tmp_path / "f.png"
    assert main(["sample", "--model", "world-flow", "--prompt", "a red circle above a blue square", "--k", "2",
                 "--steps", "6", "--window", "0:1000", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "5 pooled with k = 2" in text
    assert main(["sample", "--model", "world-flow", "--prompt", "a red circle", "--particles", "2", "--steps", "6",
                 "--out", str(tmp_path / "fk.png"), "--no-progress"]) == 0
    assert "FK steering with 2 particles" in capsys.readouterr().out


def test_flow_demo_cli_refuses_methods_that_need_a_unet(capsys):
    assert main(["demo", "--flow", "--method", "lpo"]) == 2
    assert "the flow model trains with spo, ddpo, grpo, not 'lpo'" in capsys.readouterr().err
