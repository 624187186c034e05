"""SPO: step-wise DPO on pairs of transitions drawn from a shared x_t.

Sampling rounds run the per-step resampler in its `pairs` mode with the current policy (LoRA on):
at every step inside the window a pool of k candidates is drawn from the same parent, scored
by the (step-aware) scorer, the best and worst become a pair when their 2-way softmax gap
passes the threshold, and a random candidate continues (SPO's SD1.5 form). With inner_steps
= j each candidate runs j more steps before scoring and every transition of both chains
becomes a pair (the SDXL "multi-step" form, whose inner pairs have different parents).

The loss is SPO's: -log sigmoid(beta * (log r_w - log r_l)), r = clamp(p_theta / p_ref, 1-eps,
1+eps), with the per-element-mean Gaussian log-density of each stored transition under the
CFG-combined policy and reference means. Winner and loser of a shared-parent pair share x_t,
so the policy mean is computed once per pair (with grad) and the reference mean once (no
grad), not once per member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ...errors import SPOError
from ...sampling.resampler import ResamplerConfig, TransitionPair, resample
from ...sampling.samplers import StepInfo
from ...sampling.step import step_rows, transition_log_prob
from ..data import IndexSampler
from .base import Batch, TrainContext, encode_rows, initial_noise, stack_or_none


def spo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_logp_w: torch.Tensor, ref_logp_l: torch.Tensor,
             beta: float = 10.0, eps: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """SPO's loss exactly as train_spo.py computes it, and its diagnostics.

    ratio = clamp(exp(log p_theta - log p_ref), 1 - eps, 1 + eps); loss = -mean log sigmoid(
    beta * log ratio_w - beta * log ratio_l). Outside [1-eps, 1+eps] a member's gradient is zero.
    """
    lr_w = logp_w - ref_logp_w
    lr_l = logp_l - ref_logp_l
    ratio_w = torch.clamp(torch.exp(lr_w), 1 - eps, 1 + eps)
    ratio_l = torch.clamp(torch.exp(lr_l), 1 - eps, 1 + eps)
    loss = -F.logsigmoid(beta * torch.log(ratio_w) - beta * torch.log(ratio_l)).mean()
    with torch.no_grad():
        margin = (lr_w - lr_l).float()
        stats = {
            "ratio_win": float(torch.exp(lr_w).mean()),
            "ratio_lose": float(torch.exp(lr_l).mean()),
            "implicit_acc": float((margin > 0).float().mean()),
            "logratio_margin": float(margin.mean()),
        }
    return loss, stats


@dataclass
class PairItem:
    """One stored training pair (CPU tensors). `x_t_lose` is None when both members share x_t."""

    x_t: torch.Tensor
    x_t_lose: torch.Tensor | None
    x_win: torch.Tensor
    x_lose: torch.Tensor
    sigma: float
    sigma_next: float
    eta: float
    t: float
    score_win: float
    score_lose: float
    prompt: str

    @classmethod
    def from_transition(cls, p: TransitionPair, prompt: str) -> "PairItem":
        shared = p.shared_parent
        return cls(p.x_t.detach().float().cpu(), None if shared else p.x_t_lose.detach().float().cpu(),
                   p.x_win.detach().float().cpu(), p.x_lose.detach().float().cpu(), float(p.sigma), float(p.sigma_next),
                   float(p.eta), float(p.t), float(p.score_win), float(p.score_lose), prompt)


def pair_log_probs(denoiser, network, pairs: Sequence[PairItem], cond, device: torch.device,
                   autocast=None, reference: bool = True, schedule=None) -> dict[str, torch.Tensor]:
    """Log-probabilities of every pair's winner and loser under the policy (with grad) and the
    reference (no grad, LoRA multiplier 0). `cond` has one row per pair.

    Parents are evaluated once: one row per shared-parent pair, two rows for a multi-step pair.
    `schedule` gives the step (a flow model's SDE/CPS step; DDIM(eta) when None or discrete).
    """
    import contextlib

    autocast = autocast or contextlib.nullcontext
    rows, cond_rows, win_idx, lose_idx = [], [], [], []
    sig, sig_next = [], []
    eta = pairs[0].eta
    if any(p.eta != eta for p in pairs):
        raise SPOError("the pairs of one batch were sampled with different eta / noise levels")
    for i, p in enumerate(pairs):
        win_idx.append(len(rows))
        rows.append(p.x_t)
        cond_rows.append(i)
        sig.append(p.sigma), sig_next.append(p.sigma_next)
        if p.x_t_lose is not None:
            rows.append(p.x_t_lose)
            cond_rows.append(i)
            sig.append(p.sigma), sig_next.append(p.sigma_next)
        lose_idx.append(len(rows) - 1)
    x = torch.stack(rows).to(device)
    sigma = torch.tensor(sig, dtype=torch.float32, device=device)
    cond_b = cond.take(torch.tensor(cond_rows)) if len(cond_rows) != cond.batch_size or cond_rows != list(range(cond.batch_size)) else cond
    sig_next_t = torch.tensor(sig_next, dtype=torch.float32)
    wi, li = torch.tensor(win_idx, device=device), torch.tensor(lose_idx, device=device)
    x_win = torch.stack([p.x_win for p in pairs]).to(device)
    x_lose = torch.stack([p.x_lose for p in pairs]).to(device)
    out = {}
    if reference:
        with torch.no_grad(), network.disabled(), autocast():
            x0_ref = denoiser(x, sigma, cond_b)
        mean_ref, up = step_rows(schedule, x, x0_ref.float(), sigma, sig_next_t, eta)
        out["ref_logp_w"] = transition_log_prob(x_win, mean_ref[wi], up[wi])
        out["ref_logp_l"] = transition_log_prob(x_lose, mean_ref[li], up[li])
    with autocast():
        x0 = denoiser(x, sigma, cond_b)
    mean, up = step_rows(schedule, x, x0.float(), sigma, sig_next_t, eta)
    out["logp_w"] = transition_log_prob(x_win, mean[wi], up[wi])
    out["logp_l"] = transition_log_prob(x_lose, mean[li], up[li])
    return out


class SPOSource:
    """Sampling rounds with the current policy; their pairs wait in a buffer until trained."""

    def __init__(self, ctx: TrainContext, prompts: list[str], scorer):
        if scorer is None:
            raise SPOError("SPO needs a scorer to rank the candidates (the step-aware preference model, PickScore, ...)")
        self.ctx, self.prompts, self.scorer = ctx, prompts, scorer
        cfg = ctx.cfg
        self.sampler = IndexSampler(len(prompts), cfg.seed, ctx.rank, ctx.world)
        self.sample_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1 + ctx.rank)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 2)  # same on every process
        self.buffer: list[PairItem] = []
        self.rounds = 0
        self.round_stats: dict[str, float] = {}
        self.gaps: list[float] = []  # pool gaps of the rounds since the last pair (for the no-pairs advice)
        auto = cfg.auto_threshold if cfg.auto_threshold is not None else not getattr(scorer, "spo_scale", True)
        self.threshold: float | None = None if auto else float(cfg.threshold)  # None: calibrated by the first round
        self.resampler_config = ResamplerConfig(
            k=cfg.k, policy="pairs", eta=ctx.eta, window=(cfg.min_train_t, cfg.max_train_t), inner_steps=cfg.inner_steps,
            threshold=0.0 if auto else cfg.threshold, score_scale=float(getattr(scorer, "pair_scale", 1.0)),
            final_decode=True)
        if cfg.threshold_max is not None and not auto:
            from .lpo import dynamic_threshold, noise_std_by_timestep

            stds = noise_std_by_timestep(ctx.sigmas, ctx.schedule, ctx.eta)
            self.resampler_config.threshold_fn = dynamic_threshold(stds, cfg.threshold, cfg.threshold_max)

    # -- data -----------------------------------------------------------------------------------
    def next_batch(self, n: int) -> Batch:
        empty = 0
        while len(self.buffer) < n:
            added = self.collect()
            empty = 0 if added else empty + 1
            if added:
                self.gaps = []
            if empty == self.warn_after:
                self.ctx.warn(self.no_pairs_advice(empty))
            if empty >= self.ctx.max_empty_rounds:
                raise SPOError(self.no_pairs_advice(empty) + " Training stopped.")
        items, self.buffer = self.buffer[:n], self.buffer[n:]
        return Batch(items)

    warn_after = 2  # empty rounds before the user is told what to change

    def _calibrate(self, gaps: list[float], local: list[PairItem]) -> list[PairItem]:
        """auto_threshold: the median pool gap of the first round (over every process) becomes the
        threshold, so half of the pools make pairs; this round's pairs are filtered by it."""
        every = [g for part in self.ctx.gather_objects(gaps) for g in part] if self.ctx.world > 1 else gaps
        if not every:
            return local
        every = sorted(every)
        self.threshold = every[len(every) // 2]
        self.resampler_config.threshold = self.threshold
        scale = self.resampler_config.score_scale
        from ...sampling.resampler import pair_gap

        kept = [p for p in local if pair_gap(p.score_win, p.score_lose, scale) > self.threshold]
        self.ctx.log_event("threshold_calibrated", threshold=self.threshold, pools=len(every))
        import logging

        logging.getLogger(__name__).info(
            "SPO pair threshold calibrated to %.5g (the median gap of %d pools: the %s scorer's scores are not on SPO's "
            "scale; set auto_threshold=false to use threshold %g as it is)", self.threshold, len(every), self.scorer.name,
            self.ctx.cfg.threshold)
        return kept

    def no_pairs_advice(self, rounds: int) -> str:
        """What a run that makes no pairs measured, and the settings that would make some."""
        cfg = self.ctx.cfg
        threshold = self.threshold if self.threshold is not None else cfg.threshold
        text = f"no candidate pair passed the threshold {threshold:g} in {rounds} sampling rounds"
        if not self.gaps:
            return text + ": no pool was drawn (check the step window and k)."
        gaps = sorted(self.gaps)
        median, top = gaps[len(gaps) // 2], gaps[-1]
        suggest = max(round(median, 4), 1e-4)
        return (f"{text}: the {self.scorer.name} scorer's score gaps between the best and worst of {cfg.k} candidates "
                f"(as SPO measures them, p_win - p_lose) were at most {top:.4f}, median {median:.4f}. Lower the threshold "
                f"to about {suggest:g} (half of the pools then make a pair), raise k, or use a scorer that tells this "
                "model's candidates apart (the step-aware preference model for SPO).")

    def collect(self) -> int:
        """One sampling round; returns the number of pairs added (after sharing across processes)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        prompts = [self.prompts[i] for i in self.sampler.take(cfg.sample_batch_size)]
        cond = ctx.host.encode_prompts(prompts, cfg.negative_prompt or None, cfg.height, cfg.width)
        sigmas = ctx.sigmas
        x = initial_noise(ctx, len(prompts), float(sigmas[0]), self.sample_gen)
        total = len(sigmas) - 1

        def on_step(info: StepInfo) -> None:
            ctx.sampling_progress(info.i + 1, total, "sampling candidate pools")

        with torch.no_grad(), ctx.network.scaled(1.0), ctx.autocast():
            res = resample(ctx.denoiser_cfg, cond, x, sigmas, ctx.schedule, self.scorer, ctx.host.decode, prompts,
                           self.resampler_config, generator=self.sample_gen, callback=on_step, cancel=ctx.cancel)
        local = [PairItem.from_transition(p, prompts[p.row]) for p in res.pairs]
        gaps = _pool_gaps(res.trace, self.resampler_config.score_scale)
        self.gaps.extend(gaps)
        if self.threshold is None:
            local = self._calibrate(gaps, local)
        items = ctx.share_items(local, self.shuffle_gen)
        self.rounds += 1
        margins = [p.score_win - p.score_lose for p in local]
        scores = torch.cat([r.scores.flatten() for r in res.trace if r.scores is not None]) if res.trace else torch.zeros(0)
        self.round_stats = {
            "round_pairs": float(len(items)),
            "round_separate_parents": float(sum(p.x_t_lose is not None for p in local)),
            "score_margin": float(sum(margins) / len(margins)) if margins else float("nan"),
            "score_mean": float(scores.mean()) if scores.numel() else float("nan"),
            "score_std": float(scores.std()) if scores.numel() > 1 else float("nan"),
        }
        ctx.log_event("round", pairs=len(items), local_pairs=len(local), gathered=getattr(ctx, "last_gathered", len(items)),
                      prompts=len(prompts), **self.round_stats)
        self.buffer.extend(items)
        return len(items)

    # -- resumable state -------------------------------------------------------------------------
    def snapshot(self):
        return (self.sampler.state_dict(), self.sample_gen.get_state(), self.shuffle_gen.get_state(), list(self.buffer),
                self.rounds, dict(self.round_stats), self.threshold)

    def restore(self, snap) -> None:
        sampler, sg, shg, buf, rounds, stats, threshold = snap
        self.threshold = threshold
        self.resampler_config.threshold = threshold if threshold is not None else 0.0
        self.sampler.load_state_dict(sampler)
        self.sample_gen.set_state(sg)
        self.shuffle_gen.set_state(shg)
        self.buffer, self.rounds, self.round_stats = list(buf), rounds, stats

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta = {"sampler": self.sampler.state_dict(), "rounds": self.rounds, "round_stats": self.round_stats,
                "threshold": self.threshold,
                "buffer": [{"sigma": p.sigma, "sigma_next": p.sigma_next, "eta": p.eta, "t": p.t, "score_win": p.score_win,
                            "score_lose": p.score_lose, "prompt": p.prompt, "shared": p.x_t_lose is None} for p in self.buffer]}
        tensors = {"rng.sample": self.sample_gen.get_state(), "rng.shuffle": self.shuffle_gen.get_state()}
        if self.buffer:
            tensors["buffer.x_t"] = torch.stack([p.x_t for p in self.buffer])
            tensors["buffer.x_win"] = torch.stack([p.x_win for p in self.buffer])
            tensors["buffer.x_lose"] = torch.stack([p.x_lose for p in self.buffer])
            lose_parents = stack_or_none([p.x_t_lose for p in self.buffer if p.x_t_lose is not None])
            if lose_parents is not None:
                tensors["buffer.x_t_lose"] = lose_parents
        return meta, tensors

    def load_state(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.sampler.load_state_dict(meta["sampler"])
        self.rounds = int(meta["rounds"])
        if meta.get("threshold") is not None:
            self.threshold = float(meta["threshold"])
            self.resampler_config.threshold = self.threshold
        self.round_stats = dict(meta.get("round_stats", {}))
        self.sample_gen.set_state(tensors["rng.sample"])
        self.shuffle_gen.set_state(tensors["rng.shuffle"])
        self.buffer = []
        j = 0
        for i, m in enumerate(meta["buffer"]):
            lose_parent = None
            if not m["shared"]:
                lose_parent = tensors["buffer.x_t_lose"][j]
                j += 1
            self.buffer.append(PairItem(tensors["buffer.x_t"][i], lose_parent, tensors["buffer.x_win"][i],
                                        tensors["buffer.x_lose"][i], m["sigma"], m["sigma_next"], m["eta"], m["t"],
                                        m["score_win"], m["score_lose"], m["prompt"]))


def _pool_gaps(trace, scale: float) -> list[float]:
    """p_win - p_lose of the best and worst candidate of every pool of a round."""
    from ...sampling.resampler import pair_gap

    gaps = []
    for record in trace:
        if record.scores is None:
            continue
        scores = record.scores.reshape(record.scores.shape[0], -1).float()  # [k, b]
        for hi, lo in zip(scores.max(0).values.tolist(), scores.min(0).values.tolist()):
            gaps.append(pair_gap(hi, lo, scale))
    return gaps


class SPOObjective:
    name = "spo"

    def step(self, ctx: TrainContext, batch: Batch) -> dict[str, float]:
        pairs: list[PairItem] = batch.items
        cond = encode_rows(ctx, [p.prompt for p in pairs])
        lp = pair_log_probs(ctx.denoiser_cfg, ctx.network, pairs, cond, ctx.device, ctx.autocast, schedule=ctx.schedule)
        loss, stats = spo_loss(lp["logp_w"], lp["logp_l"], lp["ref_logp_w"], lp["ref_logp_l"], ctx.cfg.beta, ctx.cfg.clip_eps)
        ctx.backward(loss)
        stats["loss"] = float(loss.detach())
        stats["score_margin"] = sum(p.score_win - p.score_lose for p in pairs) / len(pairs)
        stats["pair_t"] = sum(p.t for p in pairs) / len(pairs)
        if not math.isfinite(stats["score_margin"]):
            stats.pop("score_margin")
        return stats
