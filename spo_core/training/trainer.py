"""The one training loop behind SPO, Diffusion-DPO, NCP-DPO and DDPO.

    result = train(TrainConfig(prompts="prompts.txt", max_steps=500), DiffusersTrainingHost(backend), scorer)

Each optimizer step takes `gradient_accumulation` micro-batches of `train_batch_size` items
from the method's data source (SPO and DDPO sample a new round with the current policy when
their buffer runs dry; the DPO family reads cached latent pairs), runs the objective's forward
and backward passes, averages gradients over processes, clips, and steps AdamW. Everything
random comes from generators whose states go into the checkpoints, so a resumed run continues
exactly. A cancel (UI button) or a kill never loses more than the step in progress.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import Cancelled, ConfigError, InvalidTensorError, OutputExistsError, SPOError, TrainingDiverged
from ..lora.model import LoRA
from ..progress import CancelFn, ProgressEvent, ProgressFn, Reporter
from . import checkpoint as ckpt
from .config import FLOW_METHODS, RESUME_ADJUSTABLE, RESUME_SAFE, SAMPLING_METHODS, STEPWISE_METHODS, TrainConfig
from .data import LatentPairs, PairRecord, load_pairs, load_prompts
from .distributed import Distributed
from .host import TrainingHost
from .lora_network import LoRANetwork, inject_lora
from .objectives import OBJECTIVES, DDPOSource, GRPOSource, LPOSource, PairSource, SPOSource
from .outputs import JsonlLog, lora_metadata, output_paths, save_lora_files, write_curves
from .run_lock import RunLock
from .validation import Validator

log = logging.getLogger(__name__)


# a LoRA factor beyond this is a runaway, not a preference: such weights are never kept as "good"
MAX_LORA_VALUE = 1e4


class TrainingOutOfMemory(SPOError, MemoryError):
    """The device ran out of memory; the message says which settings to lower."""


@dataclass
class TrainResult:
    lora_path: Path  # the main LoRA file (kohya/webui by default)
    lora_paths: list[Path]
    lora: LoRA
    steps: int
    output_dir: Path
    log_path: Path
    curves_path: Path | None
    validation_paths: list[Path]
    checkpoint: Path | None
    metrics: dict[str, float]  # the last step's
    history: list[dict[str, Any]] = field(default_factory=list)
    network: LoRANetwork | None = None  # still attached when keep_network=True


class Trainer:
    """A training run on a host model. Use `train()` for the common case; the class gives UIs
    access to the live network (`keep_network=True` leaves the LoRA hooks on the host)."""

    max_empty_rounds = 20

    def __init__(self, config: TrainConfig, host: TrainingHost, scorer=None, *, prompts: Sequence[str] | None = None,
                 pairs: Sequence[PairRecord] | LatentPairs | None = None, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, keep_network: bool = False):
        if prompts:
            config = _with(config, prompt_list=list(prompts))
        if pairs is not None and not config.pairs:
            config = _with(config, pairs="<in memory>")
        self.cfg = config.resolved()
        self.host = host
        self.scorer = scorer
        self._pairs_arg = pairs
        self.progress = progress
        self.cancel = cancel
        self.keep_network = keep_network
        self.output_dir = Path(self.cfg.output_dir)
        self.device = torch.device(host.device)
        self.step = 0
        self.network: LoRANetwork | None = None
        self.history: list[dict[str, Any]] = []
        self.resume_changes: dict[str, tuple] = {}  # adjustable settings that differ from the resumed checkpoint
        self.validation_paths: list[Path] = []
        self.last_checkpoint: Path | None = None
        self._last_ckpt_step = -1
        self._frozen: list[tuple[torch.nn.Parameter, bool]] = []
        self._checkpointing_on = False
        self._closed = False
        self._lock: RunLock | None = None
        self.dist: Distributed | None = None
        self.log = JsonlLog(self.output_dir / "log.jsonl")

    # -- context protocol for objectives ---------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.dist.rank if self.dist else 0

    @property
    def world(self) -> int:
        return self.dist.world if self.dist else 1

    def autocast(self):
        mp = self.cfg.mixed_precision
        if mp == "no":
            return contextlib.nullcontext()
        dtype = torch.float16 if mp == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.dist.any(bad):
            self._diverged(float(loss.detach()) if loss.numel() == 1 else float("nan"))
        scaled = loss / self.cfg.gradient_accumulation
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()

    def share_items(self, items: list, shuffle_gen: torch.Generator) -> list:
        """SPO's data flow: gather every process's pairs, shuffle with a shared permutation, split evenly."""
        if self.world > 1:
            gathered = self.dist.gather_objects(items)
            items = [it for part in gathered for it in part]
            items = items[:len(items) - len(items) % self.world]
        self.last_gathered = len(items)
        perm = torch.randperm(len(items), generator=shuffle_gen).tolist()
        items = [items[i] for i in perm]
        return items[self.rank::self.world]

    def gather_objects(self, obj) -> list:
        return self.dist.gather_objects(obj)

    def log_event(self, event: str, **values) -> None:
        if self.rank == 0:
            self.log.write({"event": event, "step": self.step, **values})

    def warn(self, message: str) -> None:
        """Something the user should change now (not an error yet): the log, the console and the UI's status."""
        log.warning(message)
        self.log_event("warning", message=message)
        if self.progress is not None and self.rank == 0:
            self.progress(ProgressEvent("warning", self.step, self.cfg.max_steps, message))

    def sampling_progress(self, step: int, total: int, message: str) -> None:
        if self.progress is not None and self.rank == 0:
            self.progress(ProgressEvent("sampling", step, total, message))
        if self.cancel is not None and self.cancel():
            raise Cancelled("training was cancelled")

    # -- setup -------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        self.dist = Distributed(self.device)
        if self.rank == 0:
            self._lock = RunLock(self.output_dir).acquire()
        resume_from = ckpt.resolve_resume(cfg.resume, self.output_dir) if cfg.resume else None
        if cfg.resume and resume_from is None:
            log.info("no checkpoint in %s: starting a new run", self.output_dir)
        if resume_from is None:
            self._check_fresh_output()
        self._setup_schedule()
        table = self.host.module_table()
        if self.scorer is not None:
            from ..scorers.lrm import check_latent_scorer_fits

            check_latent_scorer_fits(self.scorer, table.family, table.cross_attention_dim, f"the model ({table.arch})")
        root = self.host.lora_root()
        for p in root.module.parameters():
            self._frozen.append((p, p.requires_grad))
            p.requires_grad_(False)
        self.network = inject_lora(root, table, cfg.targets, cfg.rank, cfg.alpha, cfg.init, cfg.seed, device=self.device)
        if cfg.init_lora:
            self._start_from_lora(cfg.init_lora, table)
        log.info("LoRA: %d modules, %d parameters (rank %d, alpha %g, targets %s)", len(self.network.branches),
                 self.network.num_parameters(), cfg.rank, cfg.alpha, cfg.targets)
        if cfg.gradient_checkpointing:
            self.host.set_gradient_checkpointing(True, self.network.checkpoint_function())
            self._checkpointing_on = True
        self.optimizer = self._make_optimizer()
        self.scaler = None
        if self.device.type == "cuda" and (cfg.mixed_precision == "fp16" or self.host.dtype == torch.float16):
            self.scaler = torch.amp.GradScaler("cuda")  # fp16 activations: scale the loss so gradients do not underflow
        self.train_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 3 + self.rank)
        self.denoiser_cfg = self.host.denoiser(cfg.guidance_scale)
        self.denoiser_plain = self.host.denoiser(1.0)
        self.objective = OBJECTIVES[cfg.method]()
        self.source, validation_default = self._make_source()
        self.validator = None
        if cfg.validate_every >= 0 and self.rank == 0:
            vprompts = cfg.validation_prompts or validation_default[:2]
            self.validator = Validator(self.host, self.network, vprompts, cfg.validation_seeds or [0], cfg.steps,
                                       cfg.guidance_scale,
                                       cfg.negative_prompt or None, cfg.height, cfg.width, self.autocast,
                                       sigmas=self.sigmas)
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        if self.rank == 0:
            self.history = self.log.open(keep_until_step=self.step if resume_from is not None else None)
            self.log_event("start", method=cfg.method, resumed_from=str(resume_from) if resume_from else None,
                           world=self.world, modules=len(self.network.branches), parameters=self.network.num_parameters(),
                           changed={k: list(v) for k, v in self.resume_changes.items()})

    def _setup_schedule(self) -> None:
        """The sampling schedule, step and noise of the rollouts. A flow model trains on its SDE/CPS step
        (`flow_step`, `noise_level`) over the host's own sigmas (`host.training_sigmas` where a host has
        one: Flux's depend on the image size); a discrete model on DDIM(eta) over SPO's 20 leading steps."""
        cfg, schedule = self.cfg, self.host.schedule
        self.schedule, self.eta = schedule, cfg.eta
        if getattr(schedule, "is_flow", False):
            if cfg.method not in FLOW_METHODS:
                raise ConfigError(
                    f"{cfg.method} does not train rectified-flow models ({self.host.arch}): it needs the UNet's noise "
                    f"prediction or a latent reward model of SD1.5/SDXL; use {', '.join(FLOW_METHODS)} on this model")
            self.schedule, self.eta = schedule.with_step(cfg.flow_step), cfg.noise_level
        sigmas_of = getattr(self.host, "training_sigmas", None)
        self.sigmas = sigmas_of(cfg.steps, cfg.height, cfg.width) if sigmas_of else self.schedule.spo_sigmas(cfg.steps)

    def _start_from_lora(self, path: str, table) -> None:
        """init_lora: a LoRA that matches none of the trained modules is an error, never a silent fresh start."""
        from ..errors import LoRAFormatError
        from ..lora.read import read_lora

        lora = read_lora(path, arch=table)
        lora.require_clean(allow_partial=True, what=f"init_lora {path}")
        n = self.network.load_lora(lora, strict=False)
        if n == 0:
            sample = next(iter(lora.modules.values()))
            raise LoRAFormatError(
                f"init_lora {path}: none of its {len(lora.modules)} modules is one this run trains ({len(self.network.branches)} "
                f"{self.cfg.targets} modules at rank {self.cfg.rank}; the file has rank {sample.rank}, e.g. "
                f"{sample.info.component}:{sample.info.name}): set rank and targets to the file's, or start without it")
        if n < len(lora.modules):
            log.warning("init_lora %s: %d of its %d modules are trained by this run; the others are ignored",
                        path, n, len(lora.modules))
        self.log_event("init_lora", path=str(path), loaded=n, modules=len(lora.modules))
        log.info("started from %s (%d of %d modules)", path, n, len(self.network.branches))

    def _check_fresh_output(self) -> None:
        cfg = self.cfg
        existing = [p for p in output_paths(cfg, self.output_dir) if p.exists()]
        ckpts = ckpt.list_checkpoints(self.output_dir)
        if (existing or ckpts) and not cfg.overwrite:
            what = existing[0] if existing else ckpts[-1]
            raise OutputExistsError(
                f"{what} exists: pass resume=auto (--resume auto) to continue that run, overwrite=true (--overwrite) "
                f"to start over, or another output_dir / output_name")
        if cfg.overwrite and self.rank == 0:
            shutil.rmtree(ckpt.checkpoints_root(self.output_dir), ignore_errors=True)
        self.dist.barrier()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        params = self.network.trainable_parameters()
        kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        if cfg.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                from ..errors import MissingDependencyError

                raise MissingDependencyError(
                    f"optimizer adamw8bit needs bitsandbytes, which is not importable here ({exc}); install it with "
                    "pip install bitsandbytes, or use optimizer adamw") from exc
            return bnb.optim.AdamW8bit(params, **kw)
        return torch.optim.AdamW(params, **kw)

    def _prompts(self) -> list[str]:
        cfg = self.cfg
        if cfg.prompt_list:
            return [str(p) for p in cfg.prompt_list if str(p).strip()]
        if cfg.prompts:
            return load_prompts(cfg.prompts)
        raise ConfigError("no prompts: give a prompt file or a prompt list")

    def _make_source(self):
        cfg = self.cfg
        if cfg.method in ("spo", "lpo"):
            prompts = self._prompts()
            source = LPOSource if cfg.method == "lpo" else SPOSource
            return source(self, prompts, self.scorer), prompts
        if cfg.method in ("ddpo", "grpo"):
            prompts = self._prompts()
            source = GRPOSource if cfg.method == "grpo" else DDPOSource
            return source(self, prompts, self.scorer), prompts
        data = self._pairs_arg
        if not isinstance(data, LatentPairs):
            records = list(data) if data is not None else load_pairs(cfg.pairs)
            shape = self.host.latent_shape(1, cfg.height, cfg.width)
            h = cfg.height or int(getattr(self.host, "default_size", 0) or 0)
            w = cfg.width or int(getattr(self.host, "default_size", 0) or 0)
            if not h or not w:
                raise ConfigError("give the training image size (height and width) for the pair images")
            info = self.host.model_info()
            key = f"{self.host.arch}|{info.get('hash') or info.get('name', '')}|{tuple(shape[1:])}"
            cache_dir = self.output_dir if cfg.cache_latents else None
            data = LatentPairs.build(records, self._encode_images, h, w, cache_dir, key, cancel=self.cancel)
        return PairSource(self, data), data.prompts

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.host.encode_images(images.to(self.device))

    # -- checkpoints -----------------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"lora.{k}": v for k, v in self.network.state_dict().items()}
        opt_tensors, opt_meta = ckpt.flatten_optimizer(self.optimizer.state_dict())
        tensors.update(opt_tensors)
        tensors["rng.train"] = self.train_gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        src_meta, src_tensors = self.source.state()
        tensors.update(src_tensors)
        state = {"version": 1, "step": self.step, "rank": self.rank, "world": self.world, "config": self.cfg.to_dict(),
                 "optimizer": opt_meta, "source": src_meta, "time": time.time(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        return tensors, state

    def _write_checkpoint(self) -> Path:
        tmp = ckpt.begin(self.output_dir, self.step) if self.rank == 0 else None
        self.dist.barrier()
        if tmp is None:
            tmp = ckpt.checkpoints_root(self.output_dir) / f".{ckpt.checkpoint_name(self.step)}.partial"
        tensors, state = self._state()
        ckpt.write_state(tmp, tensors, state, self.rank)
        if self.rank == 0:
            lora = self.network.to_lora()
            from ..lora.write import save_lora

            save_lora(lora, tmp / "lora.safetensors", fmt="webui", overwrite=True, title=f"{self.cfg.output_name}-step{self.step}",
                      extra_metadata=lora_metadata(self.cfg, self.host.model_info(), self.step, self.network))
        self.dist.barrier()
        final = None
        if self.rank == 0:
            final = ckpt.commit(self.output_dir, tmp, self.step, self.cfg.keep_checkpoints)
            self.log_event("checkpoint", path=str(final))
        self.dist.barrier()
        self.last_checkpoint = final or ckpt.checkpoints_root(self.output_dir) / ckpt.checkpoint_name(self.step)
        self._last_ckpt_step = self.step
        return self.last_checkpoint

    def _load_checkpoint(self, folder: Path) -> None:
        tensors, state = ckpt.read_state(folder, self.rank)
        if int(state.get("world", 1)) != self.world:
            raise ConfigError(f"checkpoint {folder} was written by {state.get('world')} processes; resume with the same number")
        ckpt.check_resume_config(state["config"], self.cfg.to_dict(), RESUME_SAFE)
        lora_sd = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
        self.network.load_state_dict(lora_sd, strict=True)
        bad = self.network.unbounded(MAX_LORA_VALUE)
        if bad:
            older = [c for c in ckpt.list_checkpoints(self.output_dir) if c != folder]
            raise ConfigError(f"checkpoint {folder} holds unusable LoRA weights ({bad}); resume from an earlier one"
                              + (f": resume={older[-1]}" if older else ", or start over"))
        changed = {k: (state["config"].get(k), v) for k, v in self.cfg.to_dict().items()
                   if k in RESUME_ADJUSTABLE and k in state["config"] and state["config"][k] != v}
        if changed:
            log.info("resuming with changed %s", ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
            self.resume_changes = changed
        self.optimizer.load_state_dict(ckpt.unflatten_optimizer(tensors, state["optimizer"]))
        self.train_gen.set_state(tensors["rng.train"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.source.load_state(state["source"], tensors)
        self.step = int(state["step"])
        self.last_checkpoint, self._last_ckpt_step = folder, self.step
        log.info("resumed from %s at step %d", folder, self.step)
        if self.step >= self.cfg.max_steps:
            log.warning("the checkpoint is at step %d >= max_steps %d: nothing to train", self.step, self.cfg.max_steps)

    # -- one optimizer step ------------------------------------------------------------------------
    def _snapshot(self):
        return self.source.snapshot(), self.train_gen.get_state(), torch.get_rng_state()

    def _restore(self, snap) -> None:
        src, g, trng = snap
        self.source.restore(src)
        self.train_gen.set_state(g)
        torch.set_rng_state(trng)
        self.optimizer.zero_grad(set_to_none=True)

    def _lr(self) -> float:
        warm = self.cfg.lr_warmup_steps
        factor = min(1.0, (self.step + 1) / warm) if warm > 0 else 1.0
        return self.cfg.learning_rate * factor

    def _train_step(self) -> dict[str, float]:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for _ in range(cfg.gradient_accumulation):
            batch = self.source.next_batch(cfg.train_batch_size)
            stats = self.objective.step(self, batch)
            for k, v in stats.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    totals[k] = totals.get(k, 0.0) + float(v)
                    counts[k] = counts.get(k, 0) + 1
            if self.cancel is not None and self.cancel():
                raise Cancelled("training was cancelled")
        params = self.network.trainable_parameters()
        self.dist.all_reduce_grads(params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        if cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.zeros(())
        grad_norm = float(norm)
        if not math.isfinite(grad_norm) and self.scaler is None:
            self._diverged(grad_norm, what="gradient norm")
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        bad = self.network.unbounded(MAX_LORA_VALUE)
        if self.dist.any(bad is not None):
            self._diverged(float("nan"), what=f"LoRA weights ({bad or 'on another process'})")
        metrics = {k: totals[k] / counts[k] for k in totals}
        metrics.update(lr=lr, grad_norm=grad_norm)
        if self.world > 1 and "loss" in metrics:
            metrics["loss"] = self.dist.mean(metrics["loss"])
        return metrics

    def _diverged(self, value: float, what: str = "loss") -> None:
        cfg = self.cfg
        lower = f"learning_rate={cfg.learning_rate / 3:.3g} (now {cfg.learning_rate:g})"
        if self.last_checkpoint:
            where = (f"The last good checkpoint (finite, bounded weights) is {self.last_checkpoint} (step {self._last_ckpt_step}): "
                     f"continue from it with resume=auto and a lower {lower}")
        else:
            where = f"No checkpoint was written yet: start again (overwrite=true) with a lower {lower}"
        self.optimizer.zero_grad(set_to_none=True)
        self.log_event("diverged", value=value, what=what)
        became = f"became {value}" if what in ("loss", "gradient norm") else "failed: NaN/inf or runaway values"
        applied = "this step was not applied" if what in ("loss", "gradient norm") or what.startswith("sampling") else \
            "nothing of this step was saved"
        raise TrainingDiverged(
            f"the {what} {became} at step {self.step + 1} ({cfg.method}); {applied} and training stopped. {where}; "
            f"mixed_precision=bf16 instead of fp16 and max_grad_norm=1 also help.")

    def _out_of_memory(self, exc: BaseException) -> None:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        hints = [f"train_batch_size (now {cfg.train_batch_size}; raise gradient_accumulation to keep the batch)"]
        if cfg.method in SAMPLING_METHODS:
            hints.append(f"sample_batch_size (now {cfg.sample_batch_size})")
        if cfg.method in STEPWISE_METHODS:
            hints.append(f"k (now {cfg.k})")
        hints.append(f"the resolution (now {cfg.height or 'model default'}x{cfg.width or 'model default'})")
        if not cfg.gradient_checkpointing:
            hints.append("enable gradient_checkpointing")
        if cfg.mixed_precision == "no":
            hints.append("use mixed_precision fp16 or bf16")
        raise TrainingOutOfMemory(f"out of memory on {self.device} at step {self.step + 1}: lower " + "; ".join(hints)
                                  + f". ({str(exc).splitlines()[0][:160]})") from exc

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        with torch.inference_mode(False), torch.enable_grad():
            try:
                self._setup()
                reporter = Reporter("training", cfg.max_steps, self.progress if self.rank == 0 else None, self.cancel)
                start_step, t0 = self.step, time.perf_counter()
                last: dict[str, float] = {}
                while self.step < cfg.max_steps:
                    snap = self._snapshot()
                    try:
                        metrics = self._train_step()
                    except Cancelled:
                        self._restore(snap)
                        raise
                    except InvalidTensorError as exc:  # NaN/inf met while sampling (e.g. an fp16 overflow)
                        self._restore(snap)
                        self._diverged(float("nan"), what=f"sampling ({exc})")
                    except Exception as exc:
                        if _is_oom(exc):
                            self._restore(snap)
                            self._out_of_memory(exc)
                        raise
                    self.step += 1
                    done = self.step - start_step
                    metrics["eta_s"] = (time.perf_counter() - t0) / done * (cfg.max_steps - self.step)
                    metrics["s_per_step"] = (time.perf_counter() - t0) / done
                    for k, v in getattr(self.source, "round_stats", {}).items():
                        metrics.setdefault(k, v)
                    last = metrics
                    self._after_step(metrics, reporter)
                return self._finish(last)
            except Cancelled as exc:
                if self.step == 0:  # nothing was trained: an all-zero LoRA must not appear anywhere
                    err = Cancelled("nothing was trained yet, so nothing was saved")
                    err.steps = 0
                    raise err from exc
                self._save_partial()
                err = Cancelled(f"training cancelled at step {self.step} of {cfg.max_steps}; the checkpoint "
                                f"{self.last_checkpoint} and the LoRA {self._main_output()} hold that state "
                                f"(resume with resume=auto)")
                err.steps = self.step
                raise err from exc
            finally:
                self.close()

    def _after_step(self, metrics: dict[str, float], reporter: Reporter) -> None:
        cfg = self.cfg
        record = {"step": self.step, "time": round(time.time(), 3), **{k: _round(v) for k, v in metrics.items()}}
        if self.rank == 0:
            self.history.append(record)
            self.log.write(record)
        preview = None
        if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
            self._write_checkpoint()
            if self.rank == 0:
                write_curves(self.history, cfg.method, self.output_dir / "curves.png")
        if self.validator is not None and cfg.validate_every > 0 and self.step % cfg.validate_every == 0 and self.step < cfg.max_steps:
            preview = self._validate()
        if self.step % max(cfg.log_every, 1) == 0 or preview is not None or self.step == cfg.max_steps:
            shown = {k: v for k, v in metrics.items() if k in _SHOWN}
            reporter.update(self.step, f"{cfg.method} step {self.step}/{cfg.max_steps}", preview=preview, **shown)
        else:
            reporter.check_cancel()

    def _validate(self):
        image = self.validator.render(self.step, f"{self.cfg.method} step {self.step}: base vs LoRA")
        from ..plots import save_png

        path = self.output_dir / "validation" / f"step-{self.step:06d}.png"
        save_png(image, path)
        self.validation_paths.append(path)
        self.log_event("validation", path=str(path))
        return image

    def _finish(self, last: dict[str, float]) -> TrainResult:
        cfg = self.cfg
        if self._last_ckpt_step != self.step:
            self._write_checkpoint()
        preview = None
        if self.validator is not None and self.rank == 0:
            preview = self._validate()
        paths = self._save_outputs()
        curves = write_curves(self.history, cfg.method, self.output_dir / "curves.png") if self.rank == 0 else None
        if self.progress is not None and self.rank == 0 and preview is not None:
            self.progress(ProgressEvent("training", self.step, cfg.max_steps, "done", {}, preview))
        self.log_event("done", lora=str(paths[0]) if paths else None)
        return TrainResult(paths[0] if paths else self._main_output(), paths, self.network.to_lora(), self.step,
                           self.output_dir, self.log.path, curves, list(self.validation_paths), self.last_checkpoint,
                           dict(last), list(self.history), self.network if self.keep_network else None)

    def _main_output(self) -> Path:
        return output_paths(self.cfg, self.output_dir)[0]

    def _save_outputs(self) -> list[Path]:
        if self.rank != 0:
            return output_paths(self.cfg, self.output_dir)
        lora = self.network.to_lora()
        meta = lora_metadata(self.cfg, self.host.model_info(), self.step, self.network)
        return save_lora_files(lora, self.cfg, self.output_dir, meta)

    def _save_partial(self) -> None:
        if self.network is None or self.dist is None:
            return
        try:
            if self._last_ckpt_step != self.step:
                self._write_checkpoint()
            self._save_outputs()
            if self.rank == 0:
                write_curves(self.history, self.cfg.method, self.output_dir / "curves.png")
        except Exception:  # pragma: no cover - never hide the cancel behind a save error
            log.exception("saving the cancelled run failed")

    def close(self) -> None:
        """Detach the LoRA (unless kept), unfreeze what was trainable, restore checkpointing."""
        if self._closed:
            return
        self._closed = True
        if self.network is not None and not self.keep_network:
            self.network.detach()
        for p, flag in self._frozen:
            if p.requires_grad != flag:
                # a host's inference tensors (Forge loads its model under inference mode) only take
                # requires_grad=True back inside inference mode
                with torch.inference_mode(p.is_inference()):
                    p.requires_grad_(flag)
        self._frozen = []
        if self._checkpointing_on:
            self.host.set_gradient_checkpointing(False)
        self.log.close()
        if self.dist is not None:
            self.dist.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHOWN = ("loss", "score_margin", "reward", "kl", "implicit_acc", "ratio_win", "ratio_lose", "logit_margin", "logratio_margin",
          "eta_s", "lr")


def _round(v):
    return round(v, 7) if isinstance(v, float) and math.isfinite(v) else v


def _with(cfg: TrainConfig, **changes) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or isinstance(exc, MemoryError) and not isinstance(exc, SPOError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def train(config: TrainConfig, host: TrainingHost, scorer=None, *, prompts: Sequence[str] | None = None,
          pairs: Sequence[PairRecord] | LatentPairs | None = None, progress: ProgressFn | None = None,
          cancel: CancelFn | None = None, keep_network: bool = False) -> TrainResult:
    """Train a LoRA on `host` with `config.method`; returns where everything was written.

    Raises Cancelled (after saving a checkpoint and the LoRA), TrainingDiverged (NaN/inf; the
    last good checkpoint is kept), TrainingOutOfMemory, ConfigError, OutputExistsError.
    """
    return Trainer(config, host, scorer, prompts=prompts, pairs=pairs, progress=progress, cancel=cancel,
                   keep_network=keep_network).run()
