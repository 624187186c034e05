"""What the buttons of the tabs do, as plain functions (no gradio): LoRA tools, scoring, and
the scorer cache shared with the WebUI sampler. Each raises an SPOError with a message for
the page when the input is wrong."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError, ModelMismatchError
from ..progress import CancelFn, ProgressFn

log = logging.getLogger(__name__)

ARCH_LABELS = {"sd15": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL"}


# -- LoRA tools ----------------------------------------------------------------------------------

def inspect_lora(path: Path, model_arch: str | None = None) -> tuple[str, dict]:
    """The report of a LoRA file (text and JSON); says so when it does not fit the loaded model."""
    from ..lora import read_lora, report

    lora = read_lora(path)
    rep = report(lora, path)
    text = rep.to_text()
    data = rep.to_dict()
    if model_arch and model_arch in ARCH_LABELS and lora.arch != model_arch:
        note = (f"warning: this LoRA is for {ARCH_LABELS.get(lora.arch, lora.arch)} but the loaded model is "
                f"{ARCH_LABELS[model_arch]}; it will not apply to it")
        text = note + "\n\n" + text
        data["model_mismatch"] = note
    return text, data


def convert_lora_file(src: Path, dst: Path, fmt: str = "webui", dtype: str | None = None, overwrite: bool = False,
                      allow_partial: bool = False) -> str:
    from ..lora import convert_lora

    dtype = None if dtype in (None, "", "keep") else dtype
    _, rep = convert_lora(src, dst, fmt=fmt, dtype=dtype, overwrite=overwrite, allow_partial=allow_partial, title=dst.stem,
                          create_parent=True)
    lines = [rep.summary_line(), f"wrote {dst} ({fmt})"]
    if rep.unmatched:
        lines.append(f"warning: {len(rep.unmatched)} keys were not converted: " + ", ".join(rep.unmatched[:8]))
    return "\n".join(lines)


def extract_lora_file(base: Path, tuned: Path, dst: Path, rank: int | None, energy: float | None, method: str = "randomized",
                      text_encoders: str = "auto", conv_rank: int | None = None, fmt: str = "webui", dtype: str = "fp16",
                      device: str | torch.device = "cpu", overwrite: bool = False,
                      progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> str:
    from ..lora import CheckpointReader, extract_lora, save_lora

    from ..safe_io import check_output_path

    check_output_path(dst, [base, tuned], folder=fmt == "peft", create_parent=True)
    te = {"auto": "auto", "yes": True, "no": False}.get(text_encoders, "auto")
    if dst.exists() and not overwrite:
        from ..errors import OutputExistsError

        raise OutputExistsError(f"{dst} exists; tick overwrite to replace it")
    with CheckpointReader(base) as b, CheckpointReader(tuned) as t:
        lora, rep = extract_lora(b, t, rank=rank or None, energy=energy or None, text_encoders=te,
                                 conv_rank=conv_rank or None, method=method, device=device, progress=progress, cancel=cancel)
    save_lora(lora, dst, fmt=fmt, dtype=dtype, overwrite=overwrite, title=dst.stem)
    return rep.to_text(limit=20) + f"\n\nwrote {dst} ({fmt}, {dtype})"


def merge_lora_file(checkpoint: Path, lora_path: Path, dst: Path, strength: float = 1.0, allow_partial: bool = False,
                    overwrite: bool = False, model_arch: str | None = None,
                    progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> str:
    from ..lora import CheckpointReader, merge_into_checkpoint, read_lora

    lora = read_lora(lora_path)
    lora.require_clean(allow_partial=allow_partial, what=str(lora_path.name))
    with CheckpointReader(checkpoint) as reader:
        ckpt_arch = reader.arch
    lora.ensure_arch(ckpt_arch, what=f"the LoRA {lora_path.name}")
    out = merge_into_checkpoint(checkpoint, lora, dst, strength=strength, overwrite=overwrite, progress=progress, cancel=cancel,
                                inputs=(lora_path,))
    return f"merged {len(lora.modules) + len(lora.diffs)} modules of {lora_path.name} at strength {strength:g} into {out}"


def resize_lora_file(src: Path, dst: Path, rank: int | None, energy: float | None, overwrite: bool = False) -> str:
    from ..lora import read_lora, resize_lora, save_lora
    from ..safe_io import check_output_path

    check_output_path(dst, [src], create_parent=True)
    lora = read_lora(src)
    lora.require_clean(what=src.name)
    new, retained = resize_lora(lora, rank=rank or None, energy=energy or None)
    save_lora(new, dst, overwrite=overwrite, title=dst.stem)
    mean = sum(retained.values()) / max(len(retained), 1)
    return f"resized {len(retained)} modules to ranks {sorted(new.ranks())}; mean retained energy {mean:.4f}\nwrote {dst}"


# -- scorers ---------------------------------------------------------------------------------------

class ScorerCache:
    """Keeps the last loaded scorer (loading a CLIP-H model takes seconds); thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._scorer: Any = None

    def get(self, name: str, path: str | None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            **options) -> Any:
        from ..scorers import load_scorer

        key = (name, str(path or ""), str(device), str(dtype), tuple(sorted(options.items())))
        with self._lock:
            if key != self._key or self._scorer is None:
                self._key, self._scorer = None, None  # free the old one first; a failed load leaves none
                self._scorer = load_scorer(name, path or None, device=device, dtype=dtype, **options)
                self._key = key
            return self._scorer

    def clear(self) -> None:
        with self._lock:
            self._key, self._scorer = None, None


