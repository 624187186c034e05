"""One prepared GPU check (issue 18): training memory and speed, sampling cost, mixed-precision numerics.

    python bench/gpu_suite.py                       # one CUDA GPU, real sizes (random weights), <= 8 min
    python bench/gpu_suite.py --device cpu --tiny   # the same code paths on tiny models, < 60 s (a default test)
    python bench/gpu_suite.py --sections training,numerics   # a part of it

Everything is built from the configs in spo_core/configs with random weights; nothing is downloaded.
Sections, each a list of rows (an out-of-memory is caught and kept as a row):

- training: SPO at SD1.5 512 px rank 4 and SDXL 1024 px rank 64 (SDXL's multi-step segments, so its
  pairs have separate parents): seconds per pair of the pair update (policy and reference passes,
  loss, backward, AdamW) and its peak allocated / reserved memory, for fp16 and bf16 (weights and
  autocast) with and without gradient checkpointing; then two trainer steps of the preset as a user
  runs it (sampling rounds with an SPM of CLIP-H size and the full VAE, pair updates), with the memory
  tactics the preset's GPU setting uses (gradient checkpointing, text encoders kept on the CPU, 8-bit
  AdamW when bitsandbytes is present; attention is PyTorch's SDPA, diffusers' default): peak memory
  against the targets.
- objectives: a Diffusion-DPO, NCP-DPO, DDPO and LPO trainer step at SD1.5 512 px, same figures.
- sampling: 20 steps at SD1.5 512 px: plain vs the per-step resampler k = 2/4/8 with the full VAE, a
  TAESD-size decoder and the linear RGB decoder, scored by the SPM (CLIP-H size), and the latent reward
  model; FK steering with N = 4/8 particles. Wall time over plain sampling.
- spm: the SPM's fp16 image forward against a plain CLIP-H forward of the same weights.
- numerics: the transition log-probability, SPO's loss and one LoRA gradient under fp16 / bf16
  autocast against fp32 on the same inputs (max relative error), and the share of pair members whose
  clamped ratio decision (below / inside / above 1 +- eps) agrees with fp32.
- flow: real-size rectified-flow transformers, SD3.5-medium (2.2B, real CFG) and Flux-dev size (11.9B,
  distilled guidance 3.5), bf16 weights built on the GPU from the shipped configs (a row: load time and
  the weights' memory), a rank 32 / alpha 64 LoRA on every attention projection (the pack's LoRA engine
  and shipped module tables). One Flow-GRPO-style training micro-step at 512 px, batch 2 (SD3: 4
  transformer rows with CFG; Flux: 2): the reference pass (LoRA off, no grad), the policy pass under bf16
  autocast, the SDE step's mean and transition log-probability, loss, backward, AdamW; seconds per step
  and peak allocated / reserved memory with gradient checkpointing off and on. Then one sampling step
  (batch 1, no grad, LoRA attached): seconds per step and peak memory. --skip-flux leaves Flux out.

Prints one table, writes bench/results/gpu_suite.json (device name, torch/CUDA versions) and exits
non-zero when a target fails (on a GPU; --tiny reports the targets without enforcing them):
SD1.5 SPO training peak <= 10 GB, SDXL <= 24 GB, resampler k = 4 with a cheap decoder <= 2.5x plain,
ratio decisions agreeing with fp32 on >= 99% of members.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GB = 2 ** 30


class Suite:
    """Rows, timing and memory of one run."""

    def __init__(self, device: torch.device, tiny: bool):
        self.device, self.tiny = device, tiny
        self.rows: list[dict] = []
        self.targets: list[dict] = []

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def measure(self, section: str, name: str, **fields):
        """Time the block and record its peak memory; an out-of-memory becomes a row, not a crash."""
        row = {"section": section, "name": name, **fields, "status": "ok"}
        if self.cuda:
            self.sync()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            yield row
            self.sync()
        except Exception as exc:  # noqa: BLE001 - every failure is a row
            oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
            row["status"] = "out of memory" if oom else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            if not oom:
                traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - t0, 3)
        if self.cuda:
            row["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated(self.device) / GB, 3)
            row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(self.device) / GB, 3)
            torch.cuda.empty_cache()
        self.rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items() if k != "section"), flush=True)

    def target(self, name: str, value, limit, ok: bool | None, unit: str = "") -> None:
        self.targets.append({"target": name, "value": value, "limit": limit, "unit": unit,
                             "met": ok, "enforced": not self.tiny and ok is not None})


# -- models -----------------------------------------------------------------------------------------

def pipeline(suite: Suite, arch: str, dtype: torch.dtype):
    from spo_core.testing import real_size_pipeline, tiny_sd15_pipeline, tiny_sdxl_pipeline

    if suite.tiny:
        pipe = tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()
        return pipe.to(device=suite.device, dtype=dtype)
    return real_size_pipeline(arch, suite.device, dtype)


def resolution(suite: Suite, arch: str) -> int:
    if suite.tiny:
        return 32 if arch == "sd15" else 64
    return 1024 if arch == "sdxl" else 512


def spm_scorer(suite: Suite, dtype: torch.dtype):
    """An SPM of CLIP-H/14 size (random weights, finite activations), or a tiny one with --tiny."""
    from scorer_bench import randomize_

    from spo_core.scorers.clip_torch import clip_h14_config
    from spo_core.scorers.spm import SPMScorer
    from spo_core.scorers.spm_model import StepAwarePreferenceModel
    from spo_core.world.train_spm import SPM_CONFIG

    cfg = SPM_CONFIG if suite.tiny else clip_h14_config()
    with torch.device("meta"):
        model = StepAwarePreferenceModel(cfg)
    model = model.to_empty(device=suite.device)
    randomize_(model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    return SPMScorer(model.eval().requires_grad_(False), device=suite.device, dtype=dtype)


def lrm_scorer(suite: Suite, pipe, dtype: torch.dtype):
    from spo_core.scorers.lrm import LRMScorer
    from spo_core.scorers.lrm_model import lrm_from_diffusion_model

    te2 = getattr(pipe, "text_encoder_2", None)
    model = lrm_from_diffusion_model(pipe.unet, pipe.text_encoder, te2)
    return LRMScorer(model, device=suite.device, dtype=dtype)


def taesd_size_decoder(suite: Suite, dtype: torch.dtype):
    """A random AutoencoderTiny of TAESD's size (what ComfyUI's taesd / diffusers' madebyollin/taesd are)."""
    import diffusers

    from spo_core.backends.diffusers_backend import TinyVAEDecoder

    with torch.device(suite.device):
        vae = diffusers.AutoencoderTiny() if not suite.tiny else diffusers.AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8))
    return TinyVAEDecoder(vae.to(dtype).eval())


