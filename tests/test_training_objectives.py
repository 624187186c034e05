"""Each objective's loss against its reference formula (spo-method.md §1.4, §5.1, §5.2, §6), the
SPO clamp's zero gradient, SPO's shared-parent evaluation against the VP-space DDIM formula,
Diffusion-DPO in sigma space against the diffusers VP computation, NCP's features against
the UNet's own down blocks, and DDPO's per-prompt statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spo_core.sampling import CountingDenoiser, ResamplerConfig, resample
from spo_core.training import TrainConfig, Trainer, inject_lora
from spo_core.training.objectives import (PairItem, PerPromptStatTracker, ddpo_loss, diffusion_dpo_loss, ncp_loss,
                                          pair_log_probs, spo_loss, unet_features)
from test_training_support import BrightnessScorer, randomize, single_thread, tiny_host, write_pair_folder


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x


# -- pure formulas ---------------------------------------------------------------------------------


def test_spo_loss_is_the_clamped_dpo_formula():
    lw = torch.tensor([-1.00, -2.0, -0.5], dtype=torch.float64)
    ll = torch.tensor([-1.20, -1.9, -0.4], dtype=torch.float64)
    rw = torch.tensor([-1.03, -2.5, -0.5], dtype=torch.float64)
    rl = torch.tensor([-1.10, -1.9, -0.3], dtype=torch.float64)
    loss, stats = spo_loss(lw, ll, rw, rl, beta=10.0, eps=0.1)
    want = 0.0
    for a, b, c, d in zip(lw.tolist(), ll.tolist(), rw.tolist(), rl.tolist()):
        r_w = min(max(math.exp(a - c), 0.9), 1.1)
        r_l = min(max(math.exp(b - d), 0.9), 1.1)
        want += -_logsig(10 * math.log(r_w) - 10 * math.log(r_l)) / 3
    assert float(loss) == pytest.approx(want, rel=1e-12)
    margins = [(a - c) - (b - d) for a, b, c, d in zip(lw.tolist(), ll.tolist(), rw.tolist(), rl.tolist())]
    assert stats["implicit_acc"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert stats["logratio_margin"] == pytest.approx(sum(margins) / 3, rel=1e-6)


def test_spo_clamp_zeroes_the_gradient_outside_the_trust_region():
    ref = torch.zeros(4, dtype=torch.float64)
    # log ratios: inside, inside, above 1+eps, below 1-eps
    lw = torch.tensor([0.05, -0.05, math.log(1.2), math.log(0.8)], dtype=torch.float64, requires_grad=True)
    ll = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss, _ = spo_loss(lw, ll, ref, ref, beta=10.0, eps=0.1)
    loss.backward()
    assert (lw.grad[:2].abs() > 1e-6).all()
    assert lw.grad[2] == 0 and lw.grad[3] == 0
    # the bound is [1-eps, 1+eps] on the ratio, not on the log-ratio
    x = torch.tensor([math.log(1.099), math.log(1.101)], dtype=torch.float64, requires_grad=True)
    spo_loss(x, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))[0].backward()
    assert x.grad[0] != 0 and x.grad[1] == 0


def test_diffusion_dpo_loss_equals_the_official_half_beta_5000_form():
    g = torch.Generator().manual_seed(0)
    mw, ml, rw, rl = (torch.rand(6, generator=g, dtype=torch.float64) * 0.01 for _ in range(4))
    loss, stats = diffusion_dpo_loss(mw, ml, rw, rl, beta=2500.0)
    # DiffusionDPO/train.py: -mean log sigmoid(-0.5 * 5000 * ((m_w - m_l) - (r_w - r_l)))
    inner = (mw - ml) - (rw - rl)
    want = sum(-_logsig(-0.5 * 5000 * float(v)) for v in inner) / 6
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert stats["implicit_acc"] == pytest.approx(float((inner < 0).double().mean()))
    logits = (rw - rl) - (mw - ml)
    hinge, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=2500.0, loss_type="hinge")
    assert float(hinge) == pytest.approx(float(torch.relu(1 - 2500 * logits).mean()))
    ipo, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=2500.0, loss_type="ipo")
    assert float(ipo) == pytest.approx(float(((logits - 1 / 5000) ** 2).mean()))


def test_ncp_variants():
    dw = torch.tensor([0.10, 0.30], dtype=torch.float64)
    dl = torch.tensor([0.20, 0.25], dtype=torch.float64)
    rw = torch.tensor([0.12, 0.28], dtype=torch.float64)
    rl = torch.tensor([0.18, 0.26], dtype=torch.float64)
    beta = 25.0
    dpo, _ = ncp_loss(dw, dl, rw, rl, beta, "dpo")
    want = sum(-_logsig(beta * ((c - d) - (a - b))) for a, b, c, d in zip(dw.tolist(), dl.tolist(), rw.tolist(), rl.tolist())) / 2
    assert float(dpo) == pytest.approx(want, rel=1e-12)
    cpo, _ = ncp_loss(dw, dl, None, None, beta, "cpo")
    assert float(cpo) == pytest.approx(sum(-_logsig(-beta * (a - b)) for a, b in zip(dw.tolist(), dl.tolist())) / 2, rel=1e-12)
    sft, _ = ncp_loss(dw, dl, None, None, beta, "sft")
    assert float(sft) == pytest.approx(0.2)


def test_ddpo_loss_is_ppo_clipped_and_uses_clipped_advantages():
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    old = torch.tensor([-1.0, -1.5, -0.5, -1.00005], dtype=torch.float64)
    adv = torch.tensor([1.0, 2.0, -3.0, 9.0], dtype=torch.float64)
    eps = 1e-4
    loss, stats = ddpo_loss(logp, old, adv, clip_range=eps, adv_clip=5.0)
    want = 0.0
    for lp, lo, a in zip(logp.tolist(), old.tolist(), adv.tolist()):
        a = max(-5.0, min(5.0, a))
        r = math.exp(lp - lo)
        want += max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)) / 4
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert stats["clipfrac"] == pytest.approx(0.5)  # rows 1 and 2 leave [1-eps, 1+eps]


def test_per_prompt_stat_tracker_follows_ddpo_pytorch():
    tr = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["a", "a", "b"]
    r1 = np.array([1.0, 3.0, 10.0])
    adv = tr.update(prompts, r1)
    # fewer than min_count rewards per prompt: batch statistics (population std + 1e-6)
    np.testing.assert_allclose(adv, (r1 - r1.mean()) / (r1.std() + 1e-6))
    r2 = np.array([5.0, 7.0, 2.0])
    adv2 = tr.update(prompts, r2)
    hist_a = np.array([1.0, 3.0, 5.0, 7.0])  # 4 >= 3: prompt a uses its own buffer
    np.testing.assert_allclose(adv2[:2], (r2[:2] - hist_a.mean()) / (hist_a.std() + 1e-6))
    np.testing.assert_allclose(adv2[2], (2.0 - r2.mean()) / (r2.std() + 1e-6))  # b has 2 < 3
    tr.update(["a"], np.array([9.0]))
    assert list(tr.stats["a"]) == [3.0, 5.0, 7.0, 9.0]  # buffer_size 4
    off = PerPromptStatTracker(buffer_size=0, min_count=16)
    np.testing.assert_allclose(off.update(prompts, r1), (r1 - r1.mean()) / (r1.std() + 1e-8))


# -- on the tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host():
    with single_thread():
        yield tiny_host()


def _pairs(host, network, multistep=False, seed=0):
    sched = host.schedule
    sigmas = sched.spo_sigmas(4)
    cond = host.encode_prompts(["a cat", "a dog"], None, 16, 16)
    x = torch.randn(host.latent_shape(2, 16, 16), generator=torch.Generator().manual_seed(seed)) * float((1 + sigmas[0] ** 2).sqrt())
    cfg = ResamplerConfig(k=2, policy="pairs", threshold=0.0, inner_steps=3 if multistep else 0)
    with torch.no_grad():
        res = resample(host.denoiser(5.0), cond, x, sigmas, sched, BrightnessScorer(), host.decode, ["a cat", "a dog"], cfg, seed=seed)
    items = [PairItem.from_transition(p, ["a cat", "a dog"][p.row]) for p in res.pairs]
    return items, host.encode_prompts([p.prompt for p in items], None, 16, 16)


def _vp_logp(x_next_sigma, x_sigma, eps_hat, t, t_prev, ab):
    """SPO's ddim_with_logprob in VP space (spo-method.md §1.4), per-element mean."""
    a_t, a_p = float(ab[t]), float(ab[t_prev])
    s_t = math.sqrt((1 - a_t) / a_t)
    s_p = math.sqrt((1 - a_p) / a_p)
    x_t = x_sigma / math.sqrt(1 + s_t ** 2)
    x_prev = x_next_sigma / math.sqrt(1 + s_p ** 2)
    x0 = (x_t - math.sqrt(1 - a_t) * eps_hat) / math.sqrt(a_t)
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    mu = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - var) * eps_hat
    std = math.sqrt(var)
    lp = -((x_prev - mu) ** 2) / (2 * var) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


