"""Alignment on the embedded world at equal compute, measured by its exact ground-truth preference.

    python bench/alignment_bench.py [--stages 20,40,60] [--method-stages ddpo=10,20,35] [--eval-prompts 48]
                                    [--methods spo,ddpo,...] [--out bench/results]

On held-out prompts (object pairs never seen together in training), every arm starting from the
same initial noise, compute counted as UNet image-evaluations (every forward's batch rows; CFG
counts 2 per image; sampling, scoring rollouts and training forwards alike):

1. training: SPO (learning from the shipped step-aware preference model) vs LPO (from the shipped latent
   reward model; its encoder passes counted beside, and the wall-clock training time of every method
   recorded, cumulative over stages, for LPO's speed claim) vs Diffusion-DPO and
   NCP-DPO (offline pairs of base samples labelled by the ground truth; their sampling counted)
   vs DDPO (ground-truth reward). Each run is evaluated after every stage of optimizer steps
   (resumed from its checkpoint), giving GT against evaluations spent;
2. sampling: the per-step resampler (greedy and softmax, k = 4, pools at SPO's window t <= 751;
   greedy k = 5 there, which spends what best-of-4 spends; greedy k = 4 at every step, 4% less) vs
   best-of-4 vs plain sampling, on the base model, scored by the shipped SPM; each resampler arm is
   also compared with best-of-4 image by image.

3. steering (`--steering-budgets 4,8,16`): at each budget N of denoiser evaluations per image per
   step, best-of-N vs the per-step resampler (greedy, k = N at every step) vs FK steering (N
   particles; its settings from bench/fk_sweep.py, chosen on training prompts), scored by the SPM
   and (`--steering-scorers spm,lrm`) by the world's latent reward model; every arm compared with
   best-of-N image by image; GT against evaluations per image in alignment_steering.png.

`--world flow`: the world's rectified-flow model; its training arms are spo, grpo and ddpo (default spo,grpo:
the `<method>-world-flow` presets on its SDE steps, counted in transformer evaluations), then the steering
arms with `--steering-budgets`; results go to *_flow.json/png (bench/training_efficiency.py compares runs).

`--methods ""` runs only the sampling parts. Prints a table and writes alignment_bench.json and
(with training) alignment_bench.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spo_core.plots import save_png  # noqa: E402
from spo_core.scorers.spm import SPMScorer  # noqa: E402
from spo_core.world.demo import (WORLD_FLOW_TRAIN_SETTINGS, WORLD_TRAIN_SETTINGS, DemoConfig, UNetCounter, _fresh_backend,  # noqa: E402
                                 _merged_backend, heldout_eval_set, paired_comparison, sample_arm, train_lora,
                                 world_scorer)
from spo_core.world.gt_scorer import WorldGroundTruthScorer  # noqa: E402
from spo_core.world.train_spm import SPM_PATH  # noqa: E402


def xy_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str, thousands: bool = True):
    """Lines of (x, y) points per named series, each with its own x values."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    w, h, left, right, top, bottom = 760, 380, 64, 190, 28, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 8), title, fill="black", font=font)
    pts = [p for v in series.values() for p in v]
    x0, x1 = 0.0, max(p[0] for p in pts) * 1.05 or 1.0
    y0, y1 = min(p[1] for p in pts) - 0.01, max(p[1] for p in pts) + 0.01

    def xy(p):
        return left + (p[0] - x0) / (x1 - x0) * (w - left - right), h - bottom - (p[1] - y0) / (y1 - y0) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        d.text((4, xy((0, yv))[1] - 6), f"{yv:.3f}", fill="black", font=font)
        xv = x0 + (x1 - x0) * i / 4
        d.text((xy((xv, y0))[0] - 12, h - bottom + 6), f"{xv / 1e3:.0f}k" if thousands else f"{xv:.0f}", fill="black", font=font)
    d.text((left, h - 14), x_label, fill="black", font=font)
    d.text((4, top - 14), y_label, fill="black", font=font)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207), (120, 120, 120)]
    for i, (name, points) in enumerate(series.items()):
        c = colours[i % len(colours)]
        xys = [xy(p) for p in points]
        if len(xys) > 1:
            d.line(xys, fill=c, width=2)
        for px, py in xys:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
        d.text((w - right + 8, top + 14 * i), name, fill=c, font=font)
    return img