# -- training -----------------------------------------------------------------------------------------

def pair_update_rows(suite: Suite, arch: str, rank: int, pairs: int) -> None:
    """SPO's pair update in isolation (train_bench's measure): fp16/bf16 x checkpointing."""
    from train_bench import make_pairs, random_cond

    from spo_core.backends import DiffusersBackend
    from spo_core.training import DiffusersTrainingHost, inject_lora
    from spo_core.training.objectives import pair_log_probs, spo_loss

    res = resolution(suite, arch)
    for precision in ("fp16", "bf16") if not suite.tiny else ("fp32",):
        dtype = DTYPES[precision]
        try:
            backend = DiffusersBackend(pipeline(suite, arch, dtype))
        except Exception as exc:  # noqa: BLE001
            suite.rows.append({"section": "training", "name": f"{arch} load ({precision})", "status": f"error: {exc}"})
            continue
        host = DiffusersTrainingHost(backend)
        items = make_pairs(backend, pairs, res // backend.vae_scale_factor)
        if arch == "sdxl":  # multi-step segments: winner and loser have their own parents
            for p in items:
                p.x_t_lose = p.x_t + 0.01 * torch.randn_like(p.x_t)
        cond = random_cond(backend, pairs, suite.device, dtype, res)
        for gc in (False, True):
            name = f"SPO pair update {arch} {res}px rank {rank}, {precision}{', grad ckpt' if gc else ''}"
            net = None
            with suite.measure("training", name, arch=arch, precision=precision, gradient_checkpointing=gc,
                               pairs=pairs) as row:
                net = inject_lora(host.lora_root(), host.module_table(), "attn", rank=rank, device=suite.device)
                for p in backend.unet.parameters():
                    p.requires_grad_(False)
                if gc:
                    host.set_gradient_checkpointing(True, net.checkpoint_function())
                opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
                den = host.denoiser(5.0)
                autocast = (lambda: torch.autocast(suite.device.type, dtype=dtype)) if dtype != torch.float32 \
                    else contextlib.nullcontext
                times = []
                for i in range(3 if not suite.tiny else 2):
                    suite.sync()
                    t0 = time.perf_counter()
                    lp = pair_log_probs(den, net, items, cond, suite.device, autocast)
                    loss, _ = spo_loss(lp["logp_w"], lp["logp_l"], lp["ref_logp_w"], lp["ref_logp_l"], 10.0, 0.1)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    suite.sync()
                    times.append(time.perf_counter() - t0)
                row["seconds_per_pair"] = round(min(times[1:]) / pairs, 4)
            if net is not None:
                net.detach()
            host.set_gradient_checkpointing(False)
        del backend, host
        if suite.cuda:
            torch.cuda.empty_cache()


def trainer_run(suite: Suite, method: str, arch: str, preset: str | None, overrides: dict, scorer_fn=None, pairs=None,
                tactics: dict | None = None, name: str | None = None) -> dict | None:
    """Two optimizer steps through the trainer, as `spo train` runs them, on a random real-size model."""
    from spo_core.backends import DiffusersBackend
    from spo_core.training import DiffusersTrainingHost, TrainConfig, train
    from spo_core.training.config import apply_preset

    tactics = tactics or {}
    precision = tactics.get("mixed_precision", "fp16") if suite.cuda else "no"  # no fp16 kernels on a CPU
    dtype = DTYPES.get(precision, torch.float32)
    res = resolution(suite, arch)
    label = name or f"{method} trainer step {arch} {res}px"
    out = None
    with suite.measure("training" if method == "spo" else "objectives", label, arch=arch, method=method,
                       precision=precision, **{k: v for k, v in tactics.items() if k != "mixed_precision"}) as row:
        backend = DiffusersBackend(pipeline(suite, arch, dtype))
        if tactics.get("offload"):
            backend.offload(tactics["offload"].split("+"))
        host = DiffusersTrainingHost(backend)
        base = apply_preset(TrainConfig(), preset) if preset else TrainConfig(method=method)
        with tempfile.TemporaryDirectory() as tmp:
            # threshold 0: a random-weight scorer's gaps are tiny, and every pool must make a pair to measure
            cfg = dict(output_dir=tmp, max_steps=2, checkpoint_every=0, validate_every=-1, height=res, width=res,
                       threshold=0.0, threshold_max=None, auto_threshold=False,
                       mixed_precision=precision if suite.cuda else "no",
                       gradient_checkpointing=bool(tactics.get("gradient_checkpointing")),
                       optimizer=tactics.get("optimizer", "adamw"), prompt_list=["a photo of a lake", "a red car",
                                                                                 "a cat on a sofa", "an old castle"])
            cfg.update(overrides)
            import dataclasses

            config = dataclasses.replace(base, **{**cfg, "method": method})
            step_times: list[float] = []

            def progress(event):
                if event.stage == "training":
                    step_times.append(time.perf_counter())

            scorer = scorer_fn(backend) if scorer_fn else None
            result = train(config, host, scorer, pairs=pairs, progress=progress)
            row["steps"] = result.steps
            if len(step_times) >= 2:
                row["seconds_per_step"] = round(step_times[-1] - step_times[-2], 3)
            out = row
        del backend, host
    return out


def training_section(suite: Suite, args) -> None:
    pairs = 2 if suite.tiny else 4
    pair_update_rows(suite, "sd15", 4, pairs)
    if not args.skip_sdxl:
        pair_update_rows(suite, "sdxl", 64 if not suite.tiny else 4, 2)
    has_bnb = _has("bitsandbytes")
    small = dict(sample_batch_size=2, train_batch_size=2) if suite.tiny else {}
    from spo_core.training.config import GPU_TACTICS

    for arch, preset, limit in (("sd15", "spo-sd15", 10.0), ("sdxl", "spo-sdxl", 24.0)):
        if arch == "sdxl" and args.skip_sdxl:
            continue
        tactics = dict(GPU_TACTICS[preset])
        if tactics.get("optimizer") == "adamw8bit" and not has_bnb:
            tactics["optimizer"] = "adamw"
        row = trainer_run(suite, "spo", arch, preset, {**small, "steps": 20 if not suite.tiny else 4},
                          scorer_fn=lambda be: spm_scorer(suite, be.dtype), tactics=tactics,
                          name=f"SPO training {arch} ({preset}, preset tactics)")
        peak = row.get("peak_allocated_gb") if row else None
        ok = None if not suite.cuda or peak is None else (row["status"] == "ok" and peak <= limit)
        suite.target(f"{arch} SPO training peak memory ({', '.join(f'{k} {v}' for k, v in tactics.items())})", peak, limit,
                     ok, "GB")


def objectives_section(suite: Suite, args) -> None:
    from spo_core.training.data import PairRecord

    small = dict(train_batch_size=2, sample_batch_size=2) if suite.tiny else dict(train_batch_size=4, sample_batch_size=4)
    tactics = {"mixed_precision": "fp16" if suite.cuda else "no", "gradient_checkpointing": True}
    res = resolution(suite, "sd15")
    pairs = [PairRecord(f"prompt {i}", _png(res, i), _png(res, 100 + i)) for i in range(8)]
    trainer_run(suite, "diffusion_dpo", "sd15", "diffusion-dpo", small, pairs=pairs, tactics=tactics,
                name=f"Diffusion-DPO step sd15 {res}px")
    trainer_run(suite, "ncp_dpo", "sd15", "ncp-dpo", small, pairs=pairs, tactics=tactics, name=f"NCP-DPO step sd15 {res}px")
    trainer_run(suite, "ddpo", "sd15", "ddpo", {**small, "steps": 20 if not suite.tiny else 4}, tactics=tactics,
                scorer_fn=lambda be: _jpeg(), name=f"DDPO step sd15 {res}px (20 sampling steps)")
    trainer_run(suite, "lpo", "sd15", "lpo-sd15", {**small, "steps": 20 if not suite.tiny else 4}, tactics=tactics,
                scorer_fn=lambda be: lrm_scorer(suite, be.pipe, be.dtype), name=f"LPO step sd15 {res}px")


def _png(size: int, seed: int) -> bytes:
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg():
    from spo_core.scorers import load_scorer

    return load_scorer("jpeg_compressibility")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- sampling -------------------------------------------------------------------------------------------

def sampling_section(suite: Suite, args) -> None:
    from spo_core.backends import DiffusersBackend
    from spo_core.sampling import ResamplerConfig

    dtype = torch.float16 if suite.cuda else torch.float32
    backend = DiffusersBackend(pipeline(suite, "sd15", dtype))
    res = resolution(suite, "sd15")
    spm = spm_scorer(suite, dtype)
    lrm = lrm_scorer(suite, backend.pipe, dtype)
    decoders = {"vae": backend.decode, "taesd-size": taesd_size_decoder(suite, dtype), "rgb": backend.approx_decoder()}
    prompt = ["a photo of a lake at dawn"]

    steps = 20 if not suite.tiny else 4

    def run(name: str, **kw) -> dict:
        with suite.measure("sampling", name, resolution=res, steps=steps) as row:
            backend.sample(prompt, steps=steps, seed=0, height=res, width=res, **kw)  # warm-up
            suite.sync()
            t0 = time.perf_counter()
            out = backend.sample(prompt, steps=steps, seed=0, height=res, width=res, **kw)
            suite.sync()
            row["sample_seconds"] = round(time.perf_counter() - t0, 3)
            r = out.result
            row.update(evaluations=r.evaluations, decodes=r.decodes, scorer_rows=r.scorer_rows)
        return row

    plain = run(f"plain {steps} steps")
    base_s = plain.get("sample_seconds") or float("nan")
    cheap_k4 = []
    for k in (2, 4, 8) if not suite.tiny else (4,):
        for dec_name, dec in decoders.items():
            row = run(f"resampler k={k}, SPM-H, {dec_name} decoder", scorer=spm, decode=dec,
                      config=ResamplerConfig(k=k, window=(0, 999)))
            row["ratio_to_plain"] = round(row.get("sample_seconds", float("nan")) / base_s, 3)
            if k == 4 and dec_name != "vae":
                cheap_k4.append(row["ratio_to_plain"])
        row = run(f"resampler k={k}, LRM (no decode)", scorer=lrm, config=ResamplerConfig(k=k, window=(0, 999)))
        row["ratio_to_plain"] = round(row.get("sample_seconds", float("nan")) / base_s, 3)
    for n in (4, 8) if not suite.tiny else (4,):
        row = run(f"FK {n} particles, SPM-H, rgb decoder", scorer=spm, decode=decoders["rgb"],
                  config=ResamplerConfig(k=n, policy="fk", window=(0, 999), score_every=5 if not suite.tiny else 2,
                                         lam=10.0))
        row["ratio_to_plain"] = round(row.get("sample_seconds", float("nan")) / base_s, 3)
    best = min(cheap_k4) if cheap_k4 else None
    suite.target("resampler k=4 with a cheap decoder (TAESD-size or rgb), wall over plain", best, 2.5,
                 None if best is None or not suite.cuda else best <= 2.5, "x")


def spm_section(suite: Suite, args) -> None:
    from scorer_bench import build_ours

    from spo_core.scorers.clip_torch import clip_h14_config
    from spo_core.world.train_spm import SPM_CONFIG

    dtype = torch.float16 if suite.cuda else torch.float32
    cfg = SPM_CONFIG if suite.tiny else clip_h14_config()
    model = build_ours(cfg, suite.device, dtype)
    size = cfg.vision.image_size
    pixels = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0)).to(suite.device, dtype)
    t = torch.linspace(0, 999, 8).round().to(suite.device)
    times = {}
    for name, fn in (("spm", lambda: model.image_features(pixels, t)),
                     ("plain CLIP-H", lambda: model.visual_projection(model.vision_model(pixels)))):
        with suite.measure("spm", f"{name} image forward, batch 8, {'fp16' if suite.cuda else 'fp32'}") as row:
            with torch.no_grad():
                fn()
                best = math.inf
                for _ in range(3):
                    suite.sync()
                    t0 = time.perf_counter()
                    fn()
                    suite.sync()
                    best = min(best, time.perf_counter() - t0)
            row["seconds_per_batch"] = round(best, 4)
            times[name] = best
    if len(times) == 2:
        suite.rows[-1]["spm_over_plain"] = round(times["spm"] / times["plain CLIP-H"], 3)


