"""DDPO (Black et al. 2023), the PPO-clipped importance-sampling estimator (DDPO_IS), as
ddpo-pytorch implements it.

A round samples images with the current policy (the plain DDIM(eta) sampler, recording each
transition's log-probability under the sampling policy), scores the final images with any
scorer (JPEG compressibility needs no weights) and turns rewards into advantages, normalized
per prompt over a buffer of its recent rewards once it has `min_count` of them (batch
statistics before). Training re-evaluates each recorded transition under the current policy:
ratio = exp(log p_theta - log p_old), loss = mean max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)),
with A clipped to +-adv_clip; one optimizer step accumulates every trained timestep of its
trajectories, visited in a random order per trajectory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ...sampling.samplers import StepInfo, sample_ancestral
from ...sampling.step import step_rows, transition_log_prob
from ..data import IndexSampler
from .base import Batch, TrainContext, encode_rows, initial_noise


def ddpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_range: float = 1e-4,
              adv_clip: float = 5.0) -> tuple[torch.Tensor, dict[str, float]]:
    adv = torch.clamp(advantages, -adv_clip, adv_clip)
    ratio = torch.exp(logp - logp_old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    with torch.no_grad():
        stats = {
            "approx_kl": float(0.5 * torch.mean((logp - logp_old) ** 2)),
            "clipfrac": float(torch.mean((torch.abs(ratio - 1.0) > clip_range).float())),
            "ratio": float(ratio.mean()),
        }
    return loss, stats


class PerPromptStatTracker:
    """ddpo-pytorch's stat_tracking.PerPromptStatTracker (population std, +1e-6).

    buffer_size 0 turns per-prompt tracking off: advantages from the batch mean/std (+1e-8).
    """

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        if self.buffer_size <= 0:
            return (rewards - rewards.mean()) / (rewards.std() + 1e-8)
        prompts_arr = np.array(prompts, dtype=object)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mask = prompts_arr == prompt
            prompt_rewards = rewards[mask]
            if prompt not in self.stats:
                self.stats[prompt] = deque(maxlen=self.buffer_size)
            self.stats[prompt].extend(prompt_rewards.tolist())
            if len(self.stats[prompt]) < self.min_count:
                mean, std = np.mean(rewards), np.std(rewards) + 1e-6
            else:
                mean, std = np.mean(self.stats[prompt]), np.std(self.stats[prompt]) + 1e-6
            advantages[mask] = (prompt_rewards - mean) / std
        return advantages

    def state_dict(self) -> dict:
        return {p: list(d) for p, d in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


@dataclass
class Trajectory:
    """One sampled image's recorded transitions (CPU): x [T,C,h,w] -> x_next [T,C,h,w]."""

    x: torch.Tensor
    x_next: torch.Tensor
    sigma: torch.Tensor  # [T]
    sigma_next: torch.Tensor  # [T]
    logp_old: torch.Tensor  # [T]
    advantage: float
    reward: float
    prompt: str


