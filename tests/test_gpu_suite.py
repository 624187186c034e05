"""bench/gpu_suite.py: its code paths run end to end on tiny models (the real run needs a CUDA GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spo_core.backends import DiffusersBackend
from spo_core.errors import ConfigError
from spo_core.testing import tiny_sd15_pipeline
from spo_core.training.config import GPU_TACTICS, PRESETS, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_runs_every_section_on_tiny_models(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--device", "cpu", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    sections = {r["section"] for r in record["rows"]}
    assert sections == {"training", "objectives", "sampling", "spm", "numerics", "flow"}
    bad = [r for r in record["rows"] if r["status"] != "ok"]
    assert not bad, bad
    names = [r["name"] for r in record["rows"]]
    for needle in ("SPO training sd15", "SPO training sdxl", "Diffusion-DPO", "NCP-DPO", "DDPO", "LPO", "LRM (no decode)",
                   "FK 4 particles", "autocast vs fp32", "SD3.5-medium transformer", "Flux transformer"):
        assert any(needle in n for n in names), needle
    # the trainer really stepped, and the latent scorer really skipped the decoder
    assert all(r["steps"] == 2 for r in record["rows"] if "steps" in r and r["section"] in ("training", "objectives"))
    lrm = next(r for r in record["rows"] if "LRM (no decode)" in r["name"])
    assert lrm["decodes"] == 0 and lrm["scorer_rows"] > 0
    assert record["targets"] and not any(t["enforced"] for t in record["targets"])  # --tiny reports, never enforces
    assert "targets:" in proc.stdout
    # flow: both transformers trained a LoRA step with checkpointing off and on, and sampled one step
    flow = [r for r in record["rows"] if r["section"] == "flow"]
    for model, rows in (("SD3.5-medium transformer", 4), ("Flux transformer", 2)):  # SD3 runs CFG: 2 rows a sample
        train = [r for r in flow if model in r["name"] and "train step" in r["name"]]
        assert {r["gradient_checkpointing"] for r in train} == {False, True}, model
        assert {("grad ckpt on" in r["name"]) for r in train} == {False, True}, model
        assert all(r["loss_finite"] and r["lora_modules"] > 0 and r["seconds_per_step"] > 0 for r in train), train
        assert all(r["transformer_rows"] == rows and r["lora_rank"] == 32 for r in train), train
        assert any(model in r["name"] and "sampling step" in r["name"] for r in flow), model


_REAL_FLOW = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import gpu_suite as gs
from spo_core.training import inject_lora
suite = gs.Suite(torch.device("meta"), tiny=False)
for family in ("sd3", "flux"):
    transformer = gs.flow_transformer(suite, family)
    host = gs.flow_host(transformer)
    table = host.module_table()
    net = inject_lora(host.lora_root(), table, "attn", 32, 64.0, "gaussian", 0, device="meta")
    x, cond = gs.flow_inputs(suite, host, 2, 8, 4)
    with torch.no_grad():
        x0 = host.denoiser(gs.FLOW_MODELS[family][2])(x, torch.full((2,), 0.8, device="meta"), cond)
    params = sum(p.numel() for p in transformer.parameters())
    dtypes = {str(p.dtype) for p in transformer.parameters()}
    print(family, table.arch, len(net.branches), len(net.missing), round(params / 1e9, 1), dtypes.pop(), len(dtypes),
          tuple(x.shape) == tuple(x0.shape), x.shape[1])
"""


@pytest.mark.slow
def test_flow_section_builds_the_real_size_transformers_with_the_shipped_tables():
    """The real run's wiring without a GPU: the transformers from the shipped configs on the meta device, in bf16,
    get the shipped LoRA tables (every attention projection found) and run a guided step at the right widths."""
    proc = subprocess.run([sys.executable, "-c", _REAL_FLOW, str(ROOT / "bench")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["sd3"] == "sd35-medium 243 0 2.2 torch.bfloat16 0 True 16"
    assert lines["flux"] == "flux-dev 266 0 11.9 torch.bfloat16 0 True 16"


def test_gpu_suite_refuses_cuda_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_gpu_tactics_are_valid_settings_of_their_presets():
    for preset, tactics in GPU_TACTICS.items():
        assert preset in PRESETS
        TrainConfig(**{**tactics, "method": PRESETS[preset]["method"]}).validate(require_data=False)


def test_offload_keeps_sampling_working_and_names_bad_parts():
    backend = DiffusersBackend(tiny_sd15_pipeline())
    plain = backend.sample(["a red circle"], steps=2, seed=0, height=32, width=32).images
    backend.offload(["text_encoders", "vae"])
    assert backend.offloaded == {"text_encoders", "vae"}
    assert backend.pipe.text_encoder in backend._offload_modules("text_encoders")
    assert backend._offload_modules("vae") == [backend.vae]
    again = backend.sample(["a red circle"], steps=2, seed=0, height=32, width=32).images
    assert torch.equal(plain, again)
    with pytest.raises(ConfigError, match="cannot offload unet"):
        backend.offload(["unet"])


def _print_config(capsys, *flags) -> tuple[str, str]:
    from spo_core.cli import main

    assert main(["train", "--model", "world", "--print-config", *flags]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_presets_bring_their_gpu_memory_settings_on_cuda_only(capsys):
    out, err = _print_config(capsys, "--preset", "spo-sdxl", "--device", "cuda")
    assert 'mixed_precision = "fp16"' in out and "gradient_checkpointing = true" in out and 'offload = "text_encoders"' in out
    assert "GPU memory settings of preset spo-sdxl: fp16 autocast, gradient checkpointing" in err
    out, err = _print_config(capsys, "--preset", "spo-sd15", "--device", "cpu")
    assert 'mixed_precision = "no"' in out and "gradient_checkpointing = false" in out and "GPU memory" not in err


def test_flags_and_files_override_the_gpu_memory_settings(capsys, tmp_path):
    out, err = _print_config(capsys, "--preset", "spo-sd15", "--device", "cuda", "--no-gradient-checkpointing",
                             "--mixed-precision", "bf16")
    assert "gradient_checkpointing = false" in out and 'mixed_precision = "bf16"' in out
    assert "GPU memory settings of preset spo-sd15: text encoders on the CPU between uses" in err
    cfg = tmp_path / "run.toml"
    cfg.write_text('offload = "none"\n')
    out, _ = _print_config(capsys, "--preset", "spo-sd15", "--device", "cuda", "--config", str(cfg))
    assert 'offload = "none"' in out and "gradient_checkpointing = true" in out