# -- numerics ---------------------------------------------------------------------------------------------

def numerics_section(suite: Suite, args) -> None:
    """fp16 / bf16 autocast against fp32 on the same weights and inputs."""
    from train_bench import make_pairs, random_cond

    from spo_core.backends import DiffusersBackend
    from spo_core.training import DiffusersTrainingHost, inject_lora
    from spo_core.training.objectives import pair_log_probs, spo_loss

    backend = DiffusersBackend(pipeline(suite, "sd15", torch.float32))
    host = DiffusersTrainingHost(backend)
    res = resolution(suite, "sd15")
    n = 8 if suite.tiny else 16
    items = make_pairs(backend, n, res // backend.vae_scale_factor, seed=3)
    cond = random_cond(backend, n, suite.device, torch.float32, res)
    net = inject_lora(host.lora_root(), host.module_table(), "attn", rank=4, device=suite.device)
    with torch.no_grad():  # a LoRA that moves the policy: ratios spread around the clamp edges
        g = torch.Generator().manual_seed(0)
        for b in net.branches.values():
            b.up.copy_(torch.randn(b.up.shape, generator=g) * (0.02 if not suite.tiny else 0.2))
    for p in backend.unet.parameters():
        p.requires_grad_(False)
    den = host.denoiser(5.0)

    def compute(dtype):
        autocast = (lambda: torch.autocast(suite.device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
        net.zero_grad(set_to_none=True)
        lp = pair_log_probs(den, net, items, cond, suite.device, autocast)
        loss, _ = spo_loss(lp["logp_w"], lp["logp_l"], lp["ref_logp_w"], lp["ref_logp_l"], 10.0, 0.1)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        return {k: v.detach().double() for k, v in lp.items()}, float(loss), grad.detach().double()

    ref_lp, ref_loss, ref_grad = compute(torch.float32)
    eps = 0.1

    def decisions(lp):
        out = []
        for m in ("w", "l"):
            r = torch.exp(lp[f"logp_{m}"] - lp[f"ref_logp_{m}"])
            out.append(torch.where(r < 1 - eps, -1, torch.where(r > 1 + eps, 1, 0)))
        return torch.cat(out)

    ref_dec = decisions(ref_lp)
    dtypes = ("fp16", "bf16") if suite.cuda else ("bf16",)
    for name in dtypes:
        with suite.measure("numerics", f"{name} autocast vs fp32") as row:
            lp, loss, grad = compute(DTYPES[name])
            rel = max(float(((lp[k] - ref_lp[k]).abs() / ref_lp[k].abs().clamp_min(1e-12)).max()) for k in lp)
            row["logprob_max_rel_err"] = rel
            row["loss_rel_err"] = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
            row["grad_rel_err"] = float((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30))
            agree = float((decisions(lp) == ref_dec).double().mean())
            row["ratio_decisions_agree"] = agree
            row["members"] = int(ref_dec.numel())
            suite.target(f"{name}: clamped ratio decisions agreeing with fp32", agree, 0.99,
                         agree >= 0.99 if suite.cuda else None)
    net.detach()


# -- rectified flow ---------------------------------------------------------------------------------------

# family: (row label, shipped config, guidance, text tokens): SD3 with real CFG (its CLIP-L/G + T5 length
# 77 + 256), Flux-dev with its distilled guidance (T5 length 512)
FLOW_MODELS = {"sd3": ("SD3.5-medium transformer", "sd35-medium", 4.5, 333),
               "flux": ("Flux transformer", "flux-dev", 3.5, 512)}
FLOW_SIGMAS = (0.8, 0.75)  # one mid-trajectory transition
FLOW_NOISE_LEVEL = 0.7  # Flow-GRPO's SDE noise level a


def flow_transformer(suite: Suite, family: str):
    """A random-weight transformer in bf16 on the device: the shipped config built directly on the device
    with bf16 as the default dtype (no fp32 copy, no CPU detour: the memory is the weights'), or --tiny's."""
    import diffusers

    from spo_core.lora.tables import CONFIG_DIR
    from spo_core.testing import tiny_flux_transformer, tiny_sd3_pipeline

    if suite.tiny:
        model = tiny_sd3_pipeline().transformer if family == "sd3" else tiny_flux_transformer()
    else:
        cls = diffusers.SD3Transformer2DModel if family == "sd3" else diffusers.FluxTransformer2DModel
        config = json.loads((CONFIG_DIR / FLOW_MODELS[family][1] / "transformer" / "config.json").read_text())
        torch.manual_seed(0)
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(suite.device):
                model = cls.from_config(config)
        finally:
            torch.set_default_dtype(before)
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # its "modules to keep in float32: []" note on .to(dtype)
    try:
        model = model.to(device=suite.device, dtype=torch.bfloat16)
    finally:
        diffusers.utils.logging.set_verbosity(level)
    return model.eval().requires_grad_(False)


def flow_host(transformer):
    """The pack's FlowTrainingHost over a bare transformer (a VAE stand-in: a step never decodes)."""
    from types import SimpleNamespace

    from spo_core.backends.flow_backend import FlowBackend
    from spo_core.training.host import FlowTrainingHost

    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(128, 256, 512, 512), scaling_factor=1.0,
                                                 shift_factor=0.0))
    backend = FlowBackend(transformer, vae, encode=None, arch="flux" if "Flux" in type(transformer).__name__ else "sd3")
    return FlowTrainingHost(backend)


def flow_inputs(suite: Suite, host, batch: int, side: int, tokens: int, seed: int = 0):
    """Random latents [B, C, side, side] (float32, as the trainer keeps them) and bf16 prompt embeddings
    (with the negative prompt's for CFG), the transformer's own widths."""
    from spo_core.sampling.denoiser import TensorConditioning

    cfg = host.backend.transformer.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, host.backend.latent_channels, side, side, generator=g).to(suite.device)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(suite.device, torch.bfloat16)

    tensors = {"embeds": rand(batch, tokens, cfg.joint_attention_dim), "pooled": rand(batch, cfg.pooled_projection_dim)}
    if not host.backend.guidance_embeds:
        tensors.update(neg_embeds=rand(batch, tokens, cfg.joint_attention_dim),
                       neg_pooled=rand(batch, cfg.pooled_projection_dim))
    return x, TensorConditioning(tensors)


