"""Diffusion-DPO (Wallace et al. 2023) on offline preference pairs, in the diffusers LoRA form.

Both images of a pair are forward-noised with the same timestep t ~ U{0..999} and the same
noise eps (in sigma space: x = x0 + sigma(t) * eps); the policy's and the frozen reference's
eps predictions (eps_hat = (x - x0_hat) / sigma, CFG off) give per-sample MSEs (mean over
C, H, W), and loss = -log sigmoid(beta * (ref_diff - model_diff)) with *_diff = mse_w - mse_l
and beta = 2500 (the official -1/2 * 5000 folded in). Hinge and IPO variants as diffusers'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import IndexSampler, LatentPairs
from .base import Batch, TrainContext, encode_rows, mse_per_row


def diffusion_dpo_loss(model_mse_w: torch.Tensor, model_mse_l: torch.Tensor, ref_mse_w: torch.Tensor,
                       ref_mse_l: torch.Tensor, beta: float = 2500.0, loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict[str, float]]:
    model_diff = model_mse_w - model_mse_l
    ref_diff = ref_mse_w - ref_mse_l
    logits = ref_diff - model_diff
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * logits).mean()
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * logits).mean()
    elif loss_type == "ipo":
        loss = ((logits - 1 / (2 * beta)) ** 2).mean()
    else:
        from ...errors import ConfigError

        raise ConfigError(f"unknown DPO loss {loss_type!r}; choose sigmoid, hinge or ipo")
    with torch.no_grad():
        stats = {
            "implicit_acc": float((logits > 0).float().mean()),
            "logit_margin": float(logits.mean()),
            "model_mse_w": float(model_mse_w.mean()),
            "model_mse_l": float(model_mse_l.mean()),
        }
    return loss, stats


class PairSource:
    """Batches of (prompt, winner latent, loser latent) in a seeded, resumable order."""

    def __init__(self, ctx: TrainContext, data: LatentPairs):
        self.ctx, self.data = ctx, data
        self.sampler = IndexSampler(len(data), ctx.cfg.seed, ctx.rank, ctx.world)

    def next_batch(self, n: int) -> Batch:
        idx = self.sampler.take(n)
        return Batch(idx, {"prompts": [self.data.prompts[i] for i in idx], "win": self.data.win[idx], "lose": self.data.lose[idx]})

    def snapshot(self):
        return self.sampler.state_dict()

    def restore(self, snap) -> None:
        self.sampler.load_state_dict(snap)

    def state(self):
        return {"sampler": self.sampler.state_dict()}, {}

    def load_state(self, meta, tensors) -> None:
        self.sampler.load_state_dict(meta["sampler"])


def noised_pair(ctx: TrainContext, batch: Batch, t_low: int = 0):
    """Same t and eps for winner and loser: (x [2n], sigma [2n], t [n], eps [n], x0 [2n])."""
    win, lose = batch.extra["win"].to(ctx.device), batch.extra["lose"].to(ctx.device)
    n = win.shape[0]
    schedule = ctx.host.schedule
    t = torch.randint(t_low, schedule.num_train_timesteps, (n,), generator=ctx.train_gen)
    eps = torch.randn(win.shape, generator=ctx.train_gen, dtype=torch.float32).to(ctx.device)
    sigma = schedule.sigma(t).float().to(ctx.device)
    s = sigma.reshape(-1, 1, 1, 1)
    x0 = torch.cat([win, lose])
    x = torch.cat([win + s * eps, lose + s * eps])
    return x, torch.cat([sigma, sigma]), t, eps, x0


class DiffusionDPOObjective:
    name = "diffusion_dpo"

    def step(self, ctx: TrainContext, batch: Batch) -> dict[str, float]:
        prompts = batch.extra["prompts"]
        cond = encode_rows(ctx, prompts + prompts)
        x, sigma, t, eps, _ = noised_pair(ctx, batch)
        target = torch.cat([eps, eps])
        s = sigma.reshape(-1, 1, 1, 1)
        den = ctx.denoiser_plain
        with torch.no_grad(), ctx.network.disabled(), ctx.autocast():
            x0_ref = den(x, sigma, cond)
        ref_mse = mse_per_row((x - x0_ref.float()) / s, target)
        with ctx.autocast():
            x0 = den(x, sigma, cond)
        model_mse = mse_per_row((x - x0.float()) / s, target)
        n = len(prompts)
        loss, stats = diffusion_dpo_loss(model_mse[:n], model_mse[n:], ref_mse[:n], ref_mse[n:], ctx.cfg.beta, ctx.cfg.dpo_loss)
        ctx.backward(loss)
        stats["loss"] = float(loss.detach())
        stats["pair_t"] = float(t.float().mean())
        return stats