class DDPOSource:
    def __init__(self, ctx: TrainContext, prompts: list[str], scorer):
        from ...errors import SPOError

        if scorer is None:
            raise SPOError("DDPO needs a reward scorer (e.g. jpeg_compressibility, aesthetic, pickscore)")
        self.ctx, self.prompts, self.scorer = ctx, prompts, scorer
        cfg = ctx.cfg
        self.sampler = IndexSampler(len(prompts), cfg.seed, ctx.rank, ctx.world)
        self.sample_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 11 + ctx.rank)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 12)
        self.tracker = PerPromptStatTracker(cfg.ddpo_buffer_size, cfg.ddpo_min_count)
        self.buffer: list[Trajectory] = []
        self.rounds = 0
        self.round_stats: dict[str, float] = {}

    def next_batch(self, n: int) -> Batch:
        empty = 0
        while len(self.buffer) < n:
            empty = 0 if self.collect() else empty + 1
            if empty >= self.ctx.max_empty_rounds:
                from ...errors import SPOError

                raise SPOError(
                    f"{empty} sampling rounds in a row gave nothing to train: every group's rewards tied, so every "
                    f"advantage was 0 (the {self.scorer.name} scorer does not tell this model's images apart). Use a "
                    "scorer that does, a larger group_size, or a higher noise_level / eta. Training stopped.")
        items, self.buffer = self.buffer[:n], self.buffer[n:]
        return Batch(items)

    def rollout(self, prompts: list[str]):
        """Sample one image per prompt with the current policy, recording every stochastic transition,
        and score the images; returns (SampleResult, rewards [N] on the CPU)."""
        ctx = self.ctx
        cond = encode_rows(ctx, prompts)
        sigmas = ctx.sigmas
        x = initial_noise(ctx, len(prompts), float(sigmas[0]), self.sample_gen)
        total = len(sigmas) - 1

        def on_step(info: StepInfo) -> None:
            ctx.sampling_progress(info.i + 1, total, "sampling trajectories")

        with torch.no_grad(), ctx.network.scaled(1.0), ctx.autocast():
            res = sample_ancestral(ctx.denoiser_cfg, cond, x, sigmas, eta=ctx.eta, generator=self.sample_gen,
                                   schedule=ctx.schedule, record=True, callback=on_step, cancel=ctx.cancel)
            images = ctx.host.decode(ctx.schedule.model_latent(res.x, float(sigmas[-1])))
            rewards = self.scorer.score(images, prompts if getattr(self.scorer, "needs_prompt", True) else None,
                                        torch.zeros(len(prompts))).float().cpu()
        return res, rewards

    def advantages(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """DDPO: per-prompt statistics over a buffer of recent rewards (batch statistics until min_count)."""
        return self.tracker.update(prompts, rewards)

    def collect(self) -> int:
        cfg = self.ctx.cfg
        base = [self.prompts[i] for i in self.sampler.take(cfg.sample_batch_size)]
        return self._collect_prompts([p for p in base for _ in range(cfg.ddpo_samples_per_prompt)])

    def _collect_prompts(self, prompts: list[str]) -> int:
        """A round on these prompts: rollouts, advantages over every process's rewards, the buffer."""
        ctx = self.ctx
        res, rewards = self.rollout(prompts)
        # advantages from every process's rewards, as ddpo-pytorch gathers them
        gathered = ctx.gather_objects((prompts, rewards.tolist()))
        all_prompts = [p for ps, _ in gathered for p in ps]
        all_rewards = np.array([r for _, rs in gathered for r in rs], dtype=np.float64)
        adv_all = self.advantages(all_prompts, all_rewards)
        offset = sum(len(ps) for ps, _ in gathered[:ctx.rank])
        adv = adv_all[offset:offset + len(prompts)]
        tr = res.transitions
        xs = torch.stack([t.x for t in tr], 1).float().cpu()
        xn = torch.stack([t.x_next for t in tr], 1).float().cpu()
        lp = torch.stack([t.log_prob for t in tr], 1).float().cpu()
        sig = torch.tensor([t.sigma for t in tr], dtype=torch.float32)
        sig_n = torch.tensor([t.sigma_next for t in tr], dtype=torch.float32)
        items = [Trajectory(xs[b], xn[b], sig, sig_n, lp[b], float(adv[b]), float(rewards[b]), prompts[b])
                 for b in range(len(prompts))]
        kept = self.keep(items)
        perm = torch.randperm(len(kept), generator=self.shuffle_gen).tolist()
        self.buffer.extend(kept[i] for i in perm)
        self.rounds += 1
        self.round_stats = {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std())}
        ctx.log_event("round", samples=len(items), kept=len(kept), **self.round_stats)
        return len(kept)

    def keep(self, items: list[Trajectory]) -> list[Trajectory]:
        """The trajectories a round trains on (DDPO: all of them)."""
        return items

    def snapshot(self):
        return (self.sampler.state_dict(), self.sample_gen.get_state(), self.shuffle_gen.get_state(), list(self.buffer),
                self.tracker.state_dict(), self.rounds, dict(self.round_stats))

    def restore(self, snap) -> None:
        sampler, sg, shg, buf, tracker, rounds, stats = snap
        self.sampler.load_state_dict(sampler)
        self.sample_gen.set_state(sg)
        self.shuffle_gen.set_state(shg)
        self.buffer = list(buf)
        self.tracker.load_state_dict(tracker)
        self.rounds, self.round_stats = rounds, stats

    def state(self):
        meta = {"sampler": self.sampler.state_dict(), "tracker": self.tracker.state_dict(), "rounds": self.rounds,
                "round_stats": self.round_stats,
                "buffer": [{"advantage": t.advantage, "reward": t.reward, "prompt": t.prompt} for t in self.buffer]}
        tensors = {"rng.sample": self.sample_gen.get_state(), "rng.shuffle": self.shuffle_gen.get_state()}
        if self.buffer:
            for name in ("x", "x_next", "sigma", "sigma_next", "logp_old"):
                tensors[f"buffer.{name}"] = torch.stack([getattr(t, name) for t in self.buffer])
        return meta, tensors

    def load_state(self, meta, tensors) -> None:
        self.sampler.load_state_dict(meta["sampler"])
        self.tracker.load_state_dict(meta["tracker"])
        self.rounds, self.round_stats = int(meta["rounds"]), dict(meta.get("round_stats", {}))
        self.sample_gen.set_state(tensors["rng.sample"])
        self.shuffle_gen.set_state(tensors["rng.shuffle"])
        self.buffer = [Trajectory(tensors["buffer.x"][i], tensors["buffer.x_next"][i], tensors["buffer.sigma"][i],
                                  tensors["buffer.sigma_next"][i], tensors["buffer.logp_old"][i], m["advantage"],
                                  m["reward"], m["prompt"]) for i, m in enumerate(meta["buffer"])]


