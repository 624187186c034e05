"""Per-step resampler benchmark: plain ancestral (DDIM eta=1) sampling vs the resampler at k = 2, 4, 8.

Same run, same UNet, same steps, through the diffusers backend's CFG denoiser (uncond + cond in
one UNet call). Every step is pooled (window t in [0, 999]); candidates are decoded with the
near-free latent->RGB decoder and scored by a cheap brightness scorer, so the figures show the
sampler and the batched UNet, not a particular reward model. Reported per run:
- denoiser evaluations (rows: one row = one sample through CFG), in total and per step, and the
  per-step counts from the trace: k in every pooled step (+1 at the first for its parent;
  0 at the last, whose candidates are final and scored directly, as SPO does);
- wall time, and the ratio to plain sampling for the whole run and for one steady pooled step.
Targets: evaluations per steady pooled step = k exactly; wall ratio <= 1.1 * k on CPU; on a GPU,
SD1.5-size at 512 px in fp16, ratio at k = 4 <= 2.5.

Models: "tiny" (spo_core.testing's ~2M-parameter SD1.5-shaped pipeline, 16x16 latents) and
"sd15" (the real SD1.5 UNet config with random weights; 16x16 latents = 128 px on CPU, or
--sd15-latent 64 = 512 px on a GPU).

`--scoring` adds the cost of real scoring at SD1.5 size, one pooled k-candidate step each (the
same UNet, the same latents), all random weights at real sizes:
- "pixel": SPO's way, every candidate's predicted x0 (one batched CFG pass) decoded with SD1.5's
  full VAE and scored by an SPM of CLIP-H/14 size;
- "lrm": LPO's way, the noisy candidates scored as latents by an SD1.5-size latent reward model
  (the UNet's encoder with CFG on the mid feature), no x0 pass, no decode.
Target (issue 16): the LRM step costs at most 0.5x the pixel step.

FK steering (`--fk-particles 4,8`): N particles weighed and resampled at every step, the time of the
particle bookkeeping (weights, multinomial, reindexing; not scoring) as a share of the run. Target
(issue 17): under 2% of a step's wall time.

    python bench/sampler_bench.py [--models tiny,sd15] [--ks 2,4,8] [--threads 1] [--scoring]
                                  [--device cpu|cuda] [--dtype fp32|fp16] [--out bench/results/sampler_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spo_core.backends import DiffusersBackend  # noqa: E402
from spo_core.sampling import LatentRGBDecoder, ResamplerConfig, resample  # noqa: E402
from spo_core.testing import ddim_scheduler, real_unet, tiny_sd15_pipeline, tiny_text_config, tiny_vae  # noqa: E402


class BrightnessScorer:
    """A stand-in reward: mean brightness of the decoded x0 (cost ~0, like a cached value)."""

    name, step_aware, needs_prompt, differentiable = "brightness", False, False, False

    def score(self, images, prompts, timesteps=None):
        return images.float().mean(dim=(1, 2, 3)) * 100


def sd15_size_pipeline(device, dtype):
    """Real SD1.5 UNet (random weights) with a 1-layer 768-wide text encoder and the tiny VAE."""
    import diffusers
    import transformers

    from spo_core.clip_tokenizer import load_clip_tokenizer

    unet = real_unet("sd15", device="cpu", seed=0)
    torch.manual_seed(1)
    te = transformers.CLIPTextModel(tiny_text_config(hidden=768, layers=1, projection_dim=768))
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(2), text_encoder=te, tokenizer=load_clip_tokenizer(), unet=unet, scheduler=ddim_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return to_device(pipe, device, dtype)


def to_device(pipe, device, dtype):
    pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(backend, cond, x, sigmas, k: int, device, repeats: int, guidance: float = 5.0) -> dict:
    """Best of `repeats` runs of the resampler (k = 1: plain ancestral sampling, the same code path)."""
    decode = LatentRGBDecoder("sd15", upscale=8)
    cfg = ResamplerConfig(k=k, policy="greedy", window=(0, 999))
    best = None
    for _ in range(repeats):
        stamps: list[float] = []
        sync(device)
        t0 = time.perf_counter()

        def on_step(info):
            sync(device)
            stamps.append(time.perf_counter())

        res = resample(backend.denoiser(guidance), cond, x, sigmas, backend.schedule, BrightnessScorer(), decode, None,
                       cfg, seed=0, callback=on_step)
        sync(device)
        wall = time.perf_counter() - t0
        step_times = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
        if best is None or wall < best["wall_s"]:
            best = {"wall_s": wall, "step_s": step_times, "result": res}
    res = best["result"]
    b = x.shape[0]
    per_step = [r.evaluations // b for r in res.trace]
    steady = [t for t, r in zip(best["step_s"], res.trace) if r.evaluations == k * b] if k > 1 else best["step_s"]
    return {
        "k": k, "wall_s": round(best["wall_s"], 4), "evaluations": res.evaluations, "denoiser_calls": res.calls,
        "evaluations_per_step": round(res.evaluations / b / res.steps, 4), "evaluations_by_step_per_prompt": per_step,
        "steady_step_s": round(min(steady), 4) if steady else None, "pooled_steps": res.pooled_steps,
    }


def bench_model(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    if name == "tiny":
        pipe = to_device(tiny_sd15_pipeline(), device, dtype)
        latent, steps, batch, repeats = args.tiny_latent, args.tiny_steps, args.batch, args.repeats
    else:
        pipe = sd15_size_pipeline(device, dtype)
        latent, steps, batch, repeats = args.sd15_latent, args.sd15_steps, args.batch, 1
    backend = DiffusersBackend.from_pipeline(pipe)
    cond = backend.encode_prompts(["a photo of a lake"] * batch)
    sigmas = backend.schedule.spo_sigmas(20)[-(steps + 1):]  # the last `steps` steps of SPO's schedule
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, 4, latent, latent, generator=g) * (1 + float(sigmas[0]) ** 2) ** 0.5).to(device)
    run_one(backend, cond, x, sigmas[-2:], 1, device, 1)  # warm-up: one plain step
    plain = run_one(backend, cond, x, sigmas, 1, device, repeats)
    rows = [plain]
    print(f"[{name}] plain: {plain['wall_s']:.3f} s, {plain['evaluations_per_step']} evaluations/step", flush=True)
    for k in args.ks:
        r = run_one(backend, cond, x, sigmas, k, device, repeats)
        r["wall_ratio"] = round(r["wall_s"] / plain["wall_s"], 3)
        r["steady_step_ratio"] = round(r["steady_step_s"] / plain["steady_step_s"], 3) if r["steady_step_s"] else None
        r["target_wall_ratio"] = round(1.1 * k, 3)
        r["meets_target"] = r["wall_ratio"] <= 1.1 * k and (r["steady_step_ratio"] or 0) <= 1.1 * k
        rows.append(r)
        print(f"[{name}] k={k}: {r['wall_s']:.3f} s, ratio {r['wall_ratio']} (steady step {r['steady_step_ratio']}), "
              f"evaluations by step {r['evaluations_by_step_per_prompt']}", flush=True)
    fk_rows = [run_fk(backend, cond, x, sigmas, n, device, repeats) for n in args.fk_particles]
    for r in fk_rows:
        print(f"[{name}] FK {r['particles']} particles, weighed at every step: {r['wall_s']:.3f} s, resampling overhead "
              f"{r['overhead_s'] * 1e3:.2f} ms = {100 * r['overhead_share']:.2f}% of the run", flush=True)
    params = sum(p.numel() for p in pipe.unet.parameters())
    px = latent * (8 if name == "sd15" else backend.vae_scale_factor)  # sd15: the size with SD's real VAE
    del pipe, backend
    return {"model": name, "unet_params_m": round(params / 1e6, 1), "latent": [4, latent, latent],
            "image_px": px, "steps": steps, "batch": batch, "guidance": 5.0, "runs": rows, "fk": fk_rows}


def run_fk(backend, cond, x, sigmas, n: int, device, repeats: int, guidance: float = 5.0) -> dict:
    """FK steering with n particles, weighed and resampled at every step (the most overhead it can have):
    the time of its own bookkeeping (weights, multinomial, reindexing; not scoring) over the run's wall."""
    decode = LatentRGBDecoder("sd15", upscale=8)
    cfg = ResamplerConfig(k=n, policy="fk", window=(0, 999), score_every=1, potential="max", lam=10.0)
    best = None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        res = resample(backend.denoiser(guidance), cond, x, sigmas, backend.schedule, BrightnessScorer(), decode, None,
                       cfg, seed=0)
        sync(device)
        wall = time.perf_counter() - t0
        if best is None or wall < best[0]:
            best = (wall, res)
    wall, res = best
    stats = res.particle_stats
    return {"particles": n, "wall_s": round(wall, 4), "weighings": len(stats.events),
            "resamplings": sum(int(e.resampled.sum()) for e in stats.events), "overhead_s": round(stats.overhead_s, 6),
            "overhead_share": round(stats.overhead_s / wall, 5), "evaluations": res.evaluations}


