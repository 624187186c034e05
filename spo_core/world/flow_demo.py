"""`spo demo --flow`: preference training and inference-time steering on the world's rectified-flow model, measured.

The flow model (`weights/flow`, a tiny SD3Transformer2DModel) samples the held-out prompts with
ComfyUI's RF ancestral step, plainly and steered by the world's step-aware preference model at one
equal budget of N denoiser evaluations per step: best-of-N, the greedy per-step resampler with
k = N, and FK steering with N particles. Then a LoRA trained with SPO (or GRPO, DDPO) on the model's
SDE transitions (its `<method>-world-flow` preset, the world's SPM and training prompts) is merged from
its kohya file and samples the same images plainly. Every arm starts from the same initial noise per
image; each is compared with plain sampling (and the steering arms with best-of-N) image by image
(95% bootstrap CIs).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..progress import ProgressFn
from .dataset import heldout_eval_set
from .demo import paired_comparison, sample_arm

log = logging.getLogger(__name__)

# FK on the world (bench/fk_sweep.py chose these on the UNet world's training prompts); the flow
# model's first step is at t = 1000 (sigma 1), so its windows end at 1000
FLOW_FK = dict(potential="diff", lam=10.0, score_every=5, window=(0.0, 1000.0))


@dataclass
class FlowDemoConfig:
    out: Path = Path("spo_demo_flow")
    eval_prompts: int = 48
    seeds_per_prompt: int = 2
    budget: int = 4  # N: candidates, particles and best-of samples
    seed: int = 0
    threads: int | None = None
    grid_rows: int = 12
    method: str = "spo"  # trained on the flow model: spo, grpo or ddpo
    train_steps: int = 20  # 0: no training arm

    @classmethod
    def quick(cls, **kw) -> "FlowDemoConfig":
        return cls(**{"eval_prompts": 12, "grid_rows": 8, "train_steps": 8, **kw})

    def validate(self) -> None:
        from .demo import WORLD_FLOW_TRAIN_SETTINGS

        for name in ("eval_prompts", "seeds_per_prompt", "grid_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.train_steps < 0:
            raise ConfigError(f"train_steps must be >= 0 (0: no training), got {self.train_steps}")
        if self.method not in WORLD_FLOW_TRAIN_SETTINGS:
            raise ConfigError(f"the flow model trains with {', '.join(WORLD_FLOW_TRAIN_SETTINGS)}, not {self.method!r} "
                              "(LPO and the DPO methods need a UNet)")
        if self.budget < 2:
            raise ConfigError(f"the steering budget must be at least 2 (1 is plain sampling), got {self.budget}")


def flow_arms(n: int) -> dict[str, dict]:
    """The equal-compute arms at budget n (sample_arm keyword arguments)."""
    from ..sampling import ResamplerConfig

    return {f"best-of-{n}": dict(best_of=n),
            f"greedy k={n}, every step": dict(config=ResamplerConfig(k=n, policy="greedy", window=(0.0, 1000.0))),
            f"FK {n} particles": dict(config=ResamplerConfig(k=n, policy="fk", **FLOW_FK))}


def run_flow_demo(cfg: FlowDemoConfig, progress: ProgressFn | None = None) -> dict:
    """Run the flow demo; returns the report (also written to `cfg.out/report.json` and report.md)."""
    from ..plots import save_png
    from ..scorers.spm import SPMScorer
    from ..training.validation import columns_grid
    from . import load_flow_world_backend
    from .train_spm import SPM_PATH

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    backend = load_flow_world_backend()
    scorer = SPMScorer.from_path(SPM_PATH)
    pairs = heldout_eval_set(cfg.eval_prompts, cfg.seeds_per_prompt, seed=cfg.seed)
    captions = [p for p, _ in pairs]
    arms = [sample_arm("plain", backend, pairs, progress=progress)]
    for name, kw in flow_arms(cfg.budget).items():
        arms.append(sample_arm(name, backend, pairs, scorer, progress=progress, **kw))
    plain, best = arms[0], arms[1]
    training = None
    if cfg.train_steps:
        from .demo import DemoConfig, _merged_backend, train_lora

        spent, t0 = [0], time.perf_counter()
        result = train_lora(DemoConfig(out=cfg.out, method=cfg.method, train_steps=cfg.train_steps, seed=cfg.seed,
                                       world="flow"), scorer, progress=progress, counter=spent)
        training = {"method": cfg.method, "steps": result.steps, "lora": str(result.lora_path),
                    "transformer_evaluations": spent[0], "seconds": time.perf_counter() - t0,
                    "curves": str(result.curves_path) if result.curves_path else None}
        arms.append(sample_arm(f"{cfg.method} LoRA ({result.steps} steps)", _merged_backend(result.lora_path, flow=True),
                               pairs, progress=progress))
    rows = list(range(0, len(pairs), max(1, len(pairs) // cfg.grid_rows)))[:cfg.grid_rows]
    labels = [f"{captions[i]} | GT " + " / ".join(f"{float(a.gt[i]):.2f}" for a in arms) for i in rows]
    grid = columns_grid({a.name: a.images[rows] for a in arms}, labels,
                        f"world flow model (SD3 transformer), held-out prompts, same noise per row; budget {cfg.budget}",
                        tile=96)
    grid_path = Path(save_png(grid, cfg.out / "flow_steering.png"))
    report = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "model": "world-flow (SD3Transformer2DModel, RF ancestral step, 20 steps, CFG 5)",
        "eval_set": {"prompts": cfg.eval_prompts, "seeds_per_prompt": cfg.seeds_per_prompt, "images": len(pairs),
                     "heldout": True},
        "arms": {a.name: {**a.stats.as_dict(), "seconds": a.seconds,
                          "denoiser_evaluations_per_image": a.evaluations / len(pairs),
                          "vs_plain": paired_comparison(a.gt, plain.gt),
                          **({"vs_best_of_n": paired_comparison(a.gt, best.gt)}
                             if a not in (plain, best) and a.evaluations > plain.evaluations else {})}
                 for a in arms},
        "training": training,
        "fk": {k: list(v) if isinstance(v, tuple) else v for k, v in FLOW_FK.items()},
        "grid": str(grid_path),
        "seconds": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
    }
    (cfg.out / "report.json").write_text(json.dumps(report, indent=1))
    (cfg.out / "report.md").write_text(flow_report_markdown(report))
    return report


def flow_report_markdown(report: dict) -> str:
    lines = [f"{report['model']}; {report['eval_set']['images']} held-out images",
             "", "| arm | GT mean | good (>=0.9) | denoiser evaluations per image | vs plain (95% CI) | vs best-of-N (95% CI) | s |",
             "|---|---|---|---|---|---|---|"]

    def ci(c):
        return f"{c['mean_delta']:+.3f} ({c['ci95'][0]:+.3f} .. {c['ci95'][1]:+.3f})"

    for name, a in report["arms"].items():
        vs_best = ci(a["vs_best_of_n"]) if "vs_best_of_n" in a else ""
        lines.append(f"| {name} | {a['mean']:.3f} | {a['frac_good']:.0%} | {a['denoiser_evaluations_per_image']:.0f} | "
                     f"{ci(a['vs_plain']) if name != 'plain' else ''} | {vs_best} | {a['seconds']:.0f} |")
    t = report.get("training")
    if t:
        lines += ["", f"{t['method']} LoRA: {t['steps']} steps on the flow model's SDE transitions, "
                  f"{t['transformer_evaluations']:,} transformer evaluations of training, {t['seconds']:.0f}s; "
                  f"sampled plainly from its kohya file ({t['lora']})"]
    lines += ["", f"grid: {report['grid']}; total {report['seconds']:.0f}s on {report['threads']} threads"]
    return "\n".join(lines) + "\n"