def trajectory_log_probs(ctx: TrainContext, trajs: list[Trajectory], steps: list[int], cond,
                         reference: bool = False) -> dict[str, torch.Tensor]:
    """Re-evaluate transition `steps[b]` of every trajectory b under the current policy (with grad):
    its log-probability, the step's mean and std; with `reference`, also the LoRA-off mean (no grad)."""
    x = torch.stack([t.x[i] for t, i in zip(trajs, steps)]).to(ctx.device)
    x_next = torch.stack([t.x_next[i] for t, i in zip(trajs, steps)]).to(ctx.device)
    sigma = torch.stack([t.sigma[i] for t, i in zip(trajs, steps)])
    sigma_next = torch.stack([t.sigma_next[i] for t, i in zip(trajs, steps)])
    sig_d = sigma.to(ctx.device)
    out = {}
    if reference:
        with torch.no_grad(), ctx.network.disabled(), ctx.autocast():
            x0_ref = ctx.denoiser_cfg(x, sig_d, cond)
        out["mean_ref"], _ = step_rows(ctx.schedule, x, x0_ref.float(), sigma, sigma_next, ctx.eta)
    with ctx.autocast():
        x0 = ctx.denoiser_cfg(x, sig_d, cond)
    mean, std = step_rows(ctx.schedule, x, x0.float(), sigma, sigma_next, ctx.eta)
    out.update(logp=transition_log_prob(x_next, mean, std), mean=mean, std=std, sigma=sigma, sigma_next=sigma_next)
    return out


def train_trajectory_steps(ctx: TrainContext, trajs: list[Trajectory], columns: list[list[int]],
                           loss_fn, reference: bool = False) -> dict[str, float]:
    """The micro-steps of one optimizer step over trajectories (DDPO's and GRPO's shared loop): for every column
    of step indices (one per trajectory), re-evaluate those transitions, `loss_fn(out, logp_old, advantages)` ->
    (loss, stats), backward loss / len(columns); returns the stats averaged, with the mean reward and |advantage|."""
    n = len(trajs)
    cond = encode_rows(ctx, [t.prompt for t in trajs])
    adv = torch.tensor([t.advantage for t in trajs], dtype=torch.float32, device=ctx.device)
    totals: dict[str, float] = {}
    for idx in columns:
        logp_old = torch.stack([t.logp_old[i] for t, i in zip(trajs, idx)]).to(ctx.device)
        out = trajectory_log_probs(ctx, trajs, idx, cond, reference=reference)
        loss, stats = loss_fn(out, logp_old, adv)
        ctx.backward(loss / len(columns))
        stats["loss"] = float(loss.detach())
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v / len(columns)
    totals["reward"] = sum(t.reward for t in trajs) / n
    totals["advantage_abs"] = sum(abs(t.advantage) for t in trajs) / n
    return totals


class DDPOObjective:
    name = "ddpo"

    def step(self, ctx: TrainContext, batch: Batch) -> dict[str, float]:
        """Every trajectory's first int(steps * fraction) steps of its own random order."""
        cfg = ctx.cfg
        trajs: list[Trajectory] = batch.items
        steps = trajs[0].x.shape[0]
        n_train = max(1, int(steps * cfg.ddpo_timestep_fraction))
        perms = torch.stack([torch.randperm(steps, generator=ctx.train_gen) for _ in trajs])

        def loss_fn(out, logp_old, adv):
            return ddpo_loss(out["logp"], logp_old, adv, cfg.ddpo_clip_range, cfg.ddpo_adv_clip)

        return train_trajectory_steps(ctx, trajs, [perms[:, j].tolist() for j in range(n_train)], loss_fn)