SCORERS = ScorerCache()


def scorer_choices() -> list[tuple[str, str]]:
    """(label, name) pairs of every registered scorer."""
    from ..scorers import available_scorers

    return [(f"{s.name}" + ("" if s.needs_weights else " (no weights)"), s.name) for s in available_scorers()]


def scorer_names() -> list[str]:
    from ..scorers import available_scorers

    return [s.name for s in available_scorers()]


def scorer_hint(name: str) -> str:
    from ..scorers import SCORERS as INFOS

    info = INFOS.get(name)
    if info is None:
        return ""
    flags = ", ".join(f for f, on in (("step-aware", info.step_aware), ("differentiable", info.differentiable),
                                      ("needs the prompt", info.needs_prompt)) if on)
    return f"{info.description}. Weights: {info.weights_hint}." + (f" ({flags})" if flags else "")


def image_paths(files: Sequence[Any] | Any | None) -> list[str]:
    """Paths of gradio File values (3.41 gives tempfile objects, 4.x and later give paths or FileData)."""
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    out = []
    for f in files:
        if f is None:
            continue
        if isinstance(f, str):
            out.append(f)
        elif isinstance(f, dict) and "path" in f:
            out.append(f["path"])
        else:
            out.append(getattr(f, "path", None) or getattr(f, "name"))
    return out


def load_images(paths: Sequence[str]) -> torch.Tensor:
    """Image files -> [B,3,H,W] in [0,1], resized (bicubic) to the first image's size if they differ."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from ..errors import CorruptFileError
    from ..safe_io import check_exists

    tensors, size = [], None
    for path in paths:
        check_exists(path, "image")
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise CorruptFileError(f"cannot read the image {Path(path).name}: {exc}") from exc
        size = size or img.size
        if img.size != size:
            img = img.resize(size, Image.BICUBIC)
        tensors.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(tensors)


def score_files(paths: Sequence[str], prompt: str | None, scorer: Any, timestep: int = 0) -> list[tuple[str, float]]:
    """Score image files; returns (path, score) best first."""
    if not paths:
        raise ConfigError("no images: add one or more image files")
    if getattr(scorer, "input_kind", "pixels") == "latent":
        raise ConfigError(f"the {scorer.name} scorer scores a model's latents, not image files: use it in Sample or Train, "
                          "or `spo score --scorer lrm --model MODEL` (which encodes the files with that model's VAE)")
    prompt = (prompt or "").strip() or None
    if getattr(scorer, "needs_prompt", False) and not prompt:
        raise ConfigError(f"the scorer {scorer.name!r} compares images with their prompt: type the prompt")
    images = load_images(list(paths))
    scores = scorer.score(images, prompt, int(timestep or 0)).detach().float().cpu().tolist()
    return sorted(zip(paths, scores), key=lambda r: -r[1])


def check_lora_for_model(lora_arch: str, model_arch: str | None, what: str) -> None:
    if model_arch in ARCH_LABELS and lora_arch in ARCH_LABELS and lora_arch != model_arch:
        raise ModelMismatchError(f"{what} is made for {ARCH_LABELS[lora_arch]} but the loaded model is "
                                 f"{ARCH_LABELS[model_arch]}; load a {ARCH_LABELS[lora_arch]} checkpoint or choose another LoRA")
