"""The trainer's settings: one flat dataclass, presets of the released configs, TOML/JSON files,
and the mapping to command-line flags (every field is also a `--flag`).

Defaults are SPO's SD1.5 settings where a field has one (20 DDIM steps, eta 1, CFG 5, k 4,
threshold 0.3, beta 10, clamp 0.1, rank 4, AdamW lr 6e-5, weight decay 1e-4, grad clip 1).
Method-dependent defaults (beta, learning rate) are filled by `resolved()` when left unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError, FileMissingError

METHODS = ("spo", "lpo", "diffusion_dpo", "ncp_dpo", "ddpo", "grpo")
STEPWISE_METHODS = ("spo", "lpo")  # pairs of transitions from shared states, sampled with the current policy
SAMPLING_METHODS = ("spo", "lpo", "ddpo", "grpo")  # train on prompts and a scorer (the others on offline pairs)
FLOW_METHODS = ("spo", "ddpo", "grpo")  # what trains on rectified-flow models (SDE/CPS transitions)
FLOW_STEPS_TRAINED = ("sde", "cps", "rf_ancestral")
METHOD_ALIASES = {"dpo": "diffusion_dpo", "diffusion-dpo": "diffusion_dpo", "ncp": "ncp_dpo", "ncp-dpo": "ncp_dpo",
                  "mspo": "spo", "flow-grpo": "grpo", "flow_grpo": "grpo"}
PRECISIONS = ("no", "fp16", "bf16")


def _f(default, help: str, group: str = "general", **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, "group": group, **kw})
    return field(default=default, metadata={"help": help, "group": group, **kw})


@dataclass
class TrainConfig:
    # -- what and where ---------------------------------------------------------------------
    method: str = _f("spo", "spo, lpo (SPO's loop scored by a latent reward model), diffusion_dpo (alias dpo), "
                     "ncp_dpo (alias ncp), ddpo or grpo (Flow-GRPO; UNet models too)",
                     choices=METHODS + tuple(METHOD_ALIASES))
    preset: str | None = _f(None, "preset applied before the other settings: " + "{presets}")
    output_dir: str = _f("spo_output", "folder for the LoRA, checkpoints, log, curves and validation grids")
    output_name: str = _f("spo_lora", "file name (without .safetensors) of the trained LoRA")
    max_steps: int = _f(1000, "optimizer steps to train")
    seed: int = _f(42, "seed of every random draw (init, sampling, noise, data order)")
    overwrite: bool = _f(False, "replace an existing output LoRA, log and checkpoints")
    resume: str | None = _f(None, "'auto' (latest checkpoint in output_dir) or a checkpoint folder")
    # -- model (the CLI and standalone app; hosts pass their own model) ---------------------------
    model: str | None = _f(None, "diffusers model folder or single-file checkpoint (.safetensors/.ckpt)", "model")
    arch: str | None = _f(None, "architecture of a single-file checkpoint: sd15, sd2 or sdxl (default: detected)", "model")
    vae: str | None = _f(None, "another VAE (folder or file), e.g. SDXL's fp16-fix VAE", "model")
    device: str | None = _f(None, "cuda, cuda:1, mps or cpu (default: cuda when available)", "model")
    model_dtype: str = _f("auto", "dtype of the model weights: auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16", "model",
                          choices=("auto", "fp32", "fp16", "bf16"))
    # -- data -------------------------------------------------------------------------------
    prompts: str | None = _f(None, "prompt file: .txt (one per line), .json list, .jsonl, or SPO's 4k-prompts JSON", "data")
    prompt_list: list = _f([], "prompts given inline (used when no prompt file)", "data")
    pairs: str | None = _f(None, "DPO/NCP pairs: a folder, or a JSONL/CSV/parquet of prompt, winner, loser", "data")
    height: int | None = _f(None, "image height (default: the model's)", "data")
    width: int | None = _f(None, "image width (default: the model's)", "data")
    negative_prompt: str = _f("", "negative prompt of CFG", "data")
    cache_latents: bool = _f(True, "encode the DPO/NCP images once and cache the latents in output_dir", "data")
    # -- sampling (SPO, DDPO) -------------------------------------------------------------------
    steps: int = _f(20, "DDIM steps of the sampler", "sampling")
    eta: float = _f(1.0, "DDIM eta (> 0: SPO and DDPO need stochastic steps)", "sampling")
    guidance_scale: float = _f(5.0, "CFG scale, in sampling and inside the training forward", "sampling")
    sample_batch_size: int = _f(2, "prompts per sampling round (per process)", "sampling")
    k: int = _f(4, "SPO pool size: candidates drawn from each shared x_t", "sampling")
    inner_steps: int = _f(0, "SPO multi-step (SDXL form): steps each candidate runs before scoring (3 for SDXL)", "sampling")
    threshold: float = _f(0.3, "SPO: keep a pair when the 2-way softmax gap of its scores exceeds this", "sampling")
    threshold_max: float | None = _f(None, "SPO/LPO: a dynamic threshold rising from `threshold` at the least noisy step to "
                                     "this at the noisiest, following the sampler's noise std (LPO: 0.35 -> 0.5 SD1.5, "
                                     "0.45 -> 0.6 SDXL)", "sampling")
    auto_threshold: bool | None = _f(None, "SPO: calibrate the threshold from the first sampling round (the median pool gap, "
                                     "so half of the pools make pairs); default: only for scorers whose scores are not on "
                                     "SPO's scale (jpeg_*, aesthetic)", "sampling")
    max_train_t: float = _f(751.0, "SPO: train transitions whose parent timestep is <= this (SPO: 751; flow models: "
                            "1000 * sigma; their presets pool every step, 1000)", "sampling")
    min_train_t: float = _f(0.0, "SPO: ... and >= this", "sampling")
    flow_step: str = _f("sde", "flow models: the stochastic step of the rollouts: sde (Flow-GRPO), cps (coefficients-"
                        "preserving) or rf_ancestral (ComfyUI's euler_ancestral)", "sampling", choices=FLOW_STEPS_TRAINED)
    noise_level: float = _f(0.7, "flow models: the step's noise level (Flow-GRPO's a: 0.7 SD3.5, 0.9 Flux; "
                            "rf_ancestral: its eta)", "sampling")
    scorer: str = _f("spm", "scorer name (spm, pickscore, hpsv2, aesthetic, clip, jpeg_compressibility, ...)", "sampling")
    scorer_weights: str | None = _f(None, "scorer weights file or folder ('world': the embedded world's SPM)", "sampling")
    scorer_options: dict = _f({}, "extra scorer options (TOML table / JSON object)", "sampling")
    # -- objective ----------------------------------------------------------------------------
    beta: float | None = _f(None, "DPO beta (default: SPO 10, LPO 500, Diffusion-DPO and NCP 2500); GRPO: the KL "
                            "coefficient (default 0.04; 0 = no reference pass)", "objective")
    clip_eps: float = _f(0.1, "SPO: clamp of the policy/reference ratio to [1-eps, 1+eps]", "objective")
    dpo_loss: str = _f("sigmoid", "Diffusion-DPO loss: sigmoid, hinge or ipo", "objective", choices=("sigmoid", "hinge", "ipo"))
    ncp_variant: str = _f("dpo", "NCP: dpo, cpo (no reference) or sft (winners only)", "objective", choices=("dpo", "cpo", "sft"))
    ncp_features: str = _f("down", "NCP features: 'down' (last down block) or 'mid' (mid block) of the base UNet", "objective",
                           choices=("down", "mid"))
    ddpo_clip_range: float = _f(1e-4, "DDPO and GRPO: PPO clip range of the importance ratio", "objective")
    ddpo_adv_clip: float = _f(5.0, "DDPO and GRPO: advantages are clipped to +-this", "objective")
    ddpo_buffer_size: int = _f(32, "DDPO: rewards kept per prompt for advantage normalization (0: batch statistics)", "objective")
    ddpo_min_count: int = _f(16, "DDPO: rewards a prompt needs before its own statistics are used", "objective")
    ddpo_samples_per_prompt: int = _f(2, "DDPO: images sampled per prompt in a round", "objective")
    ddpo_timestep_fraction: float = _f(1.0, "DDPO: fraction of each trajectory's steps trained", "objective")
    group_size: int = _f(8, "GRPO: images per prompt in a round; each is scored against its group (Flow-GRPO: 24)",
                         "objective")
    grpo_global_std: bool = _f(True, "GRPO: divide advantages by the std of every reward of the round (Flow-GRPO's "
                               "global_std) instead of the prompt's own", "objective")
    grpo_timestep_fraction: float = _f(0.99, "GRPO: train the first int(steps * this) steps of each trajectory "
                                       "(Flow-GRPO: 0.99, so 9 of 10)", "objective")
    # -- LoRA ---------------------------------------------------------------------------------
    rank: int = _f(4, "LoRA rank", "lora")
    alpha: float | None = _f(None, "LoRA alpha (default: the rank, scale 1)", "lora")
    targets: str = _f("attn", "attn (SPO: to_q/k/v/out.0), attn+ff (+ feed-forward, proj), attn+ff+conv (+ resnets, samplers)", "lora")
    init: str = _f("gaussian", "LoRA init: gaussian (SPO, peft 'gaussian') or kaiming (peft default)", "lora", choices=("gaussian", "kaiming"))
    init_lora: str | None = _f(None, "start from this LoRA file instead of a fresh init", "lora")
    # -- optimizer ----------------------------------------------------------------------------
    learning_rate: float | None = _f(None, "learning rate (default: SPO 6e-5, DPO 1e-5, NCP 5e-6, DDPO 3e-4)", "optimizer")
    lr_warmup_steps: int = _f(0, "linear warmup steps (then constant)", "optimizer")
    optimizer: str = _f("adamw", "adamw or adamw8bit (needs bitsandbytes)", "optimizer", choices=("adamw", "adamw8bit"))
    weight_decay: float = _f(1e-4, "AdamW weight decay", "optimizer")
    adam_beta1: float = _f(0.9, "AdamW beta1", "optimizer")
    adam_beta2: float = _f(0.999, "AdamW beta2", "optimizer")
    adam_eps: float = _f(1e-8, "AdamW epsilon", "optimizer")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)", "optimizer")
    train_batch_size: int = _f(2, "pairs (DDPO: trajectories) per micro-batch", "optimizer")
    gradient_accumulation: int = _f(1, "micro-batches per optimizer step", "optimizer")
    # -- precision and memory ---------------------------------------------------------------------
    mixed_precision: str = _f("no", "autocast dtype: no, fp16 or bf16 (LoRA weights stay fp32)", "memory", choices=PRECISIONS)
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in backward (less memory, ~30% slower)", "memory")
    offload: str = _f("none", "keep parts on the CPU between uses (CUDA): none, text_encoders, vae or text_encoders+vae", "memory",
                      choices=("none", "text_encoders", "text_encoders+vae", "vae"))
    # -- outputs --------------------------------------------------------------------------------
    checkpoint_every: int = _f(50, "write a resumable checkpoint every N steps (0: only at the end)", "output")
    keep_checkpoints: int = _f(2, "checkpoints kept (older ones are deleted)", "output")
    lora_format: str = _f("webui", "webui (kohya; loads everywhere), diffusers, or webui+diffusers", "output")
    save_dtype: str = _f("fp32", "dtype of the saved LoRA: fp32, fp16 or bf16", "output")
    validate_every: int = _f(0, "validation grid every N steps (0: only at the end; -1: never)", "output")
    validation_prompts: list = _f([], "validation prompts (default: the first two training prompts)", "output")
    validation_seeds: list = _f([0], "validation seeds", "output")
    log_every: int = _f(1, "progress/log line every N steps", "output")

    # -------------------------------------------------------------------------------------------
    def resolved(self, require_data: bool = True) -> "TrainConfig":
        """A copy with method aliases and method-dependent defaults filled in, validated
        (`require_data=False`: a prompt or pair source may still be missing, e.g. to print a config)."""
        c = dataclasses.replace(self)
        c.method = METHOD_ALIASES.get(c.method.lower(), c.method.lower())
        if c.beta is None:
            c.beta = {"spo": 10.0, "lpo": 500.0, "grpo": 0.04}.get(c.method, 2500.0)
        if c.learning_rate is None:
            c.learning_rate = {"spo": 6e-5, "lpo": 6e-5, "diffusion_dpo": 1e-5, "ncp_dpo": 5e-6, "ddpo": 3e-4,
                               "grpo": 3e-4}.get(c.method, 6e-5)
        if c.alpha is None:
            c.alpha = float(c.rank)
        c.validate(require_data)
        return c

    def validate(self, require_data: bool = True) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        for name in ("train_batch_size", "gradient_accumulation", "sample_batch_size", "steps", "rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.method in SAMPLING_METHODS:
            if self.noise_level <= 0:
                raise ConfigError(f"noise_level must be > 0 (Flow-GRPO: 0.7), got {self.noise_level}: a deterministic flow "
                                  "step has no density to train on")
            if self.flow_step not in FLOW_STEPS_TRAINED:
                raise ConfigError(f"flow_step must be one of {', '.join(FLOW_STEPS_TRAINED)}, got {self.flow_step!r}")
            if self.eta <= 0:
                raise ConfigError(
                    f"{self.method} needs stochastic sampling (eta > 0; SPO uses 1.0): with eta = 0 the step has no "
                    "density to train on")
            if require_data and not self.prompts and not self.prompt_list:
                raise ConfigError(f"{self.method} trains on prompts: give a prompt file (prompts=...) or prompt_list")
        if self.method in STEPWISE_METHODS:
            if self.k < 2:
                raise ConfigError(f"{self.method.upper()} needs a pool of k >= 2 candidates per step, got k = {self.k}")
            if self.threshold_max is not None and not self.threshold <= self.threshold_max < 1:
                raise ConfigError(f"threshold_max must be in [threshold, 1), got {self.threshold_max} (threshold {self.threshold})")
            if not 0 <= self.threshold < 1:
                raise ConfigError(f"threshold must be in [0, 1), got {self.threshold}")
            if not 0 < self.clip_eps < 1:
                raise ConfigError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if require_data and self.method in ("diffusion_dpo", "ncp_dpo") and not self.pairs:
            raise ConfigError(f"{self.method} trains on preference pairs: give pairs=FOLDER or a JSONL/CSV/parquet file")
        if self.method == "grpo":
            if not 0 < self.grpo_timestep_fraction <= 1:
                raise ConfigError(f"grpo_timestep_fraction must be in (0, 1], got {self.grpo_timestep_fraction}")
            if self.group_size < 2:
                raise ConfigError(f"GRPO compares each image with its group: group_size must be >= 2, got {self.group_size}")
            if self.beta is not None and self.beta < 0:
                raise ConfigError(f"GRPO's KL coefficient beta must be >= 0, got {self.beta}")
        if self.method == "ddpo":
            if not 0 < self.ddpo_timestep_fraction <= 1:
                raise ConfigError("ddpo_timestep_fraction must be in (0, 1]")
            if self.ddpo_samples_per_prompt < 1:
                raise ConfigError("ddpo_samples_per_prompt must be >= 1")
        for fmt in self.lora_formats():
            if fmt not in ("webui", "diffusers"):
                raise ConfigError(f"lora_format must be webui, diffusers or webui+diffusers, got {self.lora_format!r}")
        if self.save_dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"save_dtype must be fp32, fp16 or bf16, got {self.save_dtype!r}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.height is not None and self.height <= 0 or self.width is not None and self.width <= 0:
            raise ConfigError("height and width must be positive")

    def lora_formats(self) -> list[str]:
        return [f.strip().lower().replace("kohya", "webui") for f in self.lora_format.split("+") if f.strip()]

    # -- serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        """Fields from a mapping (nested tables are flattened; a 'preset' is applied first)."""
        flat = _flatten(data)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - names)
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(unknown)}")
        cfg = dataclasses.replace(base) if base is not None else cls()
        preset = flat.get("preset")
        if preset and not cfg.preset:  # a preset already applied (e.g. --preset) wins over the file's
            cfg = apply_preset(cfg, preset)
        for k, v in flat.items():
            if k != "preset":
                setattr(cfg, k, _coerce(cls, k, v))
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike, base: "TrainConfig | None" = None) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise FileMissingError(f"training config not found: {p}")
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` package
                    import tomli as tomllib
                data = tomllib.loads(text)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"reading {p} on Python 3.10 needs the tomli package (pip install tomli), "
                              "or give the settings as JSON") from exc
        except Exception as exc:  # tomllib.TOMLDecodeError / json.JSONDecodeError
            raise ConfigError(f"cannot parse {p}: {exc}") from exc
        return cls.from_dict(data, base)

    def to_toml(self) -> str:
        """The settings as TOML (None values are left out)."""
        lines = []
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            lines.append(f"{f.name} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"


# -- presets ---------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # RockeyCoss/SPO configs/spo_sd-v1-5_4k-prompts_num-sam-4_10ep_bs10.py (per GPU; 4 GPUs there)
    "spo-sd15": dict(method="spo", steps=20, eta=1.0, guidance_scale=5.0, k=4, inner_steps=0, threshold=0.3,
                     beta=10.0, clip_eps=0.1, rank=4, alpha=4.0, targets="attn", init="gaussian", learning_rate=6e-5,
                     weight_decay=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, max_grad_norm=1.0,
                     sample_batch_size=10, train_batch_size=10, gradient_accumulation=1, max_train_t=751.0,
                     seed=42, validation_prompts=["A beautiful lake"]),
    # configs/spo_sdxl_4k-prompts_num-sam-2_3-is_10ep_bs2_gradacc2.py
    "spo-sdxl": dict(method="spo", steps=20, eta=1.0, guidance_scale=5.0, k=2, inner_steps=3, threshold=0.4,
                     beta=10.0, clip_eps=0.1, rank=64, alpha=64.0, targets="attn", init="gaussian", learning_rate=1e-5,
                     weight_decay=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, max_grad_norm=1.0,
                     sample_batch_size=2, train_batch_size=2, gradient_accumulation=2, max_train_t=751.0,
                     seed=42, validation_prompts=["A beautiful lake"]),
    # diffusers examples/research_projects/diffusion_dpo (LoRA form, beta 2500, rank 8 in its README)
    "diffusion-dpo": dict(method="diffusion_dpo", beta=2500.0, dpo_loss="sigmoid", rank=8, alpha=8.0, targets="attn",
                          init="kaiming", learning_rate=1e-5, weight_decay=1e-2, max_grad_norm=1.0),
    # NCP-DPO scripts: LoRA r = alpha = 64 on the attention projections, beta 2500, down-block features at t-1
    "ncp-dpo": dict(method="ncp_dpo", beta=2500.0, ncp_variant="dpo", ncp_features="down", rank=64, alpha=64.0,
                    targets="attn", init="kaiming", learning_rate=5e-6, max_grad_norm=1.0),
    # ddpo-pytorch config/base.py (LoRA rank 4, lr 3e-4, 50 DDIM steps, eta 1, CFG 5, clip 1e-4, adv clip 5)
    "ddpo": dict(method="ddpo", steps=50, eta=1.0, guidance_scale=5.0, rank=4, alpha=4.0, init="kaiming",
                 learning_rate=3e-4, weight_decay=1e-4, max_grad_norm=1.0, ddpo_clip_range=1e-4, ddpo_adv_clip=5.0,
                 ddpo_buffer_size=32, ddpo_min_count=16, scorer="jpeg_compressibility"),
    # Kwai-Kolors/LPO: SPO's loop with the latent reward model; every one of the 20 steps, k 4, random
    # continuation, the sigma-following dynamic threshold, beta 500 (train_lpo.py, configs/, compare_funcs.py)
    "lpo-sd15": dict(method="lpo", steps=20, eta=1.0, guidance_scale=5.0, k=4, inner_steps=0, threshold=0.35,
                     threshold_max=0.5, beta=500.0, clip_eps=0.1, rank=4, alpha=4.0, targets="attn", init="gaussian",
                     learning_rate=6e-5, weight_decay=1e-4, max_grad_norm=1.0, sample_batch_size=5, train_batch_size=10,
                     min_train_t=0.0, max_train_t=999.0, scorer="lrm", auto_threshold=False, seed=42,
                     validation_prompts=["A beautiful lake"]),
    "lpo-sdxl": dict(method="lpo", steps=20, eta=1.0, guidance_scale=5.0, k=4, inner_steps=0, threshold=0.45,
                     threshold_max=0.6, beta=500.0, clip_eps=0.1, rank=64, alpha=64.0, targets="attn", init="gaussian",
                     learning_rate=1e-5, weight_decay=1e-4, max_grad_norm=1.0, sample_batch_size=4, train_batch_size=4,
                     min_train_t=0.0, max_train_t=999.0, scorer="lrm", auto_threshold=False, seed=42,
                     validation_prompts=["A beautiful lake"]),
    # the embedded world (spo_core.world): measured there (README); its own scorer, weights and prompts.
    # SPO: rounds of 32 prompts, a threshold that a tiny SPM's score gaps pass, beta 100 (SPO's 10 never
    # anchors a tiny model at a learning rate that learns in minutes; 1000 learns a third as fast).
    "spo-world": dict(method="spo", learning_rate=3e-3, rank=8, k=4, sample_batch_size=32, train_batch_size=64,
                      threshold=0.1, beta=100.0, scorer="spm", scorer_weights="world", validation_prompts=["a red circle"]),
    # LPO: SPO's rounds with every step pooled, LPO's own beta 500 at lr 1e-3 (bench/alignment_bench.py: lr 3e-3
    # with beta 100 or 500 peaks by 10-20 steps and then collapses; 1e-3 with beta 100 collapses after 30)
    "lpo-world": dict(method="lpo", learning_rate=1e-3, rank=8, k=4, sample_batch_size=32, train_batch_size=64,
                      threshold=0.1, beta=500.0, min_train_t=0.0, max_train_t=999.0, scorer="lrm", scorer_weights="world",
                      auto_threshold=False, validation_prompts=["a red circle"]),
    "diffusion-dpo-world": dict(method="diffusion_dpo", learning_rate=1e-3, rank=8, train_batch_size=16),
    "ncp-dpo-world": dict(method="ncp_dpo", learning_rate=1e-3, rank=8, train_batch_size=16),
    "ddpo-world": dict(method="ddpo", learning_rate=3e-3, rank=8, sample_batch_size=32, train_batch_size=32),
    "grpo-world": dict(method="grpo", learning_rate=3e-3, rank=8, group_size=8, sample_batch_size=8, train_batch_size=32,
                       beta=0.04, scorer="spm", scorer_weights="world", validation_prompts=["a red circle"]),
    # the world's rectified-flow model (world-flow): 10-step SDE rollouts (Flow-GRPO's denoising reduction),
    # measured in bench/alignment_bench.py --world flow (README)
    # SPO pools every step on the flow model (t up to 1000): with SPO's t <= 751 it peaked at +0.079, pooling the
    # high-noise steps too (where a flow model settles composition) reached +0.125 (bench, README)
    "spo-world-flow": dict(method="spo", steps=10, flow_step="sde", noise_level=0.7, learning_rate=3e-3, rank=8, k=4,
                           max_train_t=1000.0, sample_batch_size=32, train_batch_size=64, threshold=0.1, beta=100.0,
                           scorer="spm", scorer_weights="world", validation_prompts=["a red circle"]),
    "grpo-world-flow": dict(method="grpo", steps=10, flow_step="sde", noise_level=0.7, learning_rate=3e-3, rank=8,
                            group_size=8, sample_batch_size=8, train_batch_size=32, beta=0.04, scorer="spm",
                            scorer_weights="world", validation_prompts=["a red circle"]),
    "ddpo-world-flow": dict(method="ddpo", steps=10, flow_step="sde", noise_level=0.7, learning_rate=3e-3, rank=8,
                            sample_batch_size=32, train_batch_size=32, scorer="spm", scorer_weights="world"),
    # Flow-GRPO (yifan123/flow_grpo @ac4c86e config/grpo.py pickscore_sd3 + config/base.py + scripts/train_sd3.py):
    # SD3.5-medium, 10-step SDE rollouts (a = 0.7) at 512 px, CFG 4.5, groups of 24 with the global std, KL 0.01
    # (0.04 for its GenEval/OCR runs), PPO clip 1e-4, advantages clipped to 5, 9 of 10 steps trained, LoRA r 32 /
    # alpha 64 (gaussian) on every attention projection, lr 3e-4. Two optimizer steps per round, as there.
    "grpo-sd3": dict(method="grpo", steps=10, flow_step="sde", noise_level=0.7, guidance_scale=4.5, height=512, width=512,
                     group_size=24, grpo_global_std=True, grpo_timestep_fraction=0.99, beta=0.01, ddpo_clip_range=1e-4,
                     ddpo_adv_clip=5.0, rank=32, alpha=64.0, init="gaussian", targets="attn", learning_rate=3e-4,
                     weight_decay=1e-4, max_grad_norm=1.0, sample_batch_size=2, train_batch_size=8, gradient_accumulation=3,
                     scorer="pickscore", seed=42, validation_prompts=["A beautiful lake"]),
    # Flow-GRPO's FLUX.1-dev PickScore config (config/grpo.py pickscore_flux, a later revision than ac4c86e): 6-step
    # SDE rollouts with a = 0.9, distilled guidance 3.5, 512 px, groups of 24, no KL term (beta 0), bf16
    "grpo-flux": dict(method="grpo", steps=6, flow_step="sde", noise_level=0.9, guidance_scale=3.5, height=512, width=512,
                      group_size=24, grpo_global_std=True, grpo_timestep_fraction=0.99, beta=0.0, ddpo_clip_range=1e-4,
                      ddpo_adv_clip=5.0, rank=32, alpha=64.0, init="gaussian", targets="attn", learning_rate=3e-4,
                      weight_decay=1e-4, max_grad_norm=1.0, sample_batch_size=2, train_batch_size=8, gradient_accumulation=3,
                      scorer="pickscore", seed=42, validation_prompts=["A beautiful lake"]),
    # SPO on flow models (no published config): SPO's step-wise pairs and loss (k 4, threshold 0.3, beta 10, clamp
    # 0.1) on Flow-GRPO's rollouts above, every step pooled (t = 1000 sigma up to 1000: on the flow world SPO's own
    # t <= 751 left out the steps that settle composition), with SPO-SDXL's large-model lr 1e-5
    "spo-sd3": dict(method="spo", steps=10, flow_step="sde", noise_level=0.7, guidance_scale=4.5, height=512, width=512,
                    k=4, threshold=0.3, beta=10.0, clip_eps=0.1, max_train_t=1000.0, rank=32, alpha=64.0, init="gaussian",
                    targets="attn", learning_rate=1e-5, weight_decay=1e-4, max_grad_norm=1.0, sample_batch_size=4,
                    train_batch_size=4, scorer="pickscore", seed=42, validation_prompts=["A beautiful lake"]),
    "spo-flux": dict(method="spo", steps=6, flow_step="sde", noise_level=0.9, guidance_scale=3.5, height=512, width=512,
                     k=4, threshold=0.3, beta=10.0, clip_eps=0.1, max_train_t=1000.0, rank=32, alpha=64.0, init="gaussian",
                     targets="attn", learning_rate=1e-5, weight_decay=1e-4, max_grad_norm=1.0, sample_batch_size=4,
                     train_batch_size=4, scorer="pickscore", seed=42, validation_prompts=["A beautiful lake"]),
}
# Memory settings of the SD1.5/SDXL presets on one CUDA GPU: `spo train` applies them when it trains on
# CUDA, under the config file and the flags (either overrides each). bench/gpu_suite.py measures them
# against the targets (SD1.5 SPO <= 10 GB, SDXL <= 24 GB). 8-bit AdamW only where bitsandbytes is.
_SD15_GPU = dict(mixed_precision="fp16", gradient_checkpointing=True, offload="text_encoders")
_SDXL_GPU = dict(_SD15_GPU, optimizer="adamw8bit")
_FLOW_GPU = dict(mixed_precision="bf16", gradient_checkpointing=True)  # FlowBackend keeps its text encoders resident
GPU_TACTICS: dict[str, dict[str, Any]] = {"spo-sd15": _SD15_GPU, "lpo-sd15": _SD15_GPU, "spo-sdxl": _SDXL_GPU,
                                          "lpo-sdxl": _SDXL_GPU, "spo-sd3": _FLOW_GPU, "grpo-sd3": _FLOW_GPU,
                                          "spo-flux": _FLOW_GPU, "grpo-flux": _FLOW_GPU}
PRESET_ALIASES = {"lpo": "lpo-sd15", "lpo-xl": "lpo-sdxl", "sd15": "spo-sd15", "sd1.5": "spo-sd15", "spo": "spo-sd15", "sdxl": "spo-sdxl", "mspo": "spo-sdxl",
                  "dpo": "diffusion-dpo", "diffusion_dpo": "diffusion-dpo", "ncp": "ncp-dpo", "ncp_dpo": "ncp-dpo",
                  "grpo": "grpo-sd3", "flow-grpo": "grpo-sd3", "sd3": "spo-sd3", "flux": "spo-flux"}


def preset_names() -> list[str]:
    return list(PRESETS)


def auto_preset(method: str, arch: str | None, world: bool = False, flow: bool = False) -> str | None:
    """The preset `auto` means for a method on a model: the world's own settings on the world (its flow
    model's with `flow`), Flow-GRPO's / SPO-on-flow settings on SD3 and Flux, SPO's SD1.5 / SDXL configs
    for SPO, the method's published settings for the others."""
    method = METHOD_ALIASES.get(method, method)
    if world:
        name = f"{method.replace('_', '-')}-world" + ("-flow" if flow else "")
        return name if name in PRESETS else None
    family = "flux" if arch and "flux" in arch else "sd3" if arch and "sd3" in arch else None
    if family and method in ("spo", "grpo"):
        return f"{method}-{family}"
    if method in STEPWISE_METHODS:
        return f"{method}-sdxl" if arch and "xl" in arch else f"{method}-sd15"
    return {"ddpo": "ddpo", "diffusion_dpo": "diffusion-dpo", "ncp_dpo": "ncp-dpo", "grpo": "grpo-sd3"}.get(method)


