"""The training objectives: SPO (step-wise DPO on transition pairs), Diffusion-DPO, NCP-DPO and DDPO.

Each objective has a pure loss function (checked against the reference formulas in the tests),
a data source (sampling rounds or offline pairs) and a `step(ctx, batch)` that runs the forward
passes and calls `ctx.backward(loss)`.
"""

from .base import Batch, TrainContext, encode_rows, initial_noise, mse_per_row
from .ddpo import DDPOObjective, DDPOSource, PerPromptStatTracker, Trajectory, ddpo_loss
from .diffusion_dpo import DiffusionDPOObjective, PairSource, diffusion_dpo_loss
from .ncp import NCPObjective, ncp_loss, unet_features
from .spo import PairItem, SPOObjective, SPOSource, pair_log_probs, spo_loss

OBJECTIVES = {"spo": SPOObjective, "diffusion_dpo": DiffusionDPOObjective, "ncp_dpo": NCPObjective, "ddpo": DDPOObjective}

__all__ = [
    "Batch", "DDPOObjective", "DDPOSource", "DiffusionDPOObjective", "NCPObjective", "OBJECTIVES", "PairItem", "PairSource",
    "PerPromptStatTracker", "SPOObjective", "SPOSource", "TrainContext", "Trajectory", "ddpo_loss", "diffusion_dpo_loss",
    "encode_rows", "initial_noise", "mse_per_row", "ncp_loss", "pair_log_probs", "spo_loss", "unet_features",
]
