"""Step-aware preference model vs plain CLIP ViT-H/14 image forward, at real size (random weights).

Same run, same batch (default 4 images, 224 px), interleaved repeats so that a shared machine's
load hits every variant alike:
  - spm:          SPO's vision forward (timestep embedder + adaLN in all 32 layers + final adaLN)
  - plain:        the same weights without the timestep path, i.e. a plain CLIP-H vision forward
  - transformers: transformers' CLIPVisionModelWithProjection of the same size (reference speed)
Reports median and min seconds per batch, images/s, the ratio spm / plain (target <= 1.35), and
the peak memory of a forward above the loaded model (CPU: peak RSS; GPU: max_memory_allocated).

`--load-test` also writes a released-layout 5.22 GB fp32 .bin of the real key set and measures
`load_spm` (memory-mapped, weights-only) and `spo scorer convert` to fp16 safetensors: time and
peak RSS. Run with `--device cuda --dtype fp16` on a GPU.

    python bench/scorer_bench.py [--device cuda --dtype fp16] [--repeats 3] [--batch 4] [--load-test]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spo_core.scorers import CLIPTorch, clip_h14_config, tiny_clip_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status("VmRSS")


def peak_rss_mb() -> float:
    return _status("VmHWM")


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights N(0, 1/fan_in) (adaLN 50x smaller, so 32 modulated layers stay finite), norms 1, biases 0."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                w = torch.randn(p.shape, generator=gen).mul_(p[0].numel() ** -0.5)
                p.copy_(w.mul_(0.02) if "adaLN" in name else w)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_ours(cfg, device, dtype) -> CLIPTorch:
    """The SPM's image path: vision tower, projection, timestep embedder (the text tower stays on meta)."""
    with torch.device("meta"):
        model = CLIPTorch(cfg, time_conditioned=True)
    for name in ("vision_model", "visual_projection", "t_embedder"):
        part = getattr(model, name).to_empty(device=device)
        randomize_(part)
        part.to(dtype).requires_grad_(False)
        setattr(model, name, part)
    return model.eval()


def build_transformers(cfg, device, dtype):
    import transformers

    v = cfg.vision
    hf_cfg = transformers.CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                           num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                           patch_size=v.patch_size, image_size=v.image_size, hidden_act=v.hidden_act,
                                           projection_dim=cfg.projection_dim)
    with torch.device("meta"):
        model = transformers.CLIPVisionModelWithProjection(hf_cfg)
    model = model.to_empty(device=device)
    randomize_(model)
    for name, buf in model.named_buffers():  # position_ids (only in older transformers)
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return model.to(dtype).eval().requires_grad_(False)


def image_path_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("text_") and "text_projection" not in n
               and n != "logit_scale")


def bench_forward(args, cfg, device, dtype) -> dict:
    size = cfg.vision.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    timesteps = torch.linspace(0, 999, args.batch).round().to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    before = rss_mb()
    ours = build_ours(cfg, device, dtype)
    variants = {
        "spm": lambda: ours.image_features(pixels, timesteps),
        "plain": lambda: ours.visual_projection(ours.vision_model(pixels)),  # no timestep path: plain CLIP-H
    }
    result: dict = {"model_rss_mb": rss_mb() - before,
                    "params_m": {"spm_image_path": image_path_params(ours) / 1e6,
                                 "plain_image_path": sum(p.numel() for n, p in ours.named_parameters()
                                                         if n.startswith(("vision_model", "visual_projection"))
                                                         and "adaLN" not in n) / 1e6}}
    if args.transformers:
        hf = build_transformers(cfg, device, dtype)
        variants["transformers"] = lambda: hf(pixel_values=pixels).image_embeds
        with torch.no_grad():  # same weights in both: our plain forward must be transformers' forward
            shared = {k: v for k, v in ours.state_dict().items()
                      if k.startswith(("vision_model", "visual_projection")) and "adaLN" not in k}
            missing, unexpected = hf.load_state_dict(shared, strict=False)
            assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
            ref = variants["transformers"]().float()
            diff = (ref - variants["plain"]().float()).abs().max().item() / ref.abs().max().item()
        result["max_rel_diff_plain_vs_transformers"] = diff

    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, float] = {}
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn()
        sync()
        for r in range(args.repeats):
            for name, fn in variants.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                else:
                    reset_peak_rss()
                    base = rss_mb()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else peak_rss_mb() - base
                peaks[name] = max(peaks.get(name, 0.0), peak)
                print(f"  repeat {r + 1}/{args.repeats} {name:<13} {times[name][-1]:8.3f} s", flush=True)
    for name in variants:
        med = statistics.median(times[name])
        result[name] = {"median_s": med, "min_s": min(times[name]), "times_s": times[name],
                        "images_per_s": args.batch / med, "forward_peak_mb": peaks[name]}
    result["ratio_spm_over_plain_median"] = result["spm"]["median_s"] / result["plain"]["median_s"]
    result["ratio_spm_over_plain_min"] = result["spm"]["min_s"] / result["plain"]["min_s"]
    if "transformers" in result:
        result["ratio_plain_over_transformers_median"] = result["plain"]["median_s"] / result["transformers"]["median_s"]
    return result