@pytest.mark.parametrize("multistep", [False, True])
def test_pair_log_ratios_equal_spos_vp_ddim_formula_with_one_parent_evaluation(host, multistep):
    net = inject_lora(host.backend.unet, host.module_table(), "attn", rank=4)
    try:
        randomize(net, 0.05)
        items, cond = _pairs(host, net, multistep)
        assert items
        if multistep:
            assert any(p.x_t_lose is not None for p in items) and any(p.x_t_lose is None for p in items)
        else:
            assert all(p.x_t_lose is None for p in items)  # SD1.5 form: winner and loser share x_t
        counting = CountingDenoiser(host.denoiser(5.0))
        with torch.no_grad():
            lp = pair_log_probs(counting, net, items, cond, host.device)
        parents = sum(1 if p.x_t_lose is None else 2 for p in items)
        assert counting.rows == 2 * parents and counting.calls == 2  # one policy + one reference call
        ab = host.schedule.alphas_cumprod
        den = host.denoiser(5.0)
        for i, p in enumerate(items):
            t = int(round(p.t))
            t_prev = int(round(float(host.schedule.timestep(p.sigma_next))))
            assert t - t_prev == 250 or (t, t_prev) == (1, 0)  # 4 leading DDIM steps, the last one ends at alpha_0
            c = cond.take(torch.tensor([i]))
            vp = {}
            for member, parent, child in (("w", p.x_t, p.x_win), ("l", p.x_t_lose if p.x_t_lose is not None else p.x_t, p.x_lose)):
                for mult in (1.0, 0.0):
                    with torch.no_grad(), net.scaled(mult):
                        x0 = den(parent[None].double().float(), torch.tensor([p.sigma]), c)
                    eps = (parent[None] - x0) / p.sigma
                    vp[(member, mult)] = _vp_logp(child[None].double(), parent[None].double(), eps.double(), t, t_prev, ab)
            ratio_w = float(lp["logp_w"][i] - lp["ref_logp_w"][i])
            ratio_l = float(lp["logp_l"][i] - lp["ref_logp_l"][i])
            assert ratio_w == pytest.approx(float(vp[("w", 1.0)] - vp[("w", 0.0)]), abs=2e-5)
            assert ratio_l == pytest.approx(float(vp[("l", 1.0)] - vp[("l", 0.0)]), abs=2e-5)
    finally:
        net.detach()


