"""What a run leaves behind besides checkpoints: the JSONL log, the curves PNG, the LoRA file(s)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..lora.model import LoRA
from ..lora.write import save_lora
from ..plots import curves_from_records, save_png

# which values each method's curves show (first panel: the loss)
CURVE_PANELS = {
    "spo": [["loss"], ["score_margin"], ["implicit_acc"], ["ratio_win", "ratio_lose"]],
    "lpo": [["loss"], ["score_margin"], ["implicit_acc"], ["ratio_win", "ratio_lose"]],
    "diffusion_dpo": [["loss"], ["implicit_acc"], ["model_mse_w", "model_mse_l"]],
    "ncp_dpo": [["loss"], ["implicit_acc"], ["model_d_w", "model_d_l"]],
    "ddpo": [["loss"], ["reward"], ["approx_kl", "clipfrac"]],
    "grpo": [["loss", "policy_loss"], ["reward"], ["kl"], ["approx_kl", "clipfrac"]],
}


class JsonlLog:
    """Append-only JSONL log, flushed per record; on resume, records after the checkpoint are dropped."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._f = None

    def open(self, keep_until_step: int | None = None) -> list[dict]:
        """Open for appending; returns the step records kept (for the curves)."""
        if not self.enabled:
            return []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept_lines, steps = [], []
        if keep_until_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if int(rec.get("step", 0)) <= keep_until_step:
                    kept_lines.append(line)
                    if rec.get("event") is None:
                        steps.append(rec)
            from ..safe_io import atomic_output

            with atomic_output(self.path, overwrite=True) as tmp:
                tmp.write_text("".join(x + "\n" for x in kept_lines), encoding="utf-8")
        elif keep_until_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")
        return steps

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def write_curves(records: Sequence[dict], method: str, path: str | os.PathLike) -> Path | None:
    if not records:
        return None
    window = 10 if len(records) >= 30 else 0
    image = curves_from_records(records, CURVE_PANELS.get(method, [["loss"]]), smooth_window=window,
                                title_prefix=f"{method}: ")
    save_png(image, path)
    return Path(path)


def lora_metadata(cfg, host_info: dict[str, str], step: int, network) -> dict[str, str]:
    """kohya-style training metadata plus our own spo_* keys."""
    meta = {
        "ss_training_comment": f"trained with spo-pack, method {cfg.method}",
        "ss_sd_model_name": host_info.get("name", ""),
        "ss_learning_rate": f"{cfg.learning_rate:g}",
        "ss_unet_lr": f"{cfg.learning_rate:g}",
        "ss_text_encoder_lr": "0",
        "ss_max_train_steps": str(cfg.max_steps),
        "ss_steps": str(step),
        "ss_seed": str(cfg.seed),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation),
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_lr_scheduler": "constant_with_warmup" if cfg.lr_warmup_steps else "constant",
        "ss_optimizer": cfg.optimizer,
        "ss_max_grad_norm": f"{cfg.max_grad_norm:g}",
        "ss_network_dropout": "None",
        "spo_method": cfg.method,
        "spo_steps": str(step),
        "spo_targets": cfg.targets,
        "spo_init": cfg.init,
        "spo_modules": str(len(network.branches)),
        "spo_config": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    if host_info.get("hash"):
        meta["ss_new_sd_model_hash"] = host_info["hash"]
        meta["spo_base_model_sha256"] = host_info["hash"]
    return meta


def save_lora_files(lora: LoRA, cfg, output_dir: Path, metadata: dict[str, str], name: str | None = None) -> list[Path]:
    """Write the LoRA in every requested format; the first path is the main file."""
    name = name or cfg.output_name
    formats = cfg.lora_formats()
    paths = []
    for fmt in formats:
        suffix = "_diffusers" if fmt == "diffusers" and len(formats) > 1 else ""
        path = output_dir / f"{name}{suffix}.safetensors"
        save_lora(lora, path, fmt=fmt, dtype=cfg.save_dtype, overwrite=True, title=name, extra_metadata=metadata)
        paths.append(path)
    return paths


def output_paths(cfg, output_dir: Path) -> list[Path]:
    formats = cfg.lora_formats()
    return [output_dir / f"{cfg.output_name}{'_diffusers' if f == 'diffusers' and len(formats) > 1 else ''}.safetensors"
            for f in formats]
