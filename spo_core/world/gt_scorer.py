"""The world's exact ground-truth preference as a scorer.

DDPO's reward and the Diffusion-DPO/NCP-DPO pair labels in the alignment benchmark (as the
issue's protocol asks: those methods learn from the ground truth itself, SPO from the learned
step-aware model), and an oracle for the resampler. Not step-aware: on a noisy predicted x0 it
judges what is already visible.
"""

from __future__ import annotations

import torch

from ..scorers.base import Scorer
from .preference import ground_truth


class WorldGroundTruthScorer(Scorer):
    name = "world_gt"
    needs_prompt = True

    def _score(self, images: torch.Tensor, prompts: list[str] | None, timesteps: torch.Tensor | None) -> torch.Tensor:
        return ground_truth(images.float(), prompts).to(self.device)
