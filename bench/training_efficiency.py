"""Training efficiency from alignment-bench results: evaluations each run needs to reach a GT gain.

    python bench/training_efficiency.py RESULT.json [RESULT.json ...] [--gains 0.03,0.05,0.07,0.09]
                                        [--out bench/results/alignment_training_flow]

Reads the `training` rows of one or more `bench/alignment_bench.py` results (several runs of the same
world and eval set, e.g. the presets and other learning rates), names each run `method` or
`method (setting value, ...)` by the settings that differ from the first run of that method, and for each gain g finds
the first stage whose held-out GT gain over the base model reaches g (linear interpolation of
evaluations between the stage before and that one; the stage's 95% CI printed beside). Prints a table,
writes OUT.json (runs, per-gain evaluations, peak gain) and OUT.png (GT against evaluations, every run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def runs_of(paths: list[Path]) -> tuple[dict[str, dict], dict]:
    """{run name: {"rows": [...], "settings": {...}}} over the files, and the first file's base stats."""
    runs: dict[str, dict] = {}
    base = None
    first_settings: dict[str, dict] = {}
    for path in paths:
        record = json.loads(path.read_text())
        base = base or record["base"]
        if record["base"]["mean"] != base["mean"]:
            raise SystemExit(f"{path}: another base model or eval set (GT {record['base']['mean']} vs {base['mean']})")
        for method, rows in record["training"].items():
            settings = record["train_settings"][method]
            name = method
            if method in first_settings and settings != first_settings[method]:
                changed = [k for k in settings if settings.get(k) != first_settings[method].get(k)]
                name = f"{method} (" + ", ".join(f"{k} {settings.get(k)}" for k in changed) + ")"
            first_settings.setdefault(method, settings)
            runs[name] = {"rows": rows, "settings": settings, "file": str(path)}
    return runs, base


def evaluations_to_reach(rows: list[dict], gain: float) -> tuple[float, dict] | None:
    """Evaluations at which the gain first reaches `gain` (interpolated from the stage before), and that stage."""
    prev_e, prev_g = 0.0, 0.0
    for row in rows:
        g, e = row["vs_base"]["mean_delta"], float(row["unet_evaluations"])
        if g >= gain:
            at = prev_e + (gain - prev_g) / (g - prev_g) * (e - prev_e) if g > prev_g else e
            return at, row
        prev_e, prev_g = e, g
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--gains", default="0.03,0.05,0.07,0.09")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "alignment_training_flow")
    args = p.parse_args()
    from alignment_bench import xy_chart

    from spo_core.plots import save_png

    gains = [float(g) for g in args.gains.split(",")]
    runs, base = runs_of(args.results)
    table = {}
    print(f"base GT {base['mean']:.3f}; evaluations (denoiser rows) of training to reach a held-out GT gain:")
    width = max(22, *(len(n) + 2 for n in runs))
    print("run".ljust(width) + "".join(f"+{g:.2f}".rjust(22) for g in gains) + "   peak gain (at evaluations)")
    for name, run in runs.items():
        cells, reached = [], {}
        for g in gains:
            hit = evaluations_to_reach(run["rows"], g)
            if hit is None:
                cells.append("not reached".rjust(22))
                reached[str(g)] = None
            else:
                at, row = hit
                ci = row["vs_base"]["ci95"]
                cells.append(f"{at / 1e3:,.1f}k [{ci[0]:+.3f},{ci[1]:+.3f}]".rjust(22))
                reached[str(g)] = {"evaluations": at, "stage_steps": row["steps"], "stage_ci95": ci}
        peak = max(run["rows"], key=lambda r: r["vs_base"]["mean_delta"])
        print(name.ljust(width) + "".join(cells) + f"   {peak['vs_base']['mean_delta']:+.3f} ({peak['unet_evaluations'] / 1e3:,.0f}k, "
              f"{peak['steps']} steps)")
        table[name] = {"reached": reached, "peak": {"gain": peak["vs_base"]["mean_delta"], "ci95": peak["vs_base"]["ci95"],
                                                     "evaluations": peak["unet_evaluations"], "steps": peak["steps"]},
                       "settings": run["settings"], "file": run["file"],
                       "stages": [{"steps": r["steps"], "evaluations": r["unet_evaluations"], "gt": r["mean"],
                                   "gain": r["vs_base"]["mean_delta"], "ci95": r["vs_base"]["ci95"]} for r in run["rows"]]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"base": base, "gains": gains, "runs": table}, indent=1))
    series = {name: [(0.0, base["mean"])] + [(r["unet_evaluations"], r["mean"]) for r in run["rows"]] for name, run in runs.items()}
    save_png(xy_chart(series, "held-out GT vs training compute (the world's flow model, 96 images)",
                      "transformer image-evaluations spent in training", "GT"), args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