def flow_train_step(den, net, opt, x, cond, x_next, autocast) -> torch.Tensor:
    """One Flow-GRPO-style micro-step, as DDPO/GRPO's trajectory_log_probs runs it: the reference (LoRA off,
    no grad), the policy pass, the SDE step's mean and transition log-probability, loss, backward, AdamW."""
    from spo_core.sampling.flow import sde_step
    from spo_core.sampling.step import transition_log_prob

    sigma, sigma_next = FLOW_SIGMAS
    s = torch.full((x.shape[0],), sigma, device=x.device)
    with torch.no_grad(), net.disabled(), autocast():
        x0_ref = den(x, s, cond)
    mean_ref, std = sde_step(x, x0_ref.float(), sigma, sigma_next, FLOW_NOISE_LEVEL)
    with autocast():
        x0 = den(x, s, cond)
    mean, _ = sde_step(x, x0.float(), sigma, sigma_next, FLOW_NOISE_LEVEL)
    logp = transition_log_prob(x_next, mean, std)
    logp_ref = transition_log_prob(x_next, mean_ref, std)
    loss = -(logp - logp_ref).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def flow_model_rows(suite: Suite, family: str) -> None:
    """Load, train step with gradient checkpointing off and on, sampling step: one model's rows."""
    from spo_core.sampling.flow import sde_step
    from spo_core.training import inject_lora

    label, arch, guidance, tokens = FLOW_MODELS[family]
    side = 64 if not suite.tiny else 16  # 512 px through the 8x VAE (16 latent channels)
    tokens = tokens if not suite.tiny else 8
    res = side * 8
    iters = 3 if not suite.tiny else 1
    rank, alpha = 32, 64.0
    transformer = None
    with suite.measure("flow", f"{label} load, bf16 random init", model=arch) as row:
        transformer = flow_transformer(suite, family)
        row["params_m"] = round(sum(p.numel() for p in transformer.parameters()) / 1e6, 1)
        row["weights_gb"] = round(sum(p.numel() * p.element_size() for p in transformer.parameters()) / GB, 3)
    if row["status"] != "ok":
        return
    host = flow_host(transformer)
    table = host.module_table()
    den = host.denoiser(guidance)
    cfg_rows = 1 if host.backend.guidance_embeds else 2  # transformer rows per sample
    guide = "guided" if host.backend.guidance_embeds else "CFG"
    autocast = lambda: torch.autocast(suite.device.type, dtype=torch.bfloat16)  # noqa: E731
    common = dict(model=arch, table=table.arch, guidance=f"{'distilled' if guide == 'guided' else 'CFG'} {guidance}",
                  resolution=res, latent=f"{host.backend.latent_channels}x{side}x{side}",
                  text_tokens=tokens, precision="bf16", lora_rank=rank, lora_alpha=alpha)

    batch = 2
    x, cond = flow_inputs(suite, host, batch, side, tokens)
    try:
        with torch.no_grad(), autocast():  # the sample the rollout drew: the reference step's mean plus its noise
            x0 = den(x, torch.full((batch,), FLOW_SIGMAS[0], device=suite.device), cond).float()
            mean, std = sde_step(x, x0, *FLOW_SIGMAS, FLOW_NOISE_LEVEL)
            x_next = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1)).to(suite.device)
            del x0, mean
    except Exception as exc:  # noqa: BLE001 - a row, as a failed load is
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        suite.rows.append({"section": "flow", "name": f"{label} rollout sample for the train step",
                           "status": "out of memory" if oom else f"error: {type(exc).__name__}: {str(exc)[:160]}"})
        return
    for gc in (False, True):
        name = f"{label} train step {res}px {guide}, grad ckpt {'on' if gc else 'off'}"
        net = None
        with suite.measure("flow", name, batch=batch, transformer_rows=batch * cfg_rows, gradient_checkpointing=gc,
                           **common) as row:
            net = inject_lora(host.lora_root(), table, "attn", rank, alpha, "gaussian", 0, device=suite.device)
            row["lora_modules"], row["lora_params_m"] = len(net.branches), round(net.num_parameters() / 1e6, 2)
            if gc:
                host.set_gradient_checkpointing(True, net.checkpoint_function())
            opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-4)
            flow_train_step(den, net, opt, x, cond, x_next, autocast)  # warm-up
            suite.sync()
            t0 = time.perf_counter()
            losses = [flow_train_step(den, net, opt, x, cond, x_next, autocast) for _ in range(iters)]
            suite.sync()
            row["seconds_per_step"] = round((time.perf_counter() - t0) / iters, 4)
            row["loss_finite"] = all(math.isfinite(float(v)) for v in losses)
            del opt
        host.set_gradient_checkpointing(False)
        if net is not None:
            net.detach()
            net.zero_grad(set_to_none=True)
        del net
    del x, cond, x_next

    net = inject_lora(host.lora_root(), table, "attn", rank, alpha, "gaussian", 0, device=suite.device)
    x, cond = flow_inputs(suite, host, 1, side, tokens, seed=2)
    name = f"{label} sampling step {res}px {guide}, no grad"
    with suite.measure("flow", name, batch=1, transformer_rows=cfg_rows, gradient_checkpointing=False, **common) as row:
        s = torch.full((1,), FLOW_SIGMAS[0], device=suite.device)
        with torch.no_grad(), autocast():
            den(x, s, cond)  # warm-up
            suite.sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                den(x, s, cond)
            suite.sync()
        row["seconds_per_step"] = round((time.perf_counter() - t0) / iters, 4)
    net.detach()
    del net, x, cond, den, host, transformer
    if suite.cuda:
        import gc as _gc

        _gc.collect()
        torch.cuda.empty_cache()


