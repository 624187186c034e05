"""GRPO as Flow-GRPO (arXiv 2505.05470, yifan123/flow_grpo) trains: group-relative advantages, PPO
clipping and a KL pull towards the LoRA-off model, on the SDE/CPS transitions of a flow model (and,
the same math, on DDIM(eta) transitions of a UNet model: a successor of DDPO there).

A round samples `group_size` images for each of `sample_batch_size` prompts with the current policy,
recording every stochastic transition, and scores the final images. Each image's advantage is its
reward minus its prompt's group mean, divided by the std of every reward of the round (`global_std`,
Flow-GRPO's setting) or of its group, + 1e-4; the tracker is emptied every round. Images whose
advantage is exactly 0 (a group whose rewards all tie) carry no signal and are dropped, as Flow-GRPO
drops them. Training visits the first int(steps * timestep_fraction) steps of each trajectory, in
order (denoising reduction: Flow-GRPO's 10-step rollouts train 9), one optimizer step accumulating
all of them:

    ratio = exp(log p_theta - log p_old),  L_pol = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
    L = L_pol + beta * mean(||mu_theta - mu_ref||^2 / (2 s^2))

with A clipped to +-adv_clip. `s` is Flow-GRPO's `std_dev_t`: sigma_t = a sqrt(sigma / (1 - sigma))
for the SDE step (the step's std without its sqrt(-dt), so not the exact Gaussian KL), the step's own
std for CPS and DDIM (the exact KL there).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Batch, TrainContext
from .ddpo import DDPOSource, Trajectory, ddpo_loss, train_trajectory_steps


def group_advantages(prompts: list[str], rewards: np.ndarray, global_std: bool = True) -> np.ndarray:
    """Flow-GRPO's PerPromptStatTracker.update on a fresh tracker: (r - mean of the prompt's group) /
    (population std of all rewards, or of the group, + 1e-4)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    prompts_arr = np.array(prompts, dtype=object)
    out = np.zeros_like(rewards)
    all_std = rewards.std() + 1e-4
    for prompt in dict.fromkeys(prompts):
        mask = prompts_arr == prompt
        group = rewards[mask]
        std = all_std if global_std else group.std() + 1e-4
        out[mask] = (group - group.mean()) / std
    return out


def kl_divisor(schedule, std: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """2 s^2 of Flow-GRPO's KL term per row: s = sigma_t = std / sqrt(sigma - sigma') for the SDE step,
    the step's std otherwise."""
    s2 = std.float() ** 2
    if getattr(schedule, "is_flow", False) and getattr(schedule, "step", "") == "sde":
        s2 = s2 / (sigma - sigma_next).float().to(std.device).clamp(min=1e-12)
    return 2 * s2


class GRPOSource(DDPOSource):
    """DDPO's rollouts with groups per prompt and Flow-GRPO's per-round advantages."""

    def collect(self) -> int:
        ctx, cfg = self.ctx, self.ctx.cfg
        base = [self.prompts[i] for i in self.sampler.take(cfg.sample_batch_size)]
        return self._collect_prompts([p for p in base for _ in range(cfg.group_size)])

    def advantages(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        adv = group_advantages(prompts, rewards, self.ctx.cfg.grpo_global_std)
        groups = {}
        for p, a in zip(prompts, adv):
            groups.setdefault(p, []).append(a)
        self.zero_std_groups = sum(all(a == 0 for a in v) for v in groups.values())
        return adv

    def keep(self, items: list[Trajectory]) -> list[Trajectory]:
        kept = [t for t in items if t.advantage != 0]
        if len(kept) < len(items):
            self.ctx.log_event("dropped", samples=len(items) - len(kept), reason="every reward of the group was equal")
        return kept


class GRPOObjective:
    name = "grpo"

    def step(self, ctx: TrainContext, batch: Batch) -> dict[str, float]:
        """The first int(steps * fraction) steps of every trajectory, in order; the KL term when beta > 0."""
        cfg = ctx.cfg
        trajs: list[Trajectory] = batch.items
        n_train = max(1, int(trajs[0].x.shape[0] * cfg.grpo_timestep_fraction))

        def loss_fn(out, logp_old, adv):
            loss, stats = ddpo_loss(out["logp"], logp_old, adv, cfg.ddpo_clip_range, cfg.ddpo_adv_clip)
            stats["policy_loss"] = float(loss.detach())
            if cfg.beta > 0:
                dims = tuple(range(1, out["mean"].ndim))
                kl = ((out["mean"] - out["mean_ref"]) ** 2).mean(dim=dims) / kl_divisor(
                    ctx.schedule, out["std"], out["sigma"], out["sigma_next"])
                kl = kl.mean()
                loss = loss + cfg.beta * kl
                stats["kl"] = float(kl.detach())
            return loss, stats

        return train_trajectory_steps(ctx, trajs, [[j] * len(trajs) for j in range(n_train)], loss_fn,
                                      reference=cfg.beta > 0)