def apply_preset(cfg: TrainConfig, name: str) -> TrainConfig:
    key = PRESET_ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} (aliases: {', '.join(PRESET_ALIASES)})")
    out = dataclasses.replace(cfg, preset=key)
    for k, v in PRESETS[key].items():
        setattr(out, k, type(v)(v) if isinstance(v, (list, dict)) else v)
    return out


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A config from a preset plus overrides: preset("sd15", prompts="p.txt", max_steps=500)."""
    cfg = apply_preset(TrainConfig(), name)
    for k, v in overrides.items():
        if k not in {f.name for f in fields(TrainConfig)}:
            raise ConfigError(f"unknown training setting {k!r}")
        setattr(cfg, k, v)
    return cfg


# -- command-line flags --------------------------------------------------------------------------

# settings a resume may change on purpose (the advice after a divergence): the change is logged
RESUME_ADJUSTABLE = {"learning_rate", "lr_warmup_steps", "max_grad_norm", "mixed_precision"}
RESUME_SAFE = RESUME_ADJUSTABLE | {"device", "model_dtype", "model", "vae", "max_steps", "checkpoint_every", "keep_checkpoints", "validate_every", "validation_prompts",
               "validation_seeds", "log_every", "resume", "overwrite", "output_name", "lora_format", "save_dtype", "offload",
               "output_dir", "scorer_weights", "prompts", "pairs", "preset"}


# earlier or other verbs' names of a setting: accepted in config files and as hidden flags
FIELD_ALIASES = {"scorer_path": "scorer_weights"}
HIDDEN_FLAGS = {"scorer_weights": ["--scorer-path", "--weights"], "negative_prompt": ["--negative"],
                "guidance_scale": ["--cfg"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig field (default None: only flags given on the command line count)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        group_name = f.metadata.get("group", "general")
        group = groups.get(group_name) or parser.add_argument_group(f"{group_name} settings")
        groups[group_name] = group
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("{presets}", ", ".join(PRESETS)).replace("%", "%%")  # argparse formats help with %
        kind = _field_kind(f)
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is list:
            group.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="VALUE", help=help_text)
        elif kind is dict:
            group.add_argument(flag, dest=f.name, default=None, metavar="JSON", help=help_text + " (JSON)")
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, choices=f.metadata.get("choices"), help=help_text)
        for alias in HIDDEN_FLAGS.get(f.name, []):
            group.add_argument(alias, dest=f.name, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def from_args(args: argparse.Namespace, base: TrainConfig | None = None, preset: bool = True) -> TrainConfig:
    """Flags given on the command line override the base config. `preset`: apply --preset first
    (pass False when the base was built on it already: preset < config file < flags)."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    preset_name = getattr(args, "preset", None)
    if preset_name and preset:
        cfg = apply_preset(cfg, preset_name)
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is None or f.name == "preset":
            continue
        if _field_kind(f) is dict and isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a JSON object: {exc}") from exc
        setattr(cfg, f.name, _coerce(TrainConfig, f.name, v))
    return cfg


def _field_kind(f) -> type:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" ", "")
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("list", list), ("dict", dict)):
        if t.startswith(name):
            return kind
    return str


def _coerce(cls, name: str, value):
    f = next(f for f in fields(cls) if f.name == name)
    kind = _field_kind(f)
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not an integer")
            return int(value)
        if kind is float:
            return float(value)
        if kind is list:
            if isinstance(value, str):
                return [value]
            items = list(value)
            if name == "validation_seeds":
                return [int(v) for v in items]
            return items
        if kind is dict:
            if not isinstance(value, Mapping):
                raise ValueError("expected a table/object")
            return dict(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: {exc}") from exc


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    # settings whose value is itself a table; any other table is a section such as [lora], [model] or
    # [optimizer] (the last two share a setting's name, but those settings are strings)
    table_settings = {f.name for f in fields(TrainConfig)
                      if f.default_factory is not MISSING and isinstance(f.default_factory(), dict)}
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = k.replace("-", "_")
        key = FIELD_ALIASES.get(key, key)
        if isinstance(v, Mapping) and key not in table_settings:
            out.update(_flatten(v))
        else:
            out[key] = v
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))
