"""Choose FK steering's settings on the embedded world, on *training* prompts (the held-out prompts of
the alignment bench are never used here): N = 4 particles against best-of-4 at the same UNet
evaluations, for each potential x lambda x resampling interval, scored by the shipped SPM.

    python bench/fk_sweep.py [--prompts 24] [--potentials max,diff,rt] [--lams 1,3,10] [--every 2,5]
                             [--out bench/results/fk_sweep.json]

Prints the GT gain of each setting against best-of-4 image by image (95% CI) and writes the JSON;
the best one is what alignment_bench.py runs by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spo_core.sampling import ResamplerConfig  # noqa: E402
from spo_core.scorers import load_scorer  # noqa: E402
from spo_core.world.dataset import train_prompts  # noqa: E402
from spo_core.world.demo import _fresh_backend, paired_comparison, sample_arm  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--particles", type=int, default=4)
    p.add_argument("--potentials", default="max,diff,rt")
    p.add_argument("--lams", default="1,3,10")
    p.add_argument("--every", default="2,5")
    p.add_argument("--scorer", default="spm", help="spm or lrm (the world's)")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fk_sweep.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(123)
    prompts = train_prompts()
    chosen = [prompts[i] for i in rng.permutation(len(prompts))[:args.prompts]]
    pairs = [(c, 50_000 + 1000 * i + j) for i, c in enumerate(chosen) for j in range(2)]
    scorer = load_scorer(args.scorer, "world")
    base = _fresh_backend()
    t0 = time.perf_counter()
    n = args.particles
    bon = sample_arm(f"best-of-{n}", base, pairs, scorer, best_of=n)
    print(f"best-of-{n}: GT {bon.stats.mean:.4f} ({bon.evaluations / len(pairs):.0f} denoiser rows per image)", flush=True)
    rows = []
    for potential in args.potentials.split(","):
        for lam in (float(v) for v in args.lams.split(",")):
            for every in (int(v) for v in args.every.split(",")):
                cfg = ResamplerConfig(k=n, policy="fk", potential=potential, lam=lam, score_every=every, window=(0.0, 999.0))
                arm = sample_arm("fk", base, pairs, scorer, config=cfg)
                c = paired_comparison(arm.gt, bon.gt)
                rows.append({"potential": potential, "lam": lam, "every": every, "gt": arm.stats.mean, "vs_best_of_n": c,
                             "seconds": arm.seconds})
                print(f"fk {potential} lambda {lam:g} every {every}: GT {arm.stats.mean:.4f}, vs best-of-{n} "
                      f"{c['mean_delta']:+.4f} (95% CI {c['ci95'][0]:+.4f} .. {c['ci95'][1]:+.4f}), {arm.seconds:.0f}s", flush=True)
    best = max(rows, key=lambda r: r["vs_best_of_n"]["mean_delta"])
    print(f"best: {best['potential']}, lambda {best['lam']:g}, every {best['every']} "
          f"({best['vs_best_of_n']['mean_delta']:+.4f} vs best-of-{n})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompts": "training prompts (never the held-out ones)", "images": len(pairs),
                                    "particles": n, "scorer": args.scorer, "best_of_n_gt": bon.stats.mean, "rows": rows,
                                    "best": best, "seconds": time.perf_counter() - t0}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