def count_scorer_rows(scorer) -> list[int]:
    """Count the rows `scorer.score` sees from now on (the candidates a method scores while it trains)."""
    count = [0]
    score = scorer.score

    def counted(inputs, *a, **kw):
        count[0] += int(inputs.shape[0])
        return score(inputs, *a, **kw)

    scorer.score = counted
    return count


def steering_curve(base, pairs, plain, args) -> dict:
    """GT against denoiser evaluations per image: best-of-N, greedy per-step k = N, FK with N particles."""
    from spo_core.sampling import ResamplerConfig
    from spo_core.scorers import load_scorer

    fk = dict(item.split("=") for item in args.fk.split(","))
    top = 1000.0 if args.world == "flow" else 999.0  # a flow model's first step is at t = 1000 (sigma 1)
    fk_cfg = dict(potential=fk.get("potential", "max"), lam=float(fk.get("lam", 10)), score_every=int(fk.get("every", 5)),
                  adaptive=fk.get("adaptive", "false").lower() == "true", window=(0.0, top))
    budgets = [int(v) for v in args.steering_budgets.split(",") if v]
    out = {"fk_settings": fk_cfg, "budgets": budgets, "arms": {}}
    for scorer_name in [s for s in args.steering_scorers.split(",") if s]:
        scorer = load_scorer(scorer_name, "world")
        for n in budgets:
            arms = {f"best-of-{n}": dict(best_of=n),
                    f"greedy k={n}, every step": dict(config=ResamplerConfig(k=n, policy="greedy", window=(0.0, top))),
                    f"FK {n} particles": dict(config=ResamplerConfig(k=n, policy="fk", **fk_cfg))}
            results = {}
            for name, kw in arms.items():
                label = f"{name} ({scorer_name})"
                count = UNetCounter(denoiser_module(base))
                arm = sample_arm(label, base, pairs, scorer, **kw)
                count.close()
                results[name] = arm
                row = {**arm.stats.as_dict(), "seconds": arm.seconds, "unet_evaluations_per_image": count.rows / len(pairs),
                       "vs_plain": paired_comparison(arm.gt, plain.gt)}
                if not name.startswith("best-of"):
                    row["vs_best_of_n"] = paired_comparison(arm.gt, results[f"best-of-{n}"].gt)
                out["arms"][label] = row
                vs = row.get("vs_best_of_n")
                print(f"{label}: GT {arm.stats.mean:.3f}, {row['unet_evaluations_per_image']:.0f} UNet evaluations per image"
                      + (f" | vs best-of-{n} {vs['mean_delta']:+.3f} (95% CI {vs['ci95'][0]:+.3f} .. {vs['ci95'][1]:+.3f}), "
                         f"higher on {vs['beats']:.0%}" if vs else ""), flush=True)
    out["plain"] = {"gt": plain.stats.mean, "unet_evaluations_per_image": 40.0}
    plot_steering(out, len(pairs), args.out / f"alignment_steering{suffix(args)}.png")
    return out


def denoiser_module(backend) -> torch.nn.Module:
    """The network whose forward rows are counted: the UNet, or a flow model's transformer."""
    return backend.transformer if getattr(backend, "is_flow", False) else backend.pipe.unet


def suffix(args) -> str:
    return "_flow" if args.world == "flow" else ""


