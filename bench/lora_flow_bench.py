"""Benchmark: `spo lora convert` on a real-size Flux.1-dev LoRA (kohya -> diffusers -> kohya).

Builds a rank-16 bf16 LoRA on every Linear of the Flux.1-dev transformer in kohya sd-scripts'
fused layout (random factors), then runs each conversion in a fresh subprocess and records its
time (MB/s of the input file; the import of torch and the LoRA engine, a fixed cost of any process, is timed
apart) and peak RSS (`resource.getrusage`), both in total and above the
RSS the process has after importing the CLI (torch alone is a few hundred MB), against the
file size. Prints the figures and writes bench/results/lora_flow_bench.json.

    .venv/bin/python bench/lora_flow_bench.py [--rank 16] [--dtype bf16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "lora_flow_bench.json"

# runs in the child: import the CLI, note the RSS, convert, report time and peak RSS (KiB on Linux)
CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from spo_core.cli import main
import spo_core.lora  # torch and the LoRA engine: a fixed cost of every process, timed apart
imported = time.perf_counter() - t0
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
rc = main(["lora", "convert", sys.argv[1], sys.argv[2], "--to", sys.argv[3], "--overwrite"])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("BENCH " + json.dumps({"rc": rc, "seconds": seconds, "import_seconds": imported, "base_kib": base, "peak_kib": peak}))
"""


def build_lora(path: Path, rank: int, dtype_name: str) -> dict:
    import torch
    from safetensors.torch import save_file

    from spo_core.lora import load_table

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    table = load_table("flux-dev")
    g = torch.Generator().manual_seed(0)
    sd, seen = {}, set()
    for m in table.select(("transformer",)):
        if m.ldm in seen:
            continue
        seen.add(m.ldm)
        rows = table.groups[m.ldm].rows if m.ldm_rows else m.out_features
        key = "lora_unet_" + m.ldm.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = (torch.randn(rank, m.in_features, generator=g) * 0.01).to(dtype)
        sd[f"{key}.lora_up.weight"] = (torch.randn(rows, rank, generator=g) * 0.01).to(dtype)
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path), {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"})
    return {"modules_fused": len(seen), "modules_split": len(table.select(("transformer",))), "tensors": len(sd)}


def run_convert(src: Path, dst: Path, fmt: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), fmt], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=1800)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"convert to {fmt} failed:\n{out.stdout}\n{out.stderr}")
    r = json.loads(line[len("BENCH "):])
    size = src.stat().st_size / 1e6
    return {"to": fmt, "input_mb": round(size, 1), "output_mb": round(dst.stat().st_size / 1e6, 1),
            "seconds": round(r["seconds"], 3), "mb_per_s": round(size / r["seconds"], 1),
            "import_seconds": round(r["import_seconds"], 3),
            "mb_per_s_with_import": round(size / (r["seconds"] + r["import_seconds"]), 1),
            "peak_rss_mb": round(r["peak_kib"] / 1024, 1), "import_rss_mb": round(r["base_kib"] / 1024, 1),
            "rss_above_import_mb": round((r["peak_kib"] - r["base_kib"]) / 1024, 1),
            "rss_above_import_over_file": round((r["peak_kib"] - r["base_kib"]) / 1024 / (size / 1.048576), 2),
            "peak_rss_over_file": round(r["peak_kib"] / 1024 / (size / 1.048576), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--keep", help="keep the files in this folder")
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core CPU ({platform.machine()})")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        kohya = work / "flux_dev_r16_kohya.safetensors"
        info = build_lora(kohya, args.rank, args.dtype)
        runs = [run_convert(kohya, work / "flux_dev_r16_diffusers.safetensors", "diffusers"),
                run_convert(work / "flux_dev_r16_diffusers.safetensors", work / "flux_dev_r16_back.safetensors", "webui")]
        same = _same_file_tensors(kohya, work / "flux_dev_r16_back.safetensors")
    result = {"arch": "flux-dev", "rank": args.rank, "dtype": args.dtype, "machine": args.machine, **info,
              "round_trip_bit_identical": same, "runs": runs,
              "targets": {"mb_per_s": 500, "rss_over_file": 1.5}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def _same_file_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


if __name__ == "__main__":
    sys.exit(main())