def bench_scoring(args, device: torch.device, dtype: torch.dtype, k: int = 4) -> dict:
    """One pooled k-candidate step, SD1.5 size: SPM-H on VAE-decoded x0 vs the latent reward model."""
    import diffusers

    from spo_core.scorers.clip_torch import clip_h14_config
    from spo_core.scorers.lrm import LRMScorer
    from spo_core.scorers.lrm_model import lrm_from_diffusion_model
    from spo_core.scorers.spm import SPMScorer
    from spo_core.scorers.spm_model import StepAwarePreferenceModel
    from spo_core.testing import real_config

    pipe = sd15_size_pipeline(device, dtype)
    torch.manual_seed(3)
    pipe.vae = diffusers.AutoencoderKL.from_config(real_config("sd15", "vae")).to(device, dtype)
    backend = DiffusersBackend.from_pipeline(pipe)
    torch.manual_seed(4)
    spm = SPMScorer(StepAwarePreferenceModel(clip_h14_config()), device=device, dtype=dtype)
    lrm = LRMScorer(lrm_from_diffusion_model(pipe.unet, pipe.text_encoder), device=device, dtype=dtype)
    latent, batch = args.sd15_latent, args.batch
    cond = backend.encode_prompts(["a photo of a lake"] * batch)
    sig = backend.schedule.spo_sigmas(20)
    window = (float(backend.schedule.timestep(sig[9])) - 1, float(backend.schedule.timestep(sig[9])) + 1)  # pool one mid step
    sigmas = sig[9:12]  # three steps, the first pooled; the next step's evaluation is charged to it
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, 4, latent, latent, generator=g) * (1 + float(sigmas[0]) ** 2) ** 0.5).to(device)
    rows = {}
    for name, scorer in (("pixel", spm), ("lrm", lrm)):
        cfg = ResamplerConfig(k=k, policy="greedy", window=window)
        resample(backend.denoiser(5.0), cond, x, sigmas[:2], backend.schedule, scorer, backend.decode, ["a lake"] * batch,
                 ResamplerConfig(k=k, policy="greedy", window=(0, 999)), seed=0)  # warm-up
        best = None
        for _ in range(max(1, args.scoring_repeats)):
            stamps = []
            sync(device)
            t0 = time.perf_counter()

            def on_step(info):
                sync(device)
                stamps.append(time.perf_counter())

            res = resample(backend.denoiser(5.0), cond, x, sigmas, backend.schedule, scorer, backend.decode,
                           ["a lake"] * batch, cfg, seed=0, callback=on_step)
            # the pooled step plus the next step, whose evaluation the pixel way already made inside its pool
            wall = stamps[1] - t0
            if best is None or wall < best[0]:
                best = (wall, res)
        wall, res = best
        rows[name] = {"pooled_plus_next_step_s": round(wall, 3), "decodes": res.decodes,
                      "denoiser_rows": res.trace[0].evaluations + res.trace[1].evaluations, "scorer_rows": res.scorer_rows}
        print(f"[scoring] {name}: {wall:.2f} s for the pooled step + the next, {res.decodes} decodes", flush=True)
    ratio = rows["lrm"]["pooled_plus_next_step_s"] / rows["pixel"]["pooled_plus_next_step_s"]
    del pipe, backend, spm, lrm
    return {"k": k, "latent": [4, latent, latent], "batch": batch, "rows": rows, "lrm_over_pixel": round(ratio, 3),
            "target": 0.5, "meets_target": ratio <= 0.5,
            "scorers": {"pixel": "SPM, CLIP-H/14 size (random), on SD1.5-VAE-decoded x0", "lrm": "SD1.5-size LRM (random)"}}