def bench_load(args) -> dict:
    """Released-layout 5.22 GB .bin -> load_spm (mmap) and convert to fp16 safetensors: time and peak RSS."""
    from spo_core.scorers import StepAwarePreferenceModel, convert_spm_file, load_spm

    folder = Path(args.load_dir or tempfile.mkdtemp(prefix="spo_spm_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    src, dst = folder / "sdxl_step-aware_preference_model.bin", folder / "spm_fp16.safetensors"
    out: dict = {}
    with torch.device("meta"):
        ref = StepAwarePreferenceModel(clip_h14_config())
    t0 = time.perf_counter()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in ref.state_dict().items()}
    torch.save(sd, src)
    del sd
    out["write_bin_s"] = time.perf_counter() - t0
    out["bin_gb"] = src.stat().st_size / 1e9
    try:
        for label, fn in (("load_bin_fp32", lambda: load_spm(src)),
                          ("convert_fp16", lambda: convert_spm_file(src, dst, torch.float16, overwrite=True)),
                          ("load_safetensors_fp16", lambda: load_spm(dst, dtype=torch.float16))):
            reset_peak_rss()
            base = rss_mb()
            t0 = time.perf_counter()
            obj = fn()
            seconds = time.perf_counter() - t0
            out[label] = {"seconds": seconds, "peak_rss_increase_mb": peak_rss_mb() - base, "rss_after_mb": rss_mb() - base}
            print(f"  {label:<22} {seconds:7.1f} s  peak RSS +{out[label]['peak_rss_increase_mb']:.0f} MB", flush=True)
            del obj
        out["safetensors_fp16_gb"] = dst.stat().st_size / 1e9
    finally:
        for p in (src, dst):
            if p.exists():
                p.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-transformers", dest="transformers", action="store_false",
                        help="skip the transformers reference forward")
    parser.add_argument("--load-test", action="store_true", help="also measure loading/converting a 5.22 GB .bin")
    parser.add_argument("--load-dir", help="where --load-test writes its temporary files (needs ~8 GB)")
    parser.add_argument("--config", choices=["clip-h14", "tiny"], default="clip-h14", help="tiny: a quick smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scorer_bench.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    results: dict = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        "settings": {"device": str(device), "dtype": args.dtype, "batch": args.batch, "repeats": args.repeats}}
    print(f"forward ({args.config}), batch {args.batch}, {args.device} {args.dtype}, {torch.get_num_threads()} threads", flush=True)
    cfg = clip_h14_config() if args.config == "clip-h14" else tiny_clip_config(image_size=224, hidden=64)
    results["settings"]["config"] = args.config
    results["forward"] = bench_forward(args, cfg, device, dtype)
    f = results["forward"]
    print(f"\n{'variant':<14}{'median s':>10}{'min s':>10}{'img/s':>9}{'peak MB':>10}")
    for name in ("plain", "spm", "transformers"):
        if name in f:
            print(f"{name:<14}{f[name]['median_s']:10.3f}{f[name]['min_s']:10.3f}{f[name]['images_per_s']:9.2f}"
                  f"{f[name]['forward_peak_mb']:10.0f}")
    print(f"SPM / plain = {f['ratio_spm_over_plain_median']:.3f} (median), {f['ratio_spm_over_plain_min']:.3f} (min); "
          f"target <= 1.35. Image-path parameters: plain {f['params_m']['plain_image_path']:.1f} M, "
          f"SPM {f['params_m']['spm_image_path']:.1f} M")
    if "ratio_plain_over_transformers_median" in f:
        print(f"our plain / transformers = {f['ratio_plain_over_transformers_median']:.3f}; "
              f"same weights, max |difference| / max |embedding| {f['max_rel_diff_plain_vs_transformers']:.1e}")
    if args.load_test:
        print("\nloading the released layout (5.22 GB fp32 .bin)", flush=True)
        results["load"] = bench_load(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