def test_a_few_spo_steps_raise_the_margin_on_the_training_pairs(host):
    net = inject_lora(host.backend.unet, host.module_table(), "attn", rank=4, seed=0)
    try:
        items, cond = _pairs(host, net, seed=3)
        den = host.denoiser(5.0)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)

        def evaluate():
            with torch.no_grad():
                lp = pair_log_probs(den, net, items, cond, host.device)
            m = (lp["logp_w"] - lp["ref_logp_w"]) - (lp["logp_l"] - lp["ref_logp_l"])
            return float(m.mean()), float((m > 0).float().mean())

        margin0, acc0 = evaluate()
        assert margin0 == 0.0 and acc0 == 0.0  # up = 0: policy == reference
        losses = []
        for _ in range(6):
            lp = pair_log_probs(den, net, items, cond, host.device)
            loss, _ = spo_loss(lp["logp_w"], lp["logp_l"], lp["ref_logp_w"], lp["ref_logp_l"], 10.0, 0.1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        margin, acc = evaluate()
        assert margin > 0 and acc > 0.5
        assert losses[-1] < losses[0]
    finally:
        net.detach()


def _trainer_ctx(host, tmp_path, **kw):
    """A Trainer set up (network, sources, generators) but not run, as the objectives' context."""
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), height=16, width=16, max_steps=1, validate_every=-1, **kw)
    trainer = Trainer(cfg, host)
    trainer._setup()
    randomize(trainer.network, 0.05)
    losses = []
    trainer.backward = lambda loss: losses.append(loss)
    return trainer, losses