def plot_steering(steering: dict, images: int, path: Path) -> None:
    """GT against UNet evaluations per image, one line per arm kind and scorer. A latent scorer's greedy
    arm scores candidates without a UNet pass, so its x is the UNet's rows alone (the LRM's are extra)."""
    series: dict[str, list] = {"plain": [(steering["plain"]["unet_evaluations_per_image"], steering["plain"]["gt"])]}
    for label, row in steering["arms"].items():
        name, scorer = label[:-1].rsplit(" (", 1)
        kind = "best-of-N" if name.startswith("best-of") else name.split(" ")[0]
        key = f"{kind} ({scorer}" + (", UNet rows only)" if kind == "greedy" and scorer == "lrm" else ")")
        series.setdefault(key, []).append((row["unet_evaluations_per_image"], row["mean"]))
    save_png(xy_chart(series, f"held-out GT vs sampling compute ({images} images)",
                      "denoiser (UNet or flow transformer) evaluations per image", "GT", thousands=False), path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default="20,40,60", help="optimizer steps at which each run is evaluated")
    p.add_argument("--method-stages", action="append", default=[], metavar="METHOD=S1,S2,...",
                   help="other stages for one method, e.g. ddpo=10,20,35 to spend about the same evaluations as SPO")
    p.add_argument("--eval-prompts", type=int, default=48)
    p.add_argument("--methods", default="spo,diffusion_dpo,ncp_dpo,ddpo",
                   help="any of spo, lpo, diffusion_dpo, ncp_dpo, ddpo, and spo_oracle (SPO with the ground truth as step scorer)")
    p.add_argument("--method-settings", action="append", default=[], metavar="METHOD=JSON",
                   help='training settings over WORLD_TRAIN_SETTINGS for one method, e.g. spo_oracle={"beta": 10}')
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--work", type=Path, default=Path("/tmp/spo_alignment_bench"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steering-budgets", default="", help="e.g. 4,8,16: the steering comparison at these budgets")
    p.add_argument("--steering-scorers", default="spm", help="spm and/or lrm")
    p.add_argument("--fk", default="potential=diff,lam=10,every=5", help="FK settings (best in bench/fk_sweep.py, training prompts)")
    p.add_argument("--skip-sampling", action="store_true", help="skip part 2 (the k = 4/5 resampler arms)")
    p.add_argument("--replot-steering", type=Path, metavar="JSON", help="only redraw alignment_steering.png from a result")
    p.add_argument("--world", choices=["unet", "flow"], default="unet",
                   help="flow: the world's rectified-flow model (training: spo, grpo, ddpo; the steering arms; no k = 4/5 "
                   "sampling arms); results go to *_flow.json/png")
    args = p.parse_args()
    flow = args.world == "flow"
    if flow:
        args.skip_sampling = True
        if args.methods == p.get_default("methods"):
            args.methods = "spo,grpo"
    if args.replot_steering:
        record = json.loads(args.replot_steering.read_text())
        steering = record["steering"]
        steering.setdefault("plain", {"gt": record["base"]["mean"], "unet_evaluations_per_image": 40.0})
        plot_steering(steering, record["eval_images"], args.out / f"alignment_steering{suffix(args)}.png")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = [int(v) for v in args.stages.split(",")]
    method_stages = {}
    for spec in args.method_stages:
        name, _, values = spec.partition("=")
        method_stages[name.strip()] = [int(v) for v in values.split(",")]
    method_settings = {}
    for spec in args.method_settings:
        name, _, values = spec.partition("=")
        method_settings[name.strip()] = json.loads(values)
    scorer = SPMScorer.from_path(SPM_PATH)
    pairs = heldout_eval_set(args.eval_prompts, 2)
    if args.world == "flow":
        from spo_core.world import load_flow_world_backend

        base = load_flow_world_backend()
    else:
        base = _fresh_backend()
    t0 = time.perf_counter()
    plain = sample_arm("base", base, pairs)
    print(f"base: {plain.stats.line()}", flush=True)

    training: dict[str, list[dict]] = {}
    for method in [m for m in args.methods.split(",") if m]:
        spent, seconds, lrm_spent, scorer_rows = [0], [0.0], [0], [0]
        training[method] = []
        # spo_oracle: SPO with the exact ground truth as its step scorer (GT is in [0, 1], so its
        # softmax gaps are small: threshold 0.01), the bound on what a better SPM could give here
        oracle = method == "spo_oracle"
        for i, steps in enumerate(method_stages.get(method, stages)):
            overrides = {**({"threshold": 0.01} if oracle else {}), **method_settings.get(method, {})}
            cfg = DemoConfig(out=args.work / (method + suffix(args)), method="spo" if oracle else method,
                             train_steps=steps, eval_prompts=args.eval_prompts, overrides=overrides, world=args.world)
            t = time.perf_counter()
            learner = WorldGroundTruthScorer() if oracle else world_scorer(method, scorer)
            lrm_rows = UNetCounter(learner.model.unet) if method == "lpo" else None
            scored = count_scorer_rows(learner)
            result = train_lora(cfg, learner, counter=spent, resume=i > 0)
            scorer_rows[0] += scored[0]
            seconds[0] += time.perf_counter() - t
            if lrm_rows is not None:
                lrm_spent[0] += lrm_rows.rows
                lrm_rows.close()
            arm = sample_arm(method, _merged_backend(result.lora_path, flow), pairs)
            row = {"steps": result.steps, "unet_evaluations": spent[0], "train_seconds": round(seconds[0], 1),
                   "scorer_rows": scorer_rows[0],  # candidates scored: SPO's each after a VAE decode, LPO's none
                   **arm.stats.as_dict(), "vs_base": paired_comparison(arm.gt, plain.gt)}
            if method == "lpo":  # the LRM's encoder passes (CFG: 2 rows per candidate), beside the UNet's
                row["lrm_encoder_evaluations"] = lrm_spent[0]
            training[method].append(row)
            print(f"{method} @ {steps} steps, {spent[0]:,} {'transformer' if flow else 'UNet'} evaluations: GT {arm.stats.mean:.3f} | vs base "
                  f"{row['vs_base']['mean_delta']:+.3f} (95% CI {row['vs_base']['ci95'][0]:+.3f} .. {row['vs_base']['ci95'][1]:+.3f}), "
                  f"higher on {row['vs_base']['beats']:.0%}, better by > 0.01 on {row['vs_base']['win']:.0%} | "
                  f"{row['train_seconds']:.0f}s of training so far",
                  flush=True)

    sampling, gts = {}, {}
    steering = steering_curve(base, pairs, plain, args) if args.steering_budgets else None
    # pools at SPO's training window (t <= 751) or at every step; greedy k = 5 in the window spends what
    # best-of-4 spends (160 UNet evaluations per image), k = 4 at every step 154: the equal-compute comparisons
    arms = () if args.skip_sampling else (
        ("plain", dict()), ("resampler greedy k=4", dict(k=4, policy="greedy")),
        ("resampler softmax k=4", dict(k=4, policy="softmax")), ("resampler greedy k=5", dict(k=5, policy="greedy")),
        ("resampler greedy k=4, every step", dict(k=4, policy="greedy", window=(0.0, 999.0))), ("best-of-4", dict(best_of=4)))
    for name, kw in arms:
        count = UNetCounter(base.pipe.unet)
        arm = sample_arm(name, base, pairs, scorer if kw else None, **kw)
        count.close()
        gts[name] = arm.gt
        sampling[name] = {**arm.stats.as_dict(), "seconds": arm.seconds, "unet_evaluations": count.rows,
                          "unet_evaluations_per_image": count.rows / len(pairs), "vs_base": paired_comparison(arm.gt, plain.gt)}
        print(f"{name}: {arm.stats.line()} | vs plain {sampling[name]['vs_base']['mean_delta']:+.3f} "
              f"| {count.rows / len(pairs):.0f} UNet evaluations per image, {arm.seconds:.0f}s", flush=True)
    for name in [n for n in sampling if n.startswith("resampler")]:
        c = sampling[name]["vs_best_of_4"] = paired_comparison(gts[name], gts["best-of-4"])
        print(f"{name} vs best-of-4: {c['mean_delta']:+.3f} (95% CI {c['ci95'][0]:+.3f} .. {c['ci95'][1]:+.3f}), "
              f"higher on {c['beats']:.0%}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    if training:
        series = {m: [(0.0, plain.stats.mean)] + [(r["unet_evaluations"], r["mean"]) for r in rows] for m, rows in training.items()}
        save_png(xy_chart(series, f"held-out GT preference vs training compute ({len(pairs)} images"
                          + (", the flow world)" if flow else ")"),
                          f"{'transformer' if flow else 'UNet'} image-evaluations spent in training", "GT"),
                 args.out / f"alignment_bench{suffix(args)}.png")
    record = {"world": args.world, "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__, "cuda": torch.cuda.is_available()},
              "eval_images": len(pairs), "stages": {m: method_stages.get(m, stages) for m in training},
              "train_settings": {m: {**(WORLD_FLOW_TRAIN_SETTINGS if flow else WORLD_TRAIN_SETTINGS)[m.replace("_oracle", "")], **({"threshold": 0.01} if m == "spo_oracle" else {}),
                                 **method_settings.get(m, {})} for m in training}, "base": plain.stats.as_dict(), "training": training,
              "sampling": sampling, "steering": steering, "seconds": time.perf_counter() - t0}
    (args.out / f"alignment_bench{suffix(args)}.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out / f'alignment_bench{suffix(args)}.json'}"
          + (f" and {args.out / f'alignment_bench{suffix(args)}.png'}" if training else ""))


if __name__ == "__main__":
    main()