def print_table(models: list[dict]) -> None:
    print(f"\n{'model':<6} {'k':>2} {'wall s':>9} {'ratio':>6} {'step ratio':>10} {'target':>6} {'evals/step':>10}  per-step evals")
    for m in models:
        for r in m["runs"]:
            print(f"{m['model']:<6} {r['k']:>2} {r['wall_s']:>9.3f} {r.get('wall_ratio', 1.0):>6.2f} "
                  f"{r.get('steady_step_ratio', 1.0) or 0:>10.2f} {r.get('target_wall_ratio', ''):>6} "
                  f"{r['evaluations_per_step']:>10}  {r['evaluations_by_step_per_prompt']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,sd15")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, default=1, help="prompts per run")
    ap.add_argument("--repeats", type=int, default=3, help="tiny model: best of n runs")
    ap.add_argument("--tiny-latent", type=int, default=16)
    ap.add_argument("--tiny-steps", type=int, default=10)
    ap.add_argument("--sd15-latent", type=int, default=16, help="latent side: 16 = 128 px (CPU), 64 = 512 px (GPU)")
    ap.add_argument("--sd15-steps", type=int, default=3)
    ap.add_argument("--fk-particles", default="4,8", help="FK steering runs (resampling overhead); empty: none")
    ap.add_argument("--scoring", action="store_true", help="also: one pooled k=4 step with SPM-H + VAE vs the LRM")
    ap.add_argument("--scoring-repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sampler_bench.json"))
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.fk_particles = [int(n) for n in args.fk_particles.split(",") if n]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    started = time.perf_counter()
    models = [bench_model(name, args, device, dtype) for name in args.models.split(",") if name]
    print_table(models)
    scoring = bench_scoring(args, device, dtype) if args.scoring else None
    if scoring:
        print(f"LRM step / pixel step (SPM-H + VAE): {scoring['lrm_over_pixel']:.3f} (target <= 0.5)")
    out = {
        "bench": "sampler", "device": str(device), "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                    "load_average_at_end": list(os.getloadavg())},
        "decoder": "latent->RGB (LatentRGBDecoder)", "scorer": "mean brightness (stand-in)",
        "total_s": round(time.perf_counter() - started, 1), "models": models, "scoring": scoring,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