def flow_section(suite: Suite, args) -> None:
    flow_model_rows(suite, "sd3")
    if not getattr(args, "skip_flux", False):
        flow_model_rows(suite, "flux")


SECTIONS = {"training": training_section, "objectives": objectives_section, "sampling": sampling_section,
            "spm": spm_section, "numerics": numerics_section, "flow": flow_section}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (CPU check of the code paths)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--skip-sdxl", action="store_true")
    ap.add_argument("--skip-flux", action="store_true", help="leave the Flux-size transformer out of the flow section")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_suite.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU, or with --device cpu --tiny for the code paths", file=sys.stderr)
        return 2
    suite = Suite(device, args.tiny)
    started = time.perf_counter()
    for name in [s for s in args.sections.split(",") if s]:
        if name not in SECTIONS:
            print(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
            return 2
        print(f"== {name}", flush=True)
        SECTIONS[name](suite, args)
    wall = time.perf_counter() - started
    print_table(suite)
    failed = [t for t in suite.targets if t["enforced"] and not t["met"]]
    record = {"device": torch.cuda.get_device_name(device) if suite.cuda else platform.processor() or platform.machine(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "tiny": args.tiny, "seconds": round(wall, 1),
              "bitsandbytes": _has("bitsandbytes"), "rows": suite.rows, "targets": suite.targets,
              "failed_targets": [t["target"] for t in failed]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({wall:.0f} s)")
    errors = [r for r in suite.rows if str(r.get("status", "")).startswith("error")]
    return 1 if failed or errors else 0


def print_table(suite: Suite) -> None:
    keys = ("seconds_per_pair", "seconds_per_step", "sample_seconds", "ratio_to_plain", "seconds_per_batch",
            "peak_allocated_gb", "peak_reserved_gb", "logprob_max_rel_err", "grad_rel_err", "ratio_decisions_agree")
    print(f"\n{'section':<11}{'name':<64}{'status':<15}" + "".join(f"{k[:14]:>15}" for k in keys))
    for r in suite.rows:
        vals = "".join(f"{_fmt(r.get(k)):>15}" for k in keys)
        print(f"{r['section']:<11}{r['name'][:63]:<64}{str(r['status'])[:14]:<15}{vals}")
    print("\ntargets:")
    for t in suite.targets:
        verdict = "met" if t["met"] else ("n/a" if t["met"] is None else "MISSED")
        print(f"  {t['target']}: {_fmt(t['value'])} {t['unit']} (limit {t['limit']}) -> {verdict}"
              + ("" if t["enforced"] else " (not enforced)"))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
