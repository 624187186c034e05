"""Preference training on rectified-flow models: SPO on SDE transitions, Flow-GRPO (GRPO), DDPO, on tiny SD3 and
Flux transformers; Flow-GRPO's advantage and KL formulas; the trained LoRA file draws what the trainer drew;
GRPO on a UNet model; clear refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spo_core.errors import ConfigError
from spo_core.sampling.flow import FlowSchedule, sde_sigma_t
from spo_core.training import FlowTrainingHost, TrainConfig, Trainer, train
from spo_core.training.objectives import group_advantages, kl_divisor
from spo_core.training.objectives.base import encode_rows
from spo_core.training.objectives.ddpo import trajectory_log_probs
from spo_core.training.objectives.spo import pair_log_probs
from test_training_support import BrightnessScorer, single_thread, tiny_host

diffusers = pytest.importorskip("diffusers")


def _flow_grpo_tracker(prompts, rewards, global_std):
    """Flow-GRPO's flow_grpo/stat_tracking.py PerPromptStatTracker.update(type='grpo') on a fresh tracker."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards) * 0.0
    for prompt in np.unique(prompts):
        group = rewards[prompts == prompt]
        mean = np.mean(group, axis=0, keepdims=True)
        std = (np.std(rewards, axis=0, keepdims=True) if global_std else np.std(group, axis=0, keepdims=True)) + 1e-4
        advantages[prompts == prompt] = (group - mean) / std
    return advantages


def test_group_advantages_equal_flow_grpos_tracker():
    rng = np.random.default_rng(0)
    prompts = [p for p in ("a", "b", "c") for _ in range(5)]
    rewards = rng.normal(size=15) * np.repeat([1.0, 3.0, 0.1], 5)
    for global_std in (True, False):
        np.testing.assert_allclose(group_advantages(prompts, rewards, global_std),
                                   _flow_grpo_tracker(prompts, rewards, global_std), rtol=1e-12, atol=1e-12)
    tied = group_advantages(["a", "a", "b", "b"], [1.0, 1.0, 0.0, 2.0])
    assert tied[0] == tied[1] == 0.0 and tied[2] < 0 < tied[3]


