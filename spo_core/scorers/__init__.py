"""Scorers (reward models), all loaded from local files: SPO's step-aware preference model,
PickScore, HPSv2, the LAION aesthetic predictor, CLIP score, JPEG (in)compressibility.

    scorer = load_scorer("spm", "sd-v1-5_step-aware_preference_model.bin", device="cuda", dtype="fp16")
    scores = scorer.score(images01, "a photo of a cat", timesteps=501)   # Tensor[B]
"""

from .base import Scorer, ScorerInfo
from .clip_torch import CLIPConfigLite, CLIPTorch, TextConfig, VisionConfig, clip_h14_config, tiny_clip_config
from .registry import SCORERS, available_scorers, clear_scorer_cache, load_scorer, resolve_dtype
from .spm import SPMScorer
from .spm_model import (StepAwarePreferenceModel, convert_spm_file, init_adaln_identity, load_spm, preference_loss,
                        save_spm)

__all__ = [
    "CLIPConfigLite", "CLIPTorch", "SCORERS", "SPMScorer", "Scorer", "ScorerInfo", "StepAwarePreferenceModel", "TextConfig",
    "VisionConfig", "available_scorers", "clear_scorer_cache", "clip_h14_config", "convert_spm_file", "init_adaln_identity",
    "load_scorer", "load_spm", "preference_loss", "resolve_dtype", "save_spm", "tiny_clip_config",
]
