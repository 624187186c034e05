"""The training objectives: SPO (step-wise DPO on transition pairs), LPO (SPO scored by a latent
reward model), Diffusion-DPO, NCP-DPO, DDPO and GRPO (Flow-GRPO's group-relative policy gradient).

Each objective has a pure loss function (checked against the reference formulas in the tests),
a data source (sampling rounds or offline pairs) and a `step(ctx, batch)` that runs the forward
passes and calls `ctx.backward(loss)`.
"""

from .base import Batch, TrainContext, encode_rows, initial_noise, mse_per_row
from .ddpo import DDPOObjective, DDPOSource, PerPromptStatTracker, Trajectory, ddpo_loss
from .grpo import GRPOObjective, GRPOSource, group_advantages, kl_divisor
from .diffusion_dpo import DiffusionDPOObjective, PairSource, diffusion_dpo_loss
from .ncp import NCPObjective, ncp_loss, unet_features
from .lpo import LPOObjective, LPOSource, dynamic_threshold, noise_std_by_timestep
from .spo import PairItem, SPOObjective, SPOSource, pair_log_probs, spo_loss

OBJECTIVES = {"spo": SPOObjective, "lpo": LPOObjective, "diffusion_dpo": DiffusionDPOObjective, "ncp_dpo": NCPObjective,
              "ddpo": DDPOObjective, "grpo": GRPOObjective}

__all__ = [
    "Batch", "LPOObjective", "LPOSource", "dynamic_threshold", "noise_std_by_timestep", "DDPOObjective", "DDPOSource", "DiffusionDPOObjective", "GRPOObjective", "GRPOSource",
    "group_advantages", "kl_divisor", "NCPObjective", "OBJECTIVES", "PairItem", "PairSource",
    "PerPromptStatTracker", "SPOObjective", "SPOSource", "TrainContext", "Trajectory", "ddpo_loss", "diffusion_dpo_loss",
    "encode_rows", "initial_noise", "mse_per_row", "ncp_loss", "pair_log_probs", "spo_loss", "unet_features",
]