def test_kl_divisor_is_flow_grpos_std_dev_t():
    """The SDE step returns std = sigma_t sqrt(-dt); Flow-GRPO divides the KL by 2 sigma_t^2 (no dt)."""
    sigma, sigma_next = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3])
    sde = FlowSchedule(step="sde")
    std = torch.tensor([float(sde.ancestral_step(torch.zeros(1), torch.zeros(1), s, n, 0.7)[1])
                        for s, n in zip(sigma.tolist(), sigma_next.tolist())])
    want = torch.tensor([2 * sde_sigma_t(s, 0.7, n) ** 2 for s, n in zip(sigma.tolist(), sigma_next.tolist())])
    torch.testing.assert_close(kl_divisor(sde, std, sigma, sigma_next), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(kl_divisor(FlowSchedule(step="cps"), std, sigma, sigma_next), 2 * std ** 2)


@pytest.fixture(scope="module")
def sd3_host():
    from spo_core.backends.flow_backend import FlowBackend
    from spo_core.testing import tiny_sd3_pipeline

    return FlowTrainingHost(FlowBackend.from_pipeline(tiny_sd3_pipeline()), model_name="tiny-sd3")


def _cfg(out, **kw):
    base = dict(prompt_list=["a red apple", "a blue car"], steps=4, k=2, sample_batch_size=2, train_batch_size=2,
                group_size=2, max_steps=2, checkpoint_every=0, output_dir=str(out), height=32, width=32,
                validate_every=-1, learning_rate=1e-3, seed=3, threshold=0.0, max_train_t=1000.0, rank=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("step", ["sde", "cps"])
def test_first_grpo_batch_recomputes_the_sampling_log_probs(sd3_host, tmp_path, step):
    """Before any update the policy is the sampling policy: every recomputed log-prob equals the recorded one
    (ratio 1), over every step of the flow schedule, the sigma = 1 guard of the SDE step included."""
    with single_thread():
        trainer = Trainer(_cfg(tmp_path, method="grpo", flow_step=step, group_size=3), sd3_host, BrightnessScorer())
        try:
            trainer._setup()
            assert trainer.schedule.step == step and float(trainer.sigmas[0]) == 1.0
            batch = trainer.source.next_batch(4).items
            cond = encode_rows(trainer, [t.prompt for t in batch])
            for j in range(batch[0].x.shape[0]):
                with torch.no_grad():
                    out = trajectory_log_probs(trainer, batch, [j] * len(batch), cond, reference=True)
                old = torch.stack([t.logp_old[j] for t in batch])
                torch.testing.assert_close(out["logp"].cpu(), old, rtol=0, atol=2e-5)
                torch.testing.assert_close(out["mean"], out["mean_ref"], rtol=0, atol=1e-6)  # LoRA up = 0 at init
        finally:
            trainer.close()


def test_spo_pairs_on_a_flow_model_start_at_ratio_one(sd3_host, tmp_path):
    with single_thread():
        trainer = Trainer(_cfg(tmp_path), sd3_host, BrightnessScorer())
        try:
            trainer._setup()
            pairs = trainer.source.next_batch(2).items
            assert all(0 < p.sigma <= 1 and p.eta == 0.7 for p in pairs)
            cond = encode_rows(trainer, [p.prompt for p in pairs])
            with torch.no_grad():
                lp = pair_log_probs(trainer.denoiser_cfg, trainer.network, pairs, cond, trainer.device,
                                    schedule=trainer.schedule)
            torch.testing.assert_close(lp["logp_w"], lp["ref_logp_w"], rtol=0, atol=1e-6)
            assert bool(torch.isfinite(lp["logp_l"]).all())
        finally:
            trainer.close()


class _Static:
    """A network stand-in with no LoRA: sample_images on a merged model."""

    def scaled(self, multiplier):
        import contextlib

        return contextlib.nullcontext()


@pytest.mark.parametrize("method", ["spo", "grpo", "ddpo"])
def test_flow_training_writes_a_lora_that_draws_what_the_trainer_drew(sd3_host, tmp_path, method):
    """Two optimizer steps; the kohya file, merged into a fresh copy of the transformer, samples exactly the
    images the trainer's validation samples with its hooks (the Euler ODE at the same seeds)."""
    from spo_core.backends.flow_backend import FlowBackend
    from spo_core.lora import merge_into_modules, read_lora
    from spo_core.testing import tiny_sd3_pipeline
    from spo_core.training.validation import sample_images

    with single_thread():
        result = train(_cfg(tmp_path, method=method, learning_rate=5e-2), sd3_host, BrightnessScorer(), keep_network=True)
        try:
            assert result.steps == 2 and math.isfinite(result.metrics["loss"])
            kw = dict(prompts=["a red apple"], seeds=[0, 1], steps=4, guidance_scale=5.0, multiplier=1.0, height=32, width=32)
            hooked = sample_images(sd3_host, result.network, **kw)
            base = sample_images(sd3_host, result.network, **{**kw, "multiplier": 0.0})
        finally:
            result.network.detach()
    assert (hooked - base).abs().max() > 1e-4  # the LoRA changes the pictures
    fresh = FlowTrainingHost(FlowBackend.from_pipeline(tiny_sd3_pipeline()))
    lora = read_lora(result.lora_path, arch=fresh.module_table())
    assert len(lora.modules) == len(result.network.branches) and not lora.unmatched  # every trained module, read back
    from safetensors import safe_open

    with safe_open(str(result.lora_path), "pt") as f:  # kohya's MMDiT names, q/k/v fused as ComfyUI's qkv
        assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv.") for k in f.keys())
    merge_into_modules({"transformer": fresh.backend.transformer}, lora, 1.0)
    merged = sample_images(fresh, _Static(), **kw)
    torch.testing.assert_close(merged, hooked, rtol=0, atol=2e-5)


def test_grpo_and_spo_train_a_flux_transformer_with_distilled_guidance(tmp_path):
    from spo_core.backends.flow_backend import FlowBackend
    from spo_core.testing import tiny_flux_transformer, tiny_vae

    g = torch.Generator().manual_seed(0)
    emb, pooled = torch.randn(1, 7, 32, generator=g), torch.randn(1, 32, generator=g)
    be = FlowBackend(tiny_flux_transformer(), tiny_vae(1), lambda p: (emb.expand(len(p), -1, -1), pooled.expand(len(p), -1)),
                     dynamic_shift={"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
                                    "max_shift": 1.15}, arch="flux")
    host = FlowTrainingHost(be, model_name="tiny-flux")
    with single_thread():
        for method in ("grpo", "spo"):
            result = train(_cfg(tmp_path / method, method=method, max_steps=1), host, BrightnessScorer())
            assert result.steps == 1 and math.isfinite(result.metrics["loss"])
    trainer_sigmas = host.training_sigmas(4, 32, 32)
    torch.testing.assert_close(trainer_sigmas, be.default_sigmas(4, 32, 32))  # Flux's mu for this size
    assert float(trainer_sigmas[1]) != pytest.approx(0.75)  # shifted, not the plain linspace


def test_grpo_on_a_unet_model_starts_at_ratio_one(tmp_path):
    host = tiny_host()
    with single_thread():
        trainer = Trainer(TrainConfig(method="grpo", prompt_list=["a cat", "a dog"], steps=4, sample_batch_size=2,
                                      group_size=2, train_batch_size=4, max_steps=1, output_dir=str(tmp_path),
                                      height=16, width=16, validate_every=-1, checkpoint_every=0), host, BrightnessScorer())
        try:
            trainer._setup()
            assert trainer.eta == 1.0 and not getattr(trainer.schedule, "is_flow", False)
            batch = trainer.source.next_batch(4).items
            cond = encode_rows(trainer, [t.prompt for t in batch])
            with torch.no_grad():
                out = trajectory_log_probs(trainer, batch, [0] * len(batch), cond)
            torch.testing.assert_close(out["logp"].cpu(), torch.stack([t.logp_old[0] for t in batch]), rtol=0, atol=2e-5)
        finally:
            trainer.close()
        result = train(TrainConfig(method="grpo", prompt_list=["a cat", "a dog"], steps=4, sample_batch_size=2, group_size=2,
                                   train_batch_size=4, max_steps=1, output_dir=str(tmp_path / "run"), height=16, width=16,
                                   validate_every=-1, checkpoint_every=0), host, BrightnessScorer())
    assert result.steps == 1 and "kl" in result.metrics


@pytest.mark.parametrize("method,match", [("diffusion_dpo", "does not train rectified-flow"),
                                          ("lpo", "does not train rectified-flow")])
def test_methods_that_need_a_unet_refuse_flow_models(sd3_host, tmp_path, method, match):
    cfg = _cfg(tmp_path, method=method, pairs="unused.jsonl")
    flags = [p.requires_grad for p in sd3_host.backend.transformer.parameters()]
    with pytest.raises(ConfigError, match=match):
        train(cfg, sd3_host, BrightnessScorer())
    assert [p.requires_grad for p in sd3_host.backend.transformer.parameters()] == flags  # the host is left as it was


def test_a_fused_kohya_file_of_split_trained_factors_reads_back_at_their_own_rank(sd3_host, tmp_path):
    """The trainer's split q/k/v factors go to the kohya file fused (block-diagonal, rank 3r); reading it gives
    every part back its own rank-r factors, so init_lora / resume load it into a rank-r network again, and a
    part whose factor stayed zero (the last block's unused context query) keeps its place."""
    from spo_core.lora import read_lora
    from spo_core.lora.write import save_lora
    from spo_core.training.lora_network import inject_lora

    table = sd3_host.module_table()
    net = inject_lora(sd3_host.lora_root(), table, "attn", 2, 4.0, "gaussian", 0)
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for slot, branch in net.branches.items():
                if not slot.endswith("1__attn__add_q_proj"):
                    branch.up.copy_(torch.randn(branch.up.shape, generator=g))
        save_lora(net.to_lora(), tmp_path / "l.safetensors", fmt="webui")
        back = read_lora(tmp_path / "l.safetensors", arch=table)
        assert {m.rank for m in back.modules.values()} == {2} and len(back.modules) == len(net.branches)
        for key, m in net.to_lora().modules.items():
            torch.testing.assert_close(back.modules[key].delta(), m.delta(), rtol=0, atol=1e-6)
        assert net.load_lora(back) == len(net.branches)
    finally:
        net.detach()


@pytest.mark.parametrize("method", ["spo", "grpo"])
def test_a_resumed_flow_run_continues_exactly(sd3_host, tmp_path, method):
    """Two steps straight equal one step, a stop, and a resume to two (the SDE rollouts' generators, the GRPO
    buffer and its advantages, the optimizer: all in the checkpoint)."""
    from test_training_support import lora_tensors

    with single_thread():
        straight = train(_cfg(tmp_path / "a", method=method, group_size=2, train_batch_size=2), sd3_host, BrightnessScorer())
        train(_cfg(tmp_path / "b", method=method, group_size=2, train_batch_size=2, max_steps=1), sd3_host, BrightnessScorer())
        resumed = train(_cfg(tmp_path / "b", method=method, group_size=2, train_batch_size=2, resume="auto"), sd3_host,
                        BrightnessScorer())
    assert resumed.steps == straight.steps == 2
    a, b = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


class _Constant:
    name = "constant"
    needs_prompt = False

    def score(self, images, prompts=None, timesteps=None):
        return torch.zeros(images.shape[0])


def test_grpo_with_a_scorer_that_ties_every_group_stops_with_what_to_change(sd3_host, tmp_path):
    with single_thread():
        trainer = Trainer(_cfg(tmp_path, method="grpo"), sd3_host, _Constant())
        trainer.max_empty_rounds = 2
        try:
            trainer._setup()
            with pytest.raises(Exception, match="every group's rewards tied.*larger group_size"):
                trainer.source.next_batch(2)
        finally:
            trainer.close()


def test_spo_train_on_world_flow_picks_its_preset_and_refuses_offload(tmp_path, capsys):
    from spo_core.cli import main

    assert main(["train", "--model", "world-flow", "--method", "grpo", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert 'preset = "grpo-world-flow"' in text and 'flow_step = "sde"' in text and "group_size = 8" in text
    assert main(["train", "--model", "world-flow", "--offload", "vae", "--max-steps", "1", "--output-dir",
                 str(tmp_path), "--no-progress"]) == 2
    assert "--offload vae is for SD1.5/SDXL models" in capsys.readouterr().err
    assert main(["train", "--model", "world-flow", "--method", "lpo", "--print-config"]) == 2
    assert "does not train the world's rectified-flow model" in capsys.readouterr().err


def test_spo_train_on_an_sd3_folder_then_spo_sample_loads_the_lora(tmp_path, capsys):
    """The command line end to end on a diffusers SD3 folder: GRPO with the grpo-sd3 preset (sizes cut down by flags),
    then `spo sample --lora` merges the written kohya file into the transformer."""
    from spo_core.cli import main
    from spo_core.testing import tiny_sd3_pipeline

    folder = tmp_path / "sd3"
    tiny_sd3_pipeline().save_pretrained(folder)
    out = tmp_path / "run"
    with single_thread():
        assert main(["train", "--model", str(folder), "--preset", "grpo-sd3", "--prompt-list", "a red apple", "a blue car",
                     "--scorer", "jpeg_compressibility", "--height", "32", "--width", "32", "--steps", "4",
                     "--group-size", "2", "--sample-batch-size", "2", "--train-batch-size", "4",
                     "--gradient-accumulation", "1", "--rank", "2", "--max-steps", "1", "--output-dir", str(out),
                     "--validate-every", "-1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "steps: 1" in text
    lora = out / "spo_lora.safetensors"
    assert lora.is_file()
    assert main(["sample", "--model", str(folder), "--prompt", "a red apple", "--steps", "4", "--k", "1", "--lora", str(lora),
                 "--out", str(tmp_path / "img.png"), "--no-progress"]) == 0
    assert (tmp_path / "img.png").is_file()
