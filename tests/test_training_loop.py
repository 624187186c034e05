"""The training loop on the tiny SD1.5/SDXL models: exact resume (also after a cancel in the
middle of a sampling round and after SIGKILL), NaN and out-of-memory handling, outputs that
load in diffusers, and every method running end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from spo_core.errors import Cancelled, ConfigError, OutputExistsError, TrainingDiverged
from spo_core.training import Trainer, TrainingOutOfMemory, inject_lora, train
from test_training_support import BrightnessScorer, lora_tensors, single_thread, spo_config, tiny_host, write_pair_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def host():
    with single_thread():
        yield tiny_host()


@pytest.fixture(scope="module")
def straight(host, tmp_path_factory):
    """6 SPO steps in one go (the reference of every resume test)."""
    out = tmp_path_factory.mktemp("straight")
    result = train(spo_config(out, max_steps=6, checkpoint_every=3), host, BrightnessScorer())
    return result


def _assert_same_lora(a: Path, b: Path, atol=1e-6):
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0, msg=k)


def test_resume_continues_exactly(host, straight, tmp_path):
    first = train(spo_config(tmp_path, max_steps=3), host, BrightnessScorer())
    assert first.steps == 3 and first.checkpoint.name == "step-000003"
    second = train(spo_config(tmp_path, max_steps=6, resume="auto"), host, BrightnessScorer())
    assert second.steps == 6
    _assert_same_lora(second.lora_path, straight.lora_path)
    # the log holds each step once, and the curves cover all six
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
             if "event" not in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in second.history] == [1, 2, 3, 4, 5, 6]
    losses_a = [r["loss"] for r in straight.history]
    losses_b = [r["loss"] for r in second.history]
    assert losses_b == pytest.approx(losses_a, abs=1e-6)


def test_cancel_inside_a_sampling_round_loses_nothing(host, straight, tmp_path):
    state = {"armed": False, "fire": False, "sampling_steps": 0}

    def progress(event):
        if event.stage == "training" and event.step == 2:
            state["armed"] = True
        if event.stage == "sampling" and state["armed"]:
            state["sampling_steps"] += 1
            state["fire"] = state["sampling_steps"] == 2  # halfway through the next round

    with pytest.raises(Cancelled, match=r"step \d of 6") as info:
        train(spo_config(tmp_path, max_steps=6), host, BrightnessScorer(), progress=progress, cancel=lambda: state["fire"])
    assert "resume" in str(info.value)
    step = int(str(info.value).split("step ")[1].split(" ")[0])
    assert step >= 2 and (tmp_path / "checkpoints" / f"step-{step:06d}").is_dir()
    assert (tmp_path / "spo_lora.safetensors").is_file()
    resumed = train(spo_config(tmp_path, max_steps=6, resume="auto"), host, BrightnessScorer())
    _assert_same_lora(resumed.lora_path, straight.lora_path)


def test_outputs_load_in_diffusers_with_the_trained_effect(host, straight):
    from spo_core.lora import read_lora
    from spo_core.testing import tiny_sd15_pipeline

    out = straight.output_dir
    assert straight.lora_path == out / "spo_lora.safetensors"
    lora = read_lora(straight.lora_path)
    meta = lora.metadata
    assert meta["spo_method"] == "spo" and meta["ss_network_dim"] == "4" and meta["ss_steps"] == "6"
    assert json.loads(meta["spo_config"])["k"] == 2
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "checkpoints" / "latest").read_text() == "step-000006"
    assert (out / "checkpoints" / "step-000006" / "lora.safetensors").is_file()
    # the trained factors, re-attached, and diffusers' loader give the same UNet
    unet = host.backend.unet
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([600.0, 20.0]), torch.randn(2, 77, 32, generator=g)
    net = inject_lora(unet, host.module_table(), "attn", rank=4)
    net.load_lora(straight.lora)
    with torch.no_grad():
        ours = unet(x, t, encoder_hidden_states=ctx).sample
    net.detach()
    pipe = tiny_sd15_pipeline()
    pipe.load_lora_weights(str(straight.lora_path))
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # the host is left as it was: no hooks, nothing trainable switched off for good
    assert not any(m._forward_hooks for m in unet.modules())


def test_validation_grid_and_progress_events(host, tmp_path):
    events = []
    result = train(spo_config(tmp_path, max_steps=2, validate_every=1, validation_prompts=["a lake"], validation_seeds=[1, 2],
                              lora_format="webui+diffusers"), host, BrightnessScorer(), progress=events.append)
    assert [p.name for p in result.lora_paths] == ["spo_lora.safetensors", "spo_lora_diffusers.safetensors"]
    assert any(k.endswith(".lora.down.weight") for k in lora_tensors(result.lora_paths[1]))
    assert [p.name for p in result.validation_paths] == ["step-000001.png", "step-000002.png"]
    from PIL import Image

    grid = Image.open(result.validation_paths[-1])
    assert grid.width > 256 and grid.height > 256  # two rows (seeds) of base | LoRA tiles
    stages = {e.stage for e in events}
    assert {"training", "sampling"} <= stages
    step_events = [e for e in events if e.stage == "training" and e.step == 1]
    assert step_events and {"loss", "score_margin", "implicit_acc", "ratio_win", "eta_s"} <= set(step_events[0].metrics)
    assert any(e.preview is not None for e in events)


def test_runs_inside_inference_mode_with_bf16_autocast(host, tmp_path):
    """ComfyUI runs node bodies under torch.inference_mode(); the trainer leaves it itself."""
    with torch.inference_mode():
        result = train(spo_config(tmp_path, max_steps=1, mixed_precision="bf16"), host, BrightnessScorer())
    assert result.steps == 1 and all(m.up.dtype == torch.float32 for m in result.lora.modules.values())
    assert any(float(m.up.abs().max()) > 0 for m in result.lora.modules.values())


def test_gradient_accumulation_equals_the_larger_batch(host, tmp_path):
    one = train(spo_config(tmp_path / "a", max_steps=2, train_batch_size=2, gradient_accumulation=1), host, BrightnessScorer())
    two = train(spo_config(tmp_path / "b", max_steps=2, train_batch_size=1, gradient_accumulation=2), host, BrightnessScorer())
    _assert_same_lora(one.lora_path, two.lora_path, atol=1e-5)
    assert one.history[-1]["loss"] == pytest.approx(two.history[-1]["loss"], abs=1e-5)


def test_8bit_adam_without_bitsandbytes_says_how_to_install(host, tmp_path):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    from spo_core.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="pip install bitsandbytes"):
        train(spo_config(tmp_path, max_steps=1, optimizer="adamw8bit"), host, BrightnessScorer())


def test_fresh_run_refuses_an_existing_output_and_resume_refuses_changed_settings(host, straight, tmp_path):
    with pytest.raises(OutputExistsError, match="resume"):
        train(spo_config(straight.output_dir, max_steps=1), host, BrightnessScorer())
    with pytest.raises(ConfigError, match="k: 2 -> 3"):
        train(spo_config(straight.output_dir, max_steps=7, k=3, resume="auto"), host, BrightnessScorer())
    # resume=auto with nothing to resume starts a new run
    result = train(spo_config(tmp_path, max_steps=1, resume="auto"), host, BrightnessScorer())
    assert result.steps == 1


class _Wrapped:
    """A host whose denoiser can be made to fail (NaN output or out of memory) on demand."""

    def __init__(self, host):
        self._host = host
        self.fail = None

    def __getattr__(self, name):
        return getattr(self._host, name)

    def denoiser(self, guidance_scale):
        inner = self._host.denoiser(guidance_scale)

        def den(x, sigma, cond):
            if self.fail == "nan" and torch.is_grad_enabled():  # the policy's training forward
                return inner(x, sigma, cond) * float("nan")
            if self.fail == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
            return inner(x, sigma, cond)

        return den


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(host, tmp_path):
    wrapped = _Wrapped(host)

    def progress(event):
        if event.stage == "training" and event.step == 2:
            wrapped.fail = "nan"

    with pytest.raises(TrainingDiverged) as info:
        train(spo_config(tmp_path, max_steps=5, checkpoint_every=2), wrapped, BrightnessScorer(), progress=progress)
    msg = str(info.value)
    assert "step 3" in msg and "step-000002" in msg and "learning_rate" in msg
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts == ["latest", "step-000002"]
    assert any(json.loads(line).get("event") == "diverged" for line in (tmp_path / "log.jsonl").read_text().splitlines())
    assert not any(m._forward_hooks for m in host.backend.unet.modules())


def test_out_of_memory_says_which_settings_to_lower(host, tmp_path):
    wrapped = _Wrapped(host)
    wrapped.fail = "oom"
    with pytest.raises(TrainingOutOfMemory) as info:
        train(spo_config(tmp_path, max_steps=2), wrapped, BrightnessScorer())
    msg = str(info.value)
    for word in ("train_batch_size", "sample_batch_size", "k (now 2)", "gradient_checkpointing", "fp16"):
        assert word in msg


def test_diffusion_dpo_from_a_pair_folder_with_cached_latents(host, tmp_path):
    write_pair_folder(tmp_path / "pairs", n=3)
    cfg = dict(method="diffusion_dpo", pairs=str(tmp_path / "pairs"), max_steps=2, output_dir=str(tmp_path / "run"),
               height=16, width=16, validate_every=-1, train_batch_size=2)
    from spo_core.training import TrainConfig

    result = train(TrainConfig(**cfg), host)
    assert result.steps == 2 and 0 <= result.metrics["implicit_acc"] <= 1
    caches = list((tmp_path / "run").glob("latents-*.safetensors"))
    assert len(caches) == 1
    cached = lora_tensors(caches[0])
    assert cached["win"].shape == (3, 4, 8, 8)
    calls = []
    wrapped = _Wrapped(host)
    wrapped.encode_images = lambda images: calls.append(images) or host.encode_images(images)
    train(TrainConfig(**{**cfg, "overwrite": True}), wrapped)
    assert calls == []  # the latents came from the cache


def test_ncp_ddpo_and_sdxl_multistep_run(host, tmp_path):
    from spo_core.scorers import load_scorer
    from spo_core.training import TrainConfig

    write_pair_folder(tmp_path / "pairs", n=2)
    ncp = train(TrainConfig(method="ncp_dpo", pairs=str(tmp_path / "pairs"), max_steps=1, output_dir=str(tmp_path / "ncp"),
                            height=16, width=16, validate_every=-1, rank=2), host)
    assert ncp.steps == 1 and "model_d_w" in ncp.metrics
    ddpo = train(TrainConfig(method="ddpo", prompt_list=["a", "b"], steps=3, max_steps=2, sample_batch_size=1,
                             ddpo_samples_per_prompt=2, train_batch_size=2, output_dir=str(tmp_path / "ddpo"), height=16,
                             width=16, validate_every=-1), host, load_scorer("jpeg_compressibility"))
    assert ddpo.steps == 2 and ddpo.metrics["reward"] < 0 and "approx_kl" in ddpo.metrics
    with single_thread():
        xl = tiny_host(sdxl=True)
    res = train(spo_config(tmp_path / "xl", max_steps=1, inner_steps=3, threshold=0.0, gradient_checkpointing=True), xl,
                BrightnessScorer())
    rounds = [json.loads(line) for line in (tmp_path / "xl" / "log.jsonl").read_text().splitlines()
              if json.loads(line).get("event") == "round"]
    # pools at t = 751 only; each segment's 4 transitions of both chains are pairs, 3 with separate parents
    assert rounds[0]["round_separate_parents"] == 3 * rounds[0]["local_pairs"] / 4
    from spo_core.lora import read_lora

    assert read_lora(res.lora_path).table.family == "sdxl"


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_training_support import BrightnessScorer, spo_config, tiny_host
    from spo_core.training import Trainer
    host = tiny_host()
    trainer = Trainer(spo_config({out!r}, max_steps=6, checkpoint_every=2), host, BrightnessScorer())
    def pre_hook(module, args):
        if trainer.step == 4:  # in the middle of step 5: checkpoint 4 is on disk
            os.kill(os.getpid(), signal.SIGKILL)
    host.backend.unet.register_forward_pre_hook(pre_hook)
    trainer.run()
""")


@pytest.mark.slow
def test_a_run_killed_mid_step_resumes_from_its_last_checkpoint(host, straight, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "run")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-000004"
    resumed = train(spo_config(tmp_path / "run", max_steps=6, checkpoint_every=2, resume="auto"), host, BrightnessScorer())
    _assert_same_lora(resumed.lora_path, straight.lora_path)
