"""Settings (presets, TOML/JSON, flags), prompt and pair files, the resumable data order,
checkpoint file handling and the PNG charts: no models needed."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from spo_core.errors import ConfigError, FileMissingError
from spo_core.training import PRESETS, TrainConfig, preset
from spo_core.training import checkpoint as ckpt
from spo_core.training.config import add_arguments, from_args
from spo_core.training.data import IndexSampler, load_pairs, load_prompts
from test_training_support import write_pair_folder


def test_presets_reproduce_the_released_spo_configs():
    sd15 = preset("sd15", prompts="p.txt").resolved()
    assert (sd15.steps, sd15.eta, sd15.guidance_scale, sd15.k, sd15.inner_steps, sd15.threshold) == (20, 1.0, 5.0, 4, 0, 0.3)
    assert (sd15.rank, sd15.alpha, sd15.targets, sd15.init) == (4, 4.0, "attn", "gaussian")
    assert (sd15.learning_rate, sd15.weight_decay, sd15.max_grad_norm, sd15.beta, sd15.clip_eps) == (6e-5, 1e-4, 1.0, 10.0, 0.1)
    assert (sd15.adam_beta1, sd15.adam_beta2, sd15.adam_eps, sd15.max_train_t) == (0.9, 0.999, 1e-8, 751.0)
    xl = preset("sdxl", prompts="p.txt").resolved()
    assert (xl.k, xl.inner_steps, xl.threshold, xl.rank, xl.alpha, xl.learning_rate) == (2, 3, 0.4, 64, 64.0, 1e-5)
    assert (xl.train_batch_size, xl.gradient_accumulation) == (2, 2)
    assert set(PRESETS) == {"spo-sd15", "spo-sdxl", "lpo-sd15", "lpo-sdxl", "diffusion-dpo", "ncp-dpo", "ddpo", "spo-world",
                            "lpo-world", "diffusion-dpo-world", "ncp-dpo-world", "ddpo-world", "grpo-world",
                            "spo-world-flow", "grpo-world-flow", "ddpo-world-flow", "grpo-sd3", "grpo-flux", "spo-sd3",
                            "spo-flux"}
    lpo = preset("lpo", prompts="p.txt").resolved()  # Kwai-Kolors/LPO's SD1.5 config
    assert (lpo.method, lpo.k, lpo.beta, lpo.threshold, lpo.threshold_max, lpo.min_train_t, lpo.max_train_t) == \
        ("lpo", 4, 500.0, 0.35, 0.5, 0.0, 999.0)
    assert (lpo.rank, lpo.learning_rate, lpo.sample_batch_size, lpo.train_batch_size, lpo.scorer) == (4, 6e-5, 5, 10, "lrm")
    assert TrainConfig(method="dpo", pairs="x").resolved().beta == 2500.0


def test_flow_grpo_presets_carry_the_published_settings():
    """Flow-GRPO @ac4c86e config/grpo.py pickscore_sd3 + base.py + train_sd3.py; its later pickscore_flux."""
    sd3 = preset("grpo-sd3", prompts="p.txt").resolved()
    assert (sd3.method, sd3.steps, sd3.flow_step, sd3.noise_level, sd3.guidance_scale, sd3.height) == \
        ("grpo", 10, "sde", 0.7, 4.5, 512)
    assert (sd3.group_size, sd3.grpo_global_std, sd3.grpo_timestep_fraction, sd3.beta) == (24, True, 0.99, 0.01)
    assert (sd3.ddpo_clip_range, sd3.ddpo_adv_clip, sd3.rank, sd3.alpha, sd3.learning_rate) == (1e-4, 5.0, 32, 64.0, 3e-4)
    flux = preset("grpo-flux", prompts="p.txt").resolved()
    assert (flux.steps, flux.noise_level, flux.guidance_scale, flux.beta, flux.group_size) == (6, 0.9, 3.5, 0.0, 24)
    assert preset("sd3").method == "spo" and preset("flux").steps == 6
    from spo_core.training.config import auto_preset

    assert auto_preset("grpo", "sd35-medium") == "grpo-sd3" and auto_preset("spo", "flux-dev") == "spo-flux"
    assert auto_preset("grpo", None, world=True, flow=True) == "grpo-world-flow"
    assert auto_preset("lpo", None, world=True, flow=True) is None
    assert TrainConfig(method="flow-grpo", prompt_list=["a"]).resolved().beta == 0.04
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        TrainConfig(method="grpo", prompt_list=["a"], group_size=1).resolved()
    with pytest.raises(ConfigError, match="noise_level must be > 0"):
        TrainConfig(method="grpo", prompt_list=["a"], noise_level=0.0).resolved()


def test_invalid_settings_say_what_to_change():
    with pytest.raises(ConfigError, match="eta > 0"):
        TrainConfig(prompt_list=["a"], eta=0.0).resolved()
    with pytest.raises(ConfigError, match="k >= 2"):
        TrainConfig(prompt_list=["a"], k=1).resolved()
    with pytest.raises(ConfigError, match="pairs"):
        TrainConfig(method="diffusion_dpo").resolved()
    with pytest.raises(ConfigError, match="prompt"):
        TrainConfig().resolved()
    with pytest.raises(ConfigError, match="unknown method"):
        TrainConfig(method="ppo", prompt_list=["a"]).resolved()
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("sd4")


def test_toml_sections_flags_and_round_trip(tmp_path):
    (tmp_path / "run.toml").write_text(
        'preset = "sdxl"\nmax_steps = 12\nprompts = "p.txt"\n[lora]\nrank = 8\n[objective]\nbeta = 5.0\n'
        'validation_seeds = [3, 4]\nscorer_options = { tokenizer_path = "tok" }\n')
    cfg = TrainConfig.from_file(tmp_path / "run.toml")
    assert (cfg.preset, cfg.k, cfg.rank, cfg.beta, cfg.max_steps, cfg.validation_seeds) == ("spo-sdxl", 2, 8, 5.0, 12, [3, 4])
    assert cfg.scorer_options == {"tokenizer_path": "tok"}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--rank", "16", "--no-cache-latents", "--validation-prompts", "a lake", "a cat",
                              "--learning-rate", "2e-5", "--scorer-options", '{"clip": "x"}'])
    merged = from_args(args, cfg)
    assert (merged.rank, merged.cache_latents, merged.learning_rate, merged.k) == (16, False, 2e-5, 2)
    assert merged.validation_prompts == ["a lake", "a cat"] and merged.scorer_options == {"clip": "x"}
    (tmp_path / "again.toml").write_text(merged.to_toml())
    assert TrainConfig.from_file(tmp_path / "again.toml") == merged
    (tmp_path / "run.json").write_text(json.dumps({"method": "ddpo", "prompts": "p.txt"}))
    assert TrainConfig.from_file(tmp_path / "run.json").method == "ddpo"
    (tmp_path / "bad.toml").write_text("rnak = 3\n")
    with pytest.raises(ConfigError, match="rnak"):
        TrainConfig.from_file(tmp_path / "bad.toml")


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "spo.json").write_text(json.dumps([{"caption": "a lake", "trainset_idx": 53}, {"caption": "a tree", "trainset_idx": 9}]))
    assert load_prompts(tmp_path / "spo.json") == ["a lake", "a tree"]
    (tmp_path / "l.json").write_text(json.dumps(["x", "y"]))
    assert load_prompts(tmp_path / "l.json") == ["x", "y"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n"two"\n{"text": "three"}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["one", "two", "three"]
    with pytest.raises(FileMissingError):
        load_prompts(tmp_path / "none.txt")
    (tmp_path / "bad.json").write_text(json.dumps([{"url": "x"}]))
    with pytest.raises(ConfigError, match="caption"):
        load_prompts(tmp_path / "bad.json")


def test_pair_sources(tmp_path):
    write_pair_folder(tmp_path / "a", n=2)
    pairs = load_pairs(tmp_path / "a")
    assert [p.prompt for p in pairs] == ["prompt 0", "prompt 1"] and pairs[0].win.endswith("0w.png")
    (tmp_path / "a" / "pairs.csv").write_text("prompt,chosen,rejected\nhello,0w.png,0l.png\n")
    (tmp_path / "a" / "pairs.jsonl").unlink()
    assert load_pairs(tmp_path / "a")[0].prompt == "hello"
    sub = tmp_path / "b" / "001"
    sub.mkdir(parents=True)
    for name in ("win.png", "lose.png"):
        (sub / name).write_bytes((tmp_path / "a" / "0w.png").read_bytes())
    (sub / "prompt.txt").write_text("folder prompt\n")
    assert load_pairs(tmp_path / "b")[0].prompt == "folder prompt"
    # Pick-a-Pic rows: label_0 picks the winner, ties are dropped
    img = (tmp_path / "a" / "0w.png").read_bytes()
    rows = [{"caption": "c1", "jpg_0": "0w.png", "jpg_1": "0l.png", "label_0": 0.0},
            {"caption": "tie", "jpg_0": "0w.png", "jpg_1": "0l.png", "label_0": 0.5}]
    (tmp_path / "a" / "pick.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pick = load_pairs(tmp_path / "a" / "pick.jsonl")
    assert len(pick) == 1 and pick[0].win.endswith("0l.png")
    from spo_core.training.data import load_image

    assert load_image(img, 16, 12).shape == (3, 16, 12)
    with pytest.raises(ConfigError, match="winner"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "image": "y"}))
        load_pairs(tmp_path / "bad.jsonl")


def test_index_sampler_is_seeded_resumable_and_split_across_processes():
    a = IndexSampler(5, seed=1)
    first = a.take(3) + a.take(4)  # crosses an epoch
    assert sorted(first[:5]) == [0, 1, 2, 3, 4]
    b = IndexSampler(5, seed=1)
    b.take(3)
    state = b.state_dict()
    c = IndexSampler(5, seed=1)
    c.load_state_dict(state)
    assert c.take(4) == first[3:]
    r0, r1 = IndexSampler(6, 2, rank=0, world=2), IndexSampler(6, 2, rank=1, world=2)
    single = IndexSampler(6, 2)
    draws = single.take(6)
    assert r0.take(3) == draws[0::2] and r1.take(3) == draws[1::2]
    with pytest.raises(ConfigError, match="changed"):
        IndexSampler(4, 1).load_state_dict(state)


def test_checkpoint_folders_are_atomic_and_pruned(tmp_path):
    for step in (1, 2, 3):
        tmp = ckpt.begin(tmp_path, step)
        ckpt.write_state(tmp, {"x": torch.full((2,), float(step))}, {"step": step})
        ckpt.commit(tmp_path, tmp, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    # a checkpoint interrupted before its rename is invisible
    tmp = ckpt.begin(tmp_path, 4)
    ckpt.write_state(tmp, {"x": torch.zeros(2)}, {"step": 4})
    assert ckpt.resolve_resume("auto", tmp_path).name == "step-000003"
    tensors, state = ckpt.read_state(ckpt.resolve_resume(str(tmp_path), tmp_path))
    assert state["step"] == 3 and tensors["x"].tolist() == [3.0, 3.0]
    assert ckpt.resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(FileMissingError):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    tensors, meta = ckpt.flatten_optimizer(opt.state_dict())
    restored = ckpt.unflatten_optimizer(tensors, json.loads(json.dumps(meta)))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    opt2.load_state_dict(restored)
    for k, v in opt.state_dict()["state"][0].items():
        torch.testing.assert_close(opt2.state_dict()["state"][0][k], v)


def test_line_charts(tmp_path):
    from PIL import Image

    from spo_core.plots import curves_from_records, line_chart, save_png, smooth, stack_charts

    img = line_chart({"loss": [0.7, 0.69, None, 0.5, float("nan"), 0.4], "margin": [0, 1, 2, 3, 4, 5]}, x=[1, 2, 3, 4, 5, 6],
                     title="SPO", size=(320, 200))
    assert img.size == (320, 200)
    px = img.load()
    colors = {px[x, y] for x in range(img.width) for y in range(img.height)}
    assert (31, 119, 180) in colors and (255, 127, 14) in colors  # both series drawn
    assert smooth([1, None, 3, 5], 2) == [1, 1, 3, 4]
    panel = stack_charts([img, line_chart({}, title="empty")])
    assert panel.height == 200 + 300 + 6
    records = [{"step": i, "loss": 1 / i, "score_margin": i} for i in range(1, 40)]
    save_png(curves_from_records(records, [["loss"], ["score_margin"]], smooth_window=10), tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").height > 400


def test_model_and_optimizer_sections_are_flattened(tmp_path):
    """[model] and [optimizer] share a setting's name; as tables they are sections, not values."""
    from spo_core.training.config import TrainConfig

    f = tmp_path / "run.json"
    f.write_text('{"model": {"model": "./sd15", "arch": "sd15"}, "optimizer": {"optimizer": "adamw", '
                 '"train_batch_size": 3}, "sampling": {"scorer_options": {"quality": 80}}}')
    cfg = TrainConfig.from_file(str(f))
    assert cfg.model == "./sd15" and cfg.arch == "sd15"
    assert cfg.optimizer == "adamw" and cfg.train_batch_size == 3
    assert cfg.scorer_options == {"quality": 80}
