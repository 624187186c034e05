"""`load_scorer(name, path, device, dtype)` and the list of scorers the UIs show.

Nothing is ever downloaded: each scorer loads from the local file or folder given, and says
which file is missing and where to get it when it is.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import ConfigError, WeightsNotFoundError
from .aesthetic import HINT as AESTHETIC_HINT
from .base import Scorer, ScorerInfo
from .clip_scorers import CLIP_HINT, PICKSCORE_HINT
from .hps import HINT as HPS_HINT
from .lrm_files import LRM_HINT
from .spm_model import SPM_HINT

SCORERS: dict[str, ScorerInfo] = {info.name: info for info in (
    ScorerInfo("spm", "SPO's step-aware preference model: PickScore-style score of a predicted-x0 image at timestep t",
               True, SPM_HINT, step_aware=True, differentiable=True, needs_prompt=True),
    ScorerInfo("lrm", "LPO's latent reward model: scores the noisy latent x_t at its timestep with the diffusion model's "
               "own UNet encoder, no decoding (exp(logit_scale) * cos)", True, LRM_HINT, step_aware=True, differentiable=True,
               needs_prompt=True),
    ScorerInfo("pickscore", "PickScore_v1 human-preference score, exp(logit_scale) * cos(image, prompt) (about 18-24)",
               True, PICKSCORE_HINT, step_aware=False, differentiable=True, needs_prompt=True),
    ScorerInfo("hpsv2", "HPS v2 / v2.1 human-preference cosine on open_clip ViT-H-14 (resize-and-pad input)",
               True, HPS_HINT, step_aware=False, differentiable=True, needs_prompt=True),
    ScorerInfo("aesthetic", "LAION improved aesthetic predictor (about 1-10) on CLIP ViT-L/14 image embeddings",
               True, AESTHETIC_HINT + " (one folder holding both, or the head file with the clip option)",
               step_aware=False, differentiable=True, needs_prompt=False),
    ScorerInfo("clip", "CLIP score: scale * max(cos(image, prompt), 0), scale 100 by default (torchmetrics)",
               True, CLIP_HINT, step_aware=False, differentiable=True, needs_prompt=True),
    ScorerInfo("jpeg_compressibility", "DDPO's compressibility: minus the JPEG size in kB at quality 95",
               False, "no weights", step_aware=False, differentiable=False, needs_prompt=False),
    ScorerInfo("jpeg_incompressibility", "DDPO's incompressibility: the JPEG size in kB at quality 95",
               False, "no weights", step_aware=False, differentiable=False, needs_prompt=False),
)}

OPTIONS = {
    "spm": {"tokenizer_path"},
    "lrm": {"tokenizer_path"},
    "pickscore": {"tokenizer_path"},
    "clip": {"scale", "model_name", "tokenizer_path"},
    "aesthetic": {"clip", "model_name"},
    "hpsv2": {"model_name"},
    "jpeg_compressibility": {"quality"},
    "jpeg_incompressibility": {"quality"},
}

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

_cache: "OrderedDict[tuple, Scorer]" = OrderedDict()
_cache_lock = threading.Lock()


def available_scorers() -> list[ScorerInfo]:
    """Every scorer with a one-line description and the weights it expects (what UIs list)."""
    return list(SCORERS.values())


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose fp32, fp16 or bf16") from None


def load_scorer(name: str, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype | str = torch.float32, cache: bool = False, **options) -> Scorer:
    """Load a scorer by registry name from local files (nothing is ever downloaded).

    Options: spm/pickscore: tokenizer_path (a CLIP tokenizer folder; default: the bundled BPE);
    clip: scale (default 100), model_name (open_clip architecture for non-OpenAI files);
    aesthetic: clip (CLIP ViT-L/14 folder or file), model_name; hpsv2: model_name (default ViT-H-14);
    jpeg_*: quality (default 95). `cache=True` reuses a scorer loaded with the same arguments
    (the two most recent are kept), for hosts that ask again and again.
    """
    info = SCORERS.get(name)
    if info is None:
        raise ConfigError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
    unknown = set(options) - OPTIONS[name]
    if unknown:
        raise ConfigError(f"scorer {name!r} takes no option {', '.join(sorted(unknown))}; "
                          f"its options: {', '.join(sorted(OPTIONS[name])) or 'none'}")
    dtype = resolve_dtype(dtype)
    from ..model_names import resolve_scorer_weights

    path = resolve_scorer_weights(name, path)
    if info.needs_weights and not path:
        raise WeightsNotFoundError(f"scorer {name!r} needs weights: {info.weights_hint}")
    if not cache:
        return _load(name, path, device, dtype, options)
    key = (name, _file_key(path), str(torch.device(device)), dtype, tuple(sorted((k, str(v)) for k, v in options.items())))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        scorer = _load(name, path, device, dtype, options)
        _cache[key] = scorer
        while len(_cache) > 2:
            _cache.popitem(last=False)
        return scorer


def clear_scorer_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _file_key(path) -> tuple:
    if not path:
        return ("",)
    p = Path(path).expanduser().resolve()
    return (str(p), p.stat().st_mtime_ns if p.exists() else 0)


def _load(name: str, path, device, dtype: torch.dtype, options: dict) -> Scorer:
    if name == "spm":
        from .spm import SPMScorer

        return SPMScorer.from_path(path, device=device, dtype=dtype, tokenizer_path=options.get("tokenizer_path"))
    if name == "lrm":
        from .lrm import LRMScorer

        return LRMScorer.from_path(path, device=device, dtype=dtype, tokenizer_path=options.get("tokenizer_path"))
    if name == "pickscore":
        from .clip_scorers import PickScoreScorer

        return PickScoreScorer.from_path(path, device=device, dtype=dtype, tokenizer_path=options.get("tokenizer_path"))
    if name == "clip":
        from .clip_scorers import CLIPScoreScorer

        return CLIPScoreScorer.from_path(path, device=device, dtype=dtype, scale=float(options.get("scale", 100.0)),
                                         model_name=options.get("model_name"), tokenizer_path=options.get("tokenizer_path"))
    if name == "aesthetic":
        from .aesthetic import AestheticScorer

        return AestheticScorer.from_path(path, clip=options.get("clip"), device=device, dtype=dtype,
                                         model_name=options.get("model_name"))
    if name == "hpsv2":
        from .hps import HPSv2Scorer

        return HPSv2Scorer.from_path(path, device=device, dtype=dtype, model_name=options.get("model_name") or "ViT-H-14")
    from .jpeg import JPEGCompressibilityScorer, JPEGIncompressibilityScorer

    cls = JPEGCompressibilityScorer if name == "jpeg_compressibility" else JPEGIncompressibilityScorer
    return cls(device=device, dtype=dtype, quality=int(options.get("quality", 95)))
