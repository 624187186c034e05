"""NCP-DPO (Gambashidze et al. 2024): Diffusion-DPO with the distance measured in the feature
space of the frozen base UNet instead of as a noise MSE ("noise-conditioned perception").

As in the NCP code's default `--timestep t-1`: from each noised latent x_t (same t and eps for
winner and loser) one DDPM posterior step to t-1 is taken three times, with the policy's,
the reference's and the true eps, all with the same variance noise (in sigma space: the
eta = 1 ancestral step from sigma(t) to sigma(t-1)). The three x_{t-1} go through the frozen
base UNet (LoRA off) at t-1 up to the last down block (or through the mid block), and
d = mean over (C, H, W) of (E(x_pred) - E(x_true))^2. Gradients flow through E into the
policy's x_{t-1}. Variants (logits = (d_ref,w - d_ref,l) - (d_theta,w - d_theta,l)):
DPO -log sigmoid(beta * logits), CPO -log sigmoid(-beta * (d_theta,w - d_theta,l)) with no
reference, SFT mean d_theta,w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import ConfigError, ModelMismatchError
from ...sampling.step import ancestral_mean, ancestral_sigmas
from .base import Batch, TrainContext, encode_rows, mse_per_row
from .diffusion_dpo import noised_pair


def ncp_loss(d_w: torch.Tensor, d_l: torch.Tensor, ref_d_w: torch.Tensor | None, ref_d_l: torch.Tensor | None,
             beta: float = 2500.0, variant: str = "dpo") -> tuple[torch.Tensor, dict[str, float]]:
    model_diff = d_w - d_l
    stats = {"model_d_w": float(d_w.detach().mean()), "model_d_l": float(d_l.detach().mean())}
    if variant == "dpo":
        if ref_d_w is None or ref_d_l is None:
            raise ConfigError("NCP-DPO needs the reference distances")
        logits = (ref_d_w - ref_d_l) - model_diff
        loss = -F.logsigmoid(beta * logits).mean()
    elif variant == "cpo":
        logits = -model_diff
        loss = -F.logsigmoid(beta * logits).mean()
    elif variant == "sft":
        logits = -model_diff
        loss = d_w.mean()
    else:
        raise ConfigError(f"unknown NCP variant {variant!r}; choose dpo, cpo or sft")
    with torch.no_grad():
        stats["implicit_acc"] = float((logits > 0).float().mean())
        stats["logit_margin"] = float(logits.mean())
    return loss, stats


class _StopForward(Exception):
    pass


def unet_features(ctx: TrainContext, x: torch.Tensor, sigma: torch.Tensor, cond, where: str) -> torch.Tensor:
    """Output of the base UNet's last down block (or mid block) for x at sigma, the rest of the
    UNet skipped. Runs with the LoRA off; keeps the graph to x when grad is enabled."""
    module = ctx.host.feature_module(where)
    store: dict[str, torch.Tensor] = {}

    def hook(mod, args, output):
        store["f"] = output[0] if isinstance(output, (tuple, list)) else output
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        with ctx.network.disabled():
            ctx.denoiser_plain(x, sigma, cond)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "f" not in store:
        raise ModelMismatchError(f"the host's {where} feature block was not reached by the UNet forward")
    f = store["f"]
    if f.shape[0] != x.shape[0]:
        raise ModelMismatchError(f"feature block returned {f.shape[0]} rows for {x.shape[0]} inputs (is CFG on at scale 1?)")
    return f.float()


class NCPObjective:
    name = "ncp_dpo"

    def step(self, ctx: TrainContext, batch: Batch) -> dict[str, float]:
        cfg = ctx.cfg
        prompts = batch.extra["prompts"]
        n = len(prompts)
        cond = encode_rows(ctx, prompts + prompts)
        x, sigma, t, eps, x0_true = noised_pair(ctx, batch, t_low=1)
        schedule = ctx.host.schedule
        sigma_prev = schedule.sigma(t - 1).float().to(ctx.device)
        sigma_prev = torch.cat([sigma_prev, sigma_prev])
        down, up = ancestral_sigmas(sigma.double().cpu(), sigma_prev.double().cpu(), 1.0)
        down, up = down.float().to(ctx.device), up.float().to(ctx.device)
        z = torch.randn(eps.shape, generator=ctx.train_gen, dtype=torch.float32).to(ctx.device)
        noise = torch.cat([z, z]) * up.reshape(-1, 1, 1, 1)
        den = ctx.denoiser_plain
        need_ref = cfg.ncp_variant == "dpo"
        with torch.no_grad():
            x_prev_true = ancestral_mean(x, x0_true, sigma, down) + noise
            targets = [x_prev_true]
            if need_ref:
                with ctx.network.disabled(), ctx.autocast():
                    x0_ref = den(x, sigma, cond).float()
                targets.append(ancestral_mean(x, x0_ref, sigma, down) + noise)
            with ctx.autocast():
                feats = unet_features(ctx, torch.cat(targets), torch.cat([sigma_prev] * len(targets)),
                                      cond.take(torch.arange(2 * n).repeat(len(targets))), cfg.ncp_features)
        f_true = feats[:2 * n]
        with ctx.autocast():
            x0 = den(x, sigma, cond).float()
        x_prev = ancestral_mean(x, x0, sigma, down) + noise
        with ctx.autocast():
            f_pol = unet_features(ctx, x_prev, sigma_prev, cond, cfg.ncp_features)
        d = mse_per_row(f_pol, f_true)
        ref_w = ref_l = None
        if need_ref:
            ref_d = mse_per_row(feats[2 * n:], f_true)
            ref_w, ref_l = ref_d[:n], ref_d[n:]
        loss, stats = ncp_loss(d[:n], d[n:], ref_w, ref_l, cfg.beta, cfg.ncp_variant)
        ctx.backward(loss)
        stats["loss"] = float(loss.detach())
        stats["pair_t"] = float(t.float().mean())
        return stats
