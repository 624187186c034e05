"""`spo demo`: the main job. SPO end to end on the embedded tiny world, on a CPU, in minutes.

    spo demo                 # ~5 min on 2 CPU cores: base -> SPO LoRA -> resampler, measured
    spo demo --quick         # under 3 min: the same path, smaller
    spo demo --method ddpo   # or lpo, diffusion_dpo, ncp_dpo
    spo demo --flow          # the world's rectified-flow model: steering vs best-of-N (--quick: smaller)

Writes OUT/before_after.png, OUT/train/ (the LoRA in webui/kohya format, curves, log),
OUT/report.json and OUT/report.md, and prints the report.
"""

from __future__ import annotations

import argparse

from .common import add_no_progress, alias


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="train and measure an SPO LoRA on the embedded tiny world (CPU, minutes)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CI-sized run (under 3 min on 2 cores)")
    p.add_argument("--output-dir", dest="output_dir", default="spo_demo", help="output folder (default: spo_demo)")
    alias(p, "--out", dest="output_dir")
    p.add_argument("--method", default="spo", choices=["spo", "lpo", "diffusion_dpo", "ncp_dpo", "ddpo", "grpo"],
                   help="what to train (lpo learns from the world's latent reward model, the others from its SPM or GT; "
                   "--flow: spo, grpo or ddpo)")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="training steps (default: 60; --quick: 32; "
                   "--flow: 20, --quick 8, 0 = no training)")
    alias(p, "--steps", dest="max_steps", type=int)
    p.add_argument("--eval-prompts", type=int, help="held-out prompts evaluated, 2 seeds each (default: 48; --quick: 24)")
    p.add_argument("--k", type=int, default=4, help="resampler candidates per step in the evaluation (1: skip it); "
                   "--flow: the steering budget N (candidates, particles, best-of)")
    p.add_argument("--flow", action="store_true",
                   help="the world's rectified-flow model instead: plain sampling vs best-of-N, the per-step resampler "
                   "and FK steering at equal evaluations, and a LoRA trained on its SDE steps (--method spo/grpo/ddpo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    add_no_progress(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """The UNet world's demo, or (--flow) the flow model's: the same flags, each its own config and report."""
    from pathlib import Path

    from ..errors import Cancelled
    from ..progress import TqdmProgress

    if args.flow:
        from ..world.flow_demo import FlowDemoConfig as Config, flow_report_markdown as markdown, run_flow_demo as run_it

        kw = {"out": Path(args.output_dir if args.output_dir != "spo_demo" else "spo_demo_flow"), "budget": args.k}
    else:
        from ..world.demo import DemoConfig as Config, report_markdown as markdown, run_demo as run_it

        kw = {"out": Path(args.output_dir), "resampler_k": args.k}
    kw.update(method=args.method, seed=args.seed, threads=args.threads)
    if args.max_steps is not None:
        kw["train_steps"] = args.max_steps
    if args.eval_prompts is not None:
        kw["eval_prompts"] = args.eval_prompts
    cfg = Config.quick(**kw) if args.quick else Config(**kw)
    bar = TqdmProgress(disable=args.no_progress, leave=False)
    try:
        report = run_it(cfg, progress=bar)
    except Cancelled as exc:
        print(str(exc))
        return 130
    finally:
        bar.close()
    print(markdown(report))
    print(f"wrote {cfg.out / 'report.json'}, {cfg.out / 'report.md'} and {report['grid']}")
    return 0
