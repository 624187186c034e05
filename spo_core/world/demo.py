"""`spo demo`: SPO end to end on the embedded world, measured by its exact ground truth.

1. sample the shipped base model on held-out prompts (object pairs never seen together in
   training) with fixed seeds, and score the images with the ground-truth preference;
2. train an SPO LoRA (or Diffusion-DPO / NCP-DPO / DDPO) with the shipped step-aware
   preference model, through the same trainer the UIs use;
3. merge the written webui/kohya-format LoRA file into a fresh copy of the base model and
   sample the same prompts with the same initial noise, plainly and with the per-step
   resampler (k candidates per step, SPM-scored, best kept); also load the file with diffusers'
   own `load_lora_weights` and check that it draws the same pictures;
4. report the ground truth before/after (mean with a 95% bootstrap interval, paired win rate,
   components), and write a before/after grid, the training curves, report.json and report.md.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, FileMissingError
from ..progress import ProgressFn
from ..training.config import PRESETS, SAMPLING_METHODS, auto_preset
from .dataset import heldout_eval_set, train_prompts
from .evaluate import GTStats, gt_stats
from .preference import ground_truth

log = logging.getLogger(__name__)

METHODS = ("spo", "diffusion_dpo", "ncp_dpo", "ddpo", "grpo")


@dataclass
class DemoConfig:
    """The demo's settings; `quick()` is the CI-sized run."""

    out: Path = Path("spo_demo")
    method: str = "spo"
    train_steps: int = 60
    eval_prompts: int = 48
    seeds_per_prompt: int = 2
    resampler_k: int = 4
    train_prompts: int = 256
    seed: int = 0
    threads: int | None = None
    grid_rows: int = 12
    overrides: dict = field(default_factory=dict)  # extra TrainConfig settings
    world: str = "unet"  # "flow": train the world's rectified-flow model (spo, ddpo, grpo)

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        return cls(**{"train_steps": 32, "eval_prompts": 24, "grid_rows": 8, **kw})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("train_steps", "eval_prompts", "seeds_per_prompt", "train_prompts", "grid_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.resampler_k < 1:
            raise ConfigError(f"resampler_k must be at least 1 (1 skips the resampler), got {self.resampler_k}")


# training settings for the tiny world, by method (the SD presets are for 512px models)
# each method's settings on the world: its `<method>-world` preset (spo_core.training.config), less what
# the demo sets itself (the scorer is passed in, the prompts are the demo's own sample)
WORLD_TRAIN_SETTINGS = {
    method: {k: v for k, v in PRESETS[auto_preset(method, None, world=True)].items()
             if k not in ("method", "scorer", "scorer_weights", "validation_prompts")}
    for method in ("spo", "lpo", "diffusion_dpo", "ncp_dpo", "ddpo", "grpo")
}
# the same for the world's rectified-flow model (`<method>-world-flow`)
WORLD_FLOW_TRAIN_SETTINGS = {
    method: {k: v for k, v in PRESETS[auto_preset(method, None, world=True, flow=True)].items()
             if k not in ("method", "scorer", "scorer_weights", "validation_prompts")}
    for method in ("spo", "ddpo", "grpo")
}


@dataclass
class Arm:
    """One way of sampling the eval set, with its images and ground truth."""

    name: str
    images: torch.Tensor
    gt: torch.Tensor
    stats: GTStats
    seconds: float
    evaluations: int


def paired_comparison(after: torch.Tensor, before: torch.Tensor, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean difference with a 95% paired bootstrap interval; win/tie/loss rates (ties: |d| < 0.01,
    a clearly visible change) and `beats`, the share of pairs where `after` is higher at all."""
    d = (after - before).double().numpy()
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(len(d), size=(n_boot, len(d)))].mean(1)
    wins, losses = float((d > 0.01).mean()), float((d < -0.01).mean())
    return {"mean_delta": float(d.mean()), "ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
            "win": wins, "tie": 1 - wins - losses, "loss": losses, "beats": float((d > 0).mean()),
            "win_rate_decided": wins / (wins + losses) if wins + losses > 0 else 0.5}


def _eval_set(cfg: DemoConfig) -> list[tuple[str, int]]:
    return heldout_eval_set(cfg.eval_prompts, cfg.seeds_per_prompt, seed=cfg.seed)


def sample_arm(name: str, backend, pairs: Sequence[tuple[str, int]], scorer=None, k: int = 1, policy: str = "greedy",
               best_of: int = 0, chunk: int = 32, progress: ProgressFn | None = None,
               window: tuple[float, float] | None = None, config=None) -> Arm:
    """Sample every (prompt, seed) of `pairs` in chunks (the chunk's first seed seeds its noise,
    so every arm starts from the same initial noise): plainly, with the per-step resampler
    (k > 1, `policy`; pools at the timesteps in `window`, SPO's t <= 751 by default), FK steering
    or any other full `config` (a ResamplerConfig), or best-of-N (`best_of` > 1: N full samples, the
    best final image kept)."""
    from ..progress import Reporter
    from ..sampling import ResamplerConfig

    rep = Reporter(f"sampling: {name}", len(pairs), progress)
    images, evals, t0 = [], 0, time.perf_counter()
    if config is None:
        config = ResamplerConfig(k=k, policy=policy, eta=1.0, **({"window": window} if window is not None else {}))
    pooled = config.k > 1 or best_of > 1
    for i in range(0, len(pairs), chunk):
        part = pairs[i:i + chunk]
        out = backend.sample([p for p, _ in part], steps=20, guidance_scale=5.0, eta=1.0, seed=part[0][1],
                             scorer=scorer if pooled else None, config=config, best_of=best_of)
        images.append(out.images.float().cpu())
        evals += int(out.result.evaluations)
        rep.update(min(i + chunk, len(pairs)))
    x = torch.cat(images)
    caps = [p for p, _ in pairs]
    return Arm(name, x, ground_truth(x, caps), gt_stats(x, caps), time.perf_counter() - t0, evals)


def _fresh_backend(flow: bool = False):
    """The world's base model (a DiffusersBackend), or its rectified-flow model (a FlowBackend)."""
    if flow:
        from . import load_flow_world_backend

        return load_flow_world_backend()
    from ..backends.diffusers_backend import DiffusersBackend
    from . import load_world_pipeline

    return DiffusersBackend.from_pipeline(load_world_pipeline())


def _merged_backend(lora_path: Path, flow: bool = False):
    """A fresh base model with the LoRA file merged into its weights, as a WebUI/ComfyUI user loads it."""
    from ..lora import merge_into_modules, read_lora

    backend = _fresh_backend(flow)
    lora = read_lora(lora_path, arch=backend.module_table())
    lora.require_clean(what=str(lora_path))
    if flow:
        merge_into_modules({"transformer": backend.transformer}, lora, 1.0)
    else:
        merge_into_modules({"unet": backend.pipe.unet, "te1": backend.pipe.text_encoder}, lora, 1.0)
    return backend


def diffusers_loader_check(lora_path: Path, reference: torch.Tensor, pairs: Sequence[tuple[str, int]]) -> dict:
    """Load the kohya/webui LoRA file with diffusers' own `load_lora_weights` and sample the
    first chunk of the eval set: the pictures must match those of our merge."""
    from ..errors import MissingDependencyError

    import diffusers

    backend = _fresh_backend()
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # not "no LoRA keys for the text encoder": this LoRA has none
    try:
        backend.pipe.load_lora_weights(str(lora_path), adapter_name="spo")
    except (ImportError, ValueError, MissingDependencyError) as exc:  # peft missing, or an old diffusers
        return {"ok": None, "skipped": f"{type(exc).__name__}: {exc}"}
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    part = list(pairs[:min(len(pairs), 32)])
    out = backend.sample([p for p, _ in part], steps=20, guidance_scale=5.0, eta=1.0, seed=part[0][1])
    diff = float((out.images.float().cpu() - reference[:len(part)]).abs().max())
    return {"ok": diff < 0.02, "max_abs_pixel_diff": diff, "images": len(part)}


_DPO_PAIRS: dict = {}


class UNetCounter:
    """Counts UNet image-evaluations (batch rows of every forward; CFG counts 2 per image) on a
    pipeline's UNet: the compute every method spends, sampling and training alike."""

    def __init__(self, unet: torch.nn.Module):
        self.rows = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # a UNet, or a flow transformer
        self.rows += int(sample.shape[0])

    def close(self) -> None:
        self._handle.remove()


def train_lora(cfg: DemoConfig, scorer, progress: ProgressFn | None = None, cancel=None, counter: list | None = None,
               resume: bool = False):
    """Train the LoRA on the base model through the shared trainer; returns its TrainResult.

    SPO learns from `scorer` (the shipped SPM), LPO from the shipped latent reward model (`world_scorer`
    gives each method its own), GRPO from `scorer` on its final images; DDPO's reward and the DPO methods'
    pair labels are the exact ground truth (`WorldGroundTruthScorer`). UNet (flow: transformer)
    evaluations spent (including the DPO methods' offline pair sampling) are added to `counter[0]` when
    given. `cfg.world == "flow"` trains the world's rectified-flow model."""
    from ..training import DiffusersTrainingHost, FlowTrainingHost, train
    from ..training.config import TrainConfig
    from .gt_scorer import WorldGroundTruthScorer

    flow = cfg.world == "flow"
    table = WORLD_FLOW_TRAIN_SETTINGS if flow else WORLD_TRAIN_SETTINGS
    if cfg.method not in table:
        raise ConfigError(f"no world settings for {cfg.method} on the {'flow' if flow else 'UNet'} model ({', '.join(table)})")
    settings = {**table[cfg.method], **cfg.overrides}
    prompts = train_prompts()
    rng = np.random.default_rng(cfg.seed)
    chosen = [prompts[i] for i in rng.permutation(len(prompts))[:cfg.train_prompts]]
    tc = TrainConfig(**{"method": cfg.method, "output_dir": str(cfg.out / "train"), "output_name": f"world_{cfg.method}_lora",
                        "max_steps": cfg.train_steps, "seed": cfg.seed, "overwrite": not resume,
                        "resume": "auto" if resume else None, "checkpoint_every": 0, "validate_every": -1,
                        "lora_format": "webui", "log_every": 1, "keep_checkpoints": 1, **settings})
    backend = _fresh_backend(flow)
    count = UNetCounter(backend.transformer if flow else backend.pipe.unet)
    try:
        pairs = None
        if cfg.method in ("diffusion_dpo", "ncp_dpo"):
            key = (tuple(chosen), cfg.seed)  # sampled once per process, reused by resumed runs and other methods
            if key in _DPO_PAIRS:
                pairs, rows = _DPO_PAIRS[key]
                if not resume:  # a new run is charged for its pairs' sampling, as if it had drawn them
                    count.rows += rows
            else:
                before = count.rows
                pairs = preference_pairs_for_dpo(backend.pipe, chosen, cfg.seed, progress)
                _DPO_PAIRS[key] = (pairs, count.rows - before)
        reward = WorldGroundTruthScorer() if cfg.method == "ddpo" else scorer
        host = FlowTrainingHost(backend, model_name="spo-world-flow") if flow else \
            DiffusersTrainingHost(backend, model_name="spo-world-base")
        return train(tc, host, reward if cfg.method in SAMPLING_METHODS else None, prompts=chosen, pairs=pairs,
                     progress=progress, cancel=cancel)
    finally:
        count.close()
        if counter is not None:
            counter[0] += count.rows


def world_scorer(method: str, spm):
    """The scorer a method learns from on the world: LPO the shipped latent reward model, the others the SPM."""
    if method != "lpo":
        return spm
    from ..model_names import WORLD_LRM
    from ..scorers import load_scorer

    if not WORLD_LRM.is_file():
        raise FileMissingError(f"the embedded world's latent reward model is missing ({WORLD_LRM}); rebuild it with "
                               "python -m spo_core.world.train_lrm")
    return load_scorer("lrm", str(WORLD_LRM))


def preference_pairs_for_dpo(pipe, prompts: Sequence[str], seed: int, progress: ProgressFn | None = None):
    """Offline pairs for Diffusion-DPO / NCP-DPO: two base samples per prompt, the one with the
    higher ground truth is the winner (ties go to the first)."""
    from ..training.data import PairRecord
    from ..training.validation import to_pil
    from .evaluate import sample_images

    caps = [p for p in prompts for _ in range(2)]
    imgs = sample_images(pipe, caps, [seed * 7919 + i for i in range(2 * len(prompts))], progress=progress)
    gt = ground_truth(imgs, caps).reshape(-1, 2)
    imgs = imgs.reshape(len(prompts), 2, *imgs.shape[1:])

    def png(img: torch.Tensor) -> bytes:
        buf = io.BytesIO()
        to_pil(img).save(buf, format="PNG")
        return buf.getvalue()

    records = []
    for i, p in enumerate(prompts):
        w = 0 if gt[i, 0] >= gt[i, 1] else 1
        records.append(PairRecord(p, png(imgs[i, w]), png(imgs[i, 1 - w])))
    return records


def run_demo(cfg: DemoConfig, progress: ProgressFn | None = None, cancel=None) -> dict:
    """Run the demo; returns the report (also written to `cfg.out/report.json` and report.md)."""
    from ..plots import save_png
    from ..scorers.spm import SPMScorer
    from ..training.validation import columns_grid
    from .train_spm import SPM_PATH

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not SPM_PATH.is_file():
        raise FileMissingError(f"the embedded world's preference model is missing ({SPM_PATH}); rebuild it with "
                               "python -m spo_core.world.train_spm")
    cfg.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    scorer = SPMScorer.from_path(SPM_PATH)
    pairs = _eval_set(cfg)
    captions = [p for p, _ in pairs]
    base = _fresh_backend()
    arms = [sample_arm("base", base, pairs, progress=progress)]
    log.info("base: %s", arms[0].stats.line())

    t0 = time.perf_counter()
    result = train_lora(cfg, world_scorer(cfg.method, scorer), progress, cancel)
    train_s = time.perf_counter() - t0

    tuned = _merged_backend(result.lora_path)
    arms.append(sample_arm(f"base + {cfg.method} LoRA", tuned, pairs, progress=progress))
    if cfg.resampler_k > 1:
        arms.append(sample_arm(f"base + resampler k={cfg.resampler_k}", base, pairs, scorer, cfg.resampler_k, progress=progress))
        arms.append(sample_arm(f"base + {cfg.method} LoRA + resampler k={cfg.resampler_k}", tuned, pairs, scorer,
                               cfg.resampler_k, progress=progress))
    loader = diffusers_loader_check(result.lora_path, arms[1].images, pairs)

    rows = list(range(0, len(pairs), max(1, len(pairs) // cfg.grid_rows)))[:cfg.grid_rows]
    labels = [f"{captions[i]} | GT " + " / ".join(f"{float(a.gt[i]):.2f}" for a in arms) for i in rows]
    grid = columns_grid({a.name.replace("base + ", "+ "): a.images[rows] for a in arms}, labels,
                        f"held-out prompts, same initial noise per row: {cfg.method} after {result.steps} steps", tile=96)
    grid_path = Path(save_png(grid, cfg.out / "before_after.png"))

    report = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "eval_set": {"prompts": cfg.eval_prompts, "seeds_per_prompt": cfg.seeds_per_prompt, "images": len(pairs),
                     "heldout": True},
        "arms": {a.name: {**a.stats.as_dict(), "seconds": a.seconds, "denoiser_evaluations": a.evaluations} for a in arms},
        "lora_vs_base": paired_comparison(arms[1].gt, arms[0].gt),
        "training": {"steps": result.steps, "seconds": train_s, "lora": str(result.lora_path),
                     "curves": str(result.curves_path) if result.curves_path else None, "log": str(result.log_path),
                     "last_metrics": result.metrics},
        "webui_lora_in_diffusers": loader,
        "grid": str(grid_path),
        "seconds": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
    }
    if cfg.resampler_k > 1:
        report["resampler_vs_base"] = paired_comparison(arms[2].gt, arms[0].gt)
        report["lora_resampler_vs_base"] = paired_comparison(arms[3].gt, arms[0].gt)
    (cfg.out / "report.json").write_text(json.dumps(report, indent=1))
    (cfg.out / "report.md").write_text(report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    """The report as a short Markdown table (also what `spo demo` prints)."""
    lines = ["| arm | GT mean | good (>=0.9) | clearly wrong (<0.6) | colour | shape | relation | quality | style | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in report["arms"].items():
        lines.append(f"| {name} | {a['mean']:.3f} | {a['frac_good']:.0%} | {a['frac_wrong']:.0%} | {a['colour']:.3f} | "
                     f"{a['shape']:.3f} | {a['relation']:.3f} | {a['quality']:.3f} | {a.get('style', float('nan')):.3f} | "
                     f"{a['seconds']:.0f} |")
    c = report["lora_vs_base"]
    lines += ["", f"LoRA vs base on {report['eval_set']['images']} held-out images: mean GT change {c['mean_delta']:+.3f} "
              f"(95% CI {c['ci95'][0]:+.3f} .. {c['ci95'][1]:+.3f}); higher on {c['beats']:.0%}; by more than 0.01: "
              f"better {c['win']:.0%}, same {c['tie']:.0%}, worse {c['loss']:.0%}"]
    for key, what in (("resampler_vs_base", "resampler on the base model"), ("lora_resampler_vs_base", "LoRA + resampler")):
        if key in report:
            c = report[key]
            lines.append(f"{what} vs base: {c['mean_delta']:+.3f} (95% CI {c['ci95'][0]:+.3f} .. {c['ci95'][1]:+.3f}), "
                         f"better {c['win']:.0%}, worse {c['loss']:.0%}")
    t = report["training"]
    chk = report["webui_lora_in_diffusers"]
    check = (f"diffusers' load_lora_weights draws the same pictures (max pixel difference {chk['max_abs_pixel_diff']:.4f})"
             if chk.get("ok") else f"diffusers' loader check: {chk}")
    lines += [f"training: {t['steps']} steps in {t['seconds']:.0f}s; LoRA (webui/kohya format) {t['lora']}; {check}",
              f"grid: {report['grid']}; curves: {t['curves']}; total {report['seconds']:.0f}s on {report['threads']} threads"]
    return "\n".join(lines) + "\n"