def test_diffusion_dpo_in_sigma_space_equals_the_diffusers_vp_computation(host, tmp_path):
    write_pair_folder(tmp_path / "pairs", n=3)
    trainer, losses = _trainer_ctx(host, tmp_path, method="diffusion_dpo", pairs=str(tmp_path / "pairs"))
    try:
        batch = trainer.source.next_batch(3)
        g = torch.Generator()
        g.set_state(trainer.train_gen.get_state())
        stats = trainer.objective.step(trainer, batch)
        win, lose = batch.extra["win"], batch.extra["lose"]
        t = torch.randint(0, 1000, (3,), generator=g)
        eps = torch.randn(win.shape, generator=g)
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(host.backend.pipe.scheduler.config)
        unet = host.backend.unet
        ctx = host.encode_prompts(batch.extra["prompts"]).tensors["cond"]

        def mse(latents, lora_on):
            noisy = sched.add_noise(latents, eps, t)
            with torch.no_grad(), trainer.network.scaled(1.0 if lora_on else 0.0):
                pred = unet(noisy, t, encoder_hidden_states=ctx).sample
            return ((pred - eps) ** 2).mean(dim=(1, 2, 3))

        mw, ml, rw, rl = mse(win, True), mse(lose, True), mse(win, False), mse(lose, False)
        want = -torch.nn.functional.logsigmoid(-0.5 * 5000 * ((mw - ml) - (rw - rl))).mean()
        assert float(losses[0]) == pytest.approx(float(want), rel=2e-4, abs=1e-5)
        assert stats["model_mse_w"] == pytest.approx(float(mw.mean()), rel=1e-4)
        assert losses[0].requires_grad
    finally:
        trainer.close()


def test_ncp_features_are_the_base_unets_down_blocks(host, tmp_path):
    write_pair_folder(tmp_path / "pairs", n=2)
    trainer, losses = _trainer_ctx(host, tmp_path, method="ncp_dpo", pairs=str(tmp_path / "pairs"), ncp_features="down")
    try:
        unet = host.backend.unet
        cond = host.encode_prompts(["a cat", "a dog"])
        x = torch.randn(2, 4, 8, 8)
        sigma = torch.tensor([3.0, 0.5])
        f = unet_features(trainer, x, sigma, cond, "down")
        # diffusers' own path: time embedding -> conv_in -> every down block, base weights (LoRA off)
        t = host.schedule.timestep(sigma).float()
        with torch.no_grad(), trainer.network.disabled():
            emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
            h = unet.conv_in(x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt())
            for block in unet.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    h, _ = block(h, emb, encoder_hidden_states=cond.tensors["cond"])
                else:
                    h, _ = block(h, emb)
        torch.testing.assert_close(f, h, atol=1e-5, rtol=1e-5)
        # the step's loss reaches the LoRA only through the policy's x_{t-1}
        batch = trainer.source.next_batch(2)
        trainer.objective.step(trainer, batch)
        losses[0].backward()
        assert any(float(p.grad.abs().max()) > 0 for p in trainer.network.parameters() if p.grad is not None)
    finally:
        trainer.close()
