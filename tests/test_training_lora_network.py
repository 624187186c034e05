"""The hook-based LoRA network against peft and diffusers: same factors, same outputs; the
reference via multiplier 0; LDM-named hosts; init distributions; files that load in diffusers;
gradient checkpointing that keeps the multiplier of the forward pass."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from spo_core.lora import load_table, save_lora
from spo_core.training import LoRARoot, inject_lora, select_modules
from spo_core.training.lora_network import LoRANetwork
from test_training_support import randomize, single_thread, tiny_host


@pytest.fixture(scope="module")
def host():
    with single_thread():
        yield tiny_host()


def _unet_inputs(unet, batch=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([500.0, 10.0][:batch])
    return x, t, ctx


def _peft_twin(unet, network, lora_alpha):
    """The same UNet with peft LoRA layers on exactly the network's modules and the same factors."""
    from peft import LoraConfig, inject_adapter_in_model

    network.detach()  # deepcopy would copy the hooks too
    twin = copy.deepcopy(unet)
    network.attach()
    names = [info.name for info in network.infos.values()]
    config = LoraConfig(r=network.rank, lora_alpha=lora_alpha, target_modules="^(" + "|".join(map(re.escape, names)) + ")$")
    inject_adapter_in_model(config, twin)
    with torch.no_grad():
        for slot, branch in network.branches.items():
            layer = twin.get_submodule(network.infos[slot].name)
            layer.lora_A["default"].weight.copy_(branch.down)
            layer.lora_B["default"].weight.copy_(branch.up)
    return twin


@pytest.mark.parametrize("targets", ["attn", "attn+ff+conv"])
def test_same_factors_give_the_same_outputs_as_peft(host, targets):
    unet = host.backend.unet
    table = host.module_table()
    net = inject_lora(unet, table, targets, rank=4, alpha=8, init="gaussian", seed=1)
    try:
        randomize(net, 0.05)
        kinds = {info.kind for info in net.infos.values()}
        assert kinds == ({"linear"} if targets == "attn" else {"linear", "conv"})
        twin = _peft_twin(unet, net, lora_alpha=8)
        x, t, ctx = _unet_inputs(unet)
        with torch.no_grad():
            ours = unet(x, t, encoder_hidden_states=ctx).sample
            theirs = twin(x, t, encoder_hidden_states=ctx).sample
            with net.disabled():
                base = unet(x, t, encoder_hidden_states=ctx).sample
        assert float((ours - base).abs().max()) > 1e-3  # the LoRA does something
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    finally:
        net.detach()


def test_multiplier_zero_is_the_base_model_and_nothing_of_the_host_changes(host):
    unet = host.backend.unet
    keys_before = list(unet.state_dict().keys())
    x, t, ctx = _unet_inputs(unet)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=ctx).sample
    net = inject_lora(unet, host.module_table(), "attn", rank=4)
    randomize(net, 0.1)
    assert list(unet.state_dict().keys()) == keys_before
    assert not any("lora" in k for k in unet.state_dict())
    with torch.no_grad(), net.disabled():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(ref, base, atol=0, rtol=0)
    net.detach()
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=ctx).sample, base, atol=0, rtol=0)


def test_module_delta_is_multiplier_times_scaled_low_rank_product():
    lin = nn.Linear(12, 10)
    conv = nn.Conv2d(6, 5, 3, padding=1, stride=2)
    root = nn.ModuleDict({"a": lin, "c": conv})
    from spo_core.lora.tables import ModuleInfo, ModuleTable

    infos = [ModuleInfo("unet", "a", "linear", (10, 12)), ModuleInfo("unet", "c", "conv", (5, 6, 3, 3))]
    table = ModuleTable("toy", "sd1", {(i.component, i.name): i for i in infos})
    net = LoRANetwork(table, LoRARoot(root), infos, rank=3, alpha=6.0)
    randomize(net, 0.3)
    x = torch.randn(4, 12)
    img = torch.randn(2, 6, 9, 9)
    b_lin, b_conv = net.branches["a"], net.branches["c"]
    with torch.no_grad(), net.scaled(0.5):
        got = lin(x)
        got_c = conv(img)
    want = x @ (lin.weight + 0.5 * 2.0 * b_lin.up @ b_lin.down).T + lin.bias
    w_conv = conv.weight + 0.5 * 2.0 * (b_conv.up.flatten(1) @ b_conv.down.flatten(1)).reshape(conv.weight.shape)
    want_c = torch.nn.functional.conv2d(img, w_conv, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_c, want_c, atol=1e-5, rtol=1e-5)
    # the exported LoRA's delta is the same weight change
    lora = net.to_lora()
    torch.testing.assert_close(lora.modules[("unet", "a")].delta(), 2.0 * b_lin.up.detach() @ b_lin.down.detach())


def test_ldm_named_host_gets_the_same_network(host):
    """ComfyUI/A1111 name UNet modules the LDM way under a root such as diffusion_model."""
    unet = host.backend.unet
    table = host.module_table()
    targets = select_modules(table, "attn")
    ldm_root = nn.Module()
    holder = nn.Module()
    ldm_root.add_module("diffusion_model", holder)
    for info in targets:
        parts = info.ldm.split(".")
        node = holder
        for part in parts[:-1]:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.add_module(parts[-1], unet.get_submodule(info.name))  # the same live Linear
    a = inject_lora(LoRARoot(ldm_root, "ldm", "diffusion_model."), table, "attn", rank=4, seed=3)
    try:
        assert len(a.branches) == len(targets)
        randomize(a, 0.05)
        x, t, ctx = _unet_inputs(unet)
        with torch.no_grad():
            via_ldm = unet(x, t, encoder_hidden_states=ctx).sample
    finally:
        a.detach()
    b = inject_lora(unet, table, "attn", rank=4, seed=3)
    try:
        b.load_state_dict(a.state_dict())
        with torch.no_grad():
            via_diffusers = unet(x, t, encoder_hidden_states=ctx).sample
    finally:
        b.detach()
    torch.testing.assert_close(via_ldm, via_diffusers, atol=0, rtol=0)


def test_real_sizes_match_the_released_spo_loras():
    """SPO's targets: 128 projections / 797,184 parameters at rank 4 (SD1.5), 560 / 92,897,280 at rank 64 (SDXL)."""
    sd15 = select_modules(load_table("sd15"), "attn")
    sdxl = select_modules(load_table("sdxl"), "attn")
    assert len(sd15) == 128 and len(sdxl) == 560
    assert sum(4 * (m.in_features + m.out_features) for m in sd15) == 797_184
    assert sum(64 * (m.in_features + m.out_features) for m in sdxl) == 92_897_280
    from spo_core.testing import real_unet

    net = inject_lora(real_unet("sd15", device="meta"), load_table("sd15"), "attn", rank=4)
    assert net.num_parameters() == 797_184
    net.detach()


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_init_matches_peft_distributions(init):
    from peft import LoraConfig, inject_adapter_in_model

    r, fan_in, out = 4, 640, 320
    model = nn.Sequential(nn.Linear(fan_in, out))
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=["0"], init_lora_weights=True if init == "kaiming" else "gaussian"), model)
    peft_a = model[0].lora_A["default"].weight.detach()
    assert float(model[0].lora_B["default"].weight.detach().abs().max()) == 0
    from spo_core.lora.tables import ModuleInfo, ModuleTable

    info = ModuleInfo("unet", "0", "linear", (out, fan_in))
    ours = LoRANetwork(ModuleTable("toy", "sd1", {("unet", "0"): info}), LoRARoot(nn.Sequential(nn.Linear(fan_in, out))),
                       [info], rank=r, init=init, seed=0)
    down, up = ours.branches["0"].down.detach(), ours.branches["0"].up.detach()
    assert float(up.abs().max()) == 0
    if init == "gaussian":
        assert abs(float(down.std()) - 1 / r) < 0.02 and abs(float(peft_a.std()) - 1 / r) < 0.02
    else:
        bound = math.sqrt(2 / 6) * math.sqrt(3 / fan_in)
        for a in (down, peft_a):
            assert float(a.abs().max()) <= bound + 1e-7
            assert abs(float(a.std()) - bound / math.sqrt(3)) < 0.1 * bound


@pytest.mark.parametrize("fmt", ["webui", "diffusers"])
def test_saved_file_loads_in_diffusers_with_the_networks_effect(host, tmp_path, fmt):
    from spo_core.testing import tiny_sd15_pipeline

    unet = host.backend.unet
    net = inject_lora(unet, host.module_table(), "attn", rank=4, alpha=2.0)
    try:
        randomize(net, 0.05, seed=5)
        x, t, ctx = _unet_inputs(unet)
        with torch.no_grad():
            ours = unet(x, t, encoder_hidden_states=ctx).sample
        path = save_lora(net.to_lora(), tmp_path / "trained.safetensors", fmt=fmt)
    finally:
        net.detach()
    pipe = tiny_sd15_pipeline()
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_checkpointing_recomputes_with_the_forward_multiplier(host):
    """NCP runs the base UNet (multiplier 0) with grad; its recompute in backward must not see the LoRA."""
    unet = host.backend.unet
    x, t, ctx = _unet_inputs(unet)

    def grads(checkpointing):
        net = inject_lora(unet, host.module_table(), "attn", rank=4, seed=2)
        randomize(net, 0.05, seed=2)
        if checkpointing:
            host.set_gradient_checkpointing(True, net.checkpoint_function())
        try:
            xi = x.clone().requires_grad_(True)
            with net.disabled():
                base = unet(xi, t, encoder_hidden_states=ctx).sample
            pol = unet(xi, t, encoder_hidden_states=ctx).sample
            (base.square().mean() + (pol * base.detach()).mean()).backward()
            return xi.grad.clone(), [p.grad.clone() for p in net.parameters()]
        finally:
            if checkpointing:
                host.set_gradient_checkpointing(False)
            net.detach()

    gx, gp = grads(False)
    cx, cp = grads(True)
    torch.testing.assert_close(cx, gx, atol=1e-6, rtol=1e-5)
    for a, b in zip(cp, gp):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not host.backend.unet.is_gradient_checkpointing


def test_load_lora_restores_factors_and_refuses_other_ranks(host):
    from spo_core.errors import LoRAFormatError

    unet = host.backend.unet
    net = inject_lora(unet, host.module_table(), "attn", rank=4, alpha=4)
    randomize(net, 0.1)
    lora = net.to_lora()
    net.detach()
    net2 = inject_lora(unet, host.module_table(), "attn", rank=4, alpha=2)  # other alpha: delta kept
    net2.load_lora(lora)
    for key, m in net2.to_lora().modules.items():
        torch.testing.assert_close(m.delta(), lora.modules[key].delta(), atol=1e-7, rtol=1e-6)
    net2.detach()
    net3 = inject_lora(unet, host.module_table(), "attn", rank=2)
    with pytest.raises(LoRAFormatError, match="rank 4"):
        net3.load_lora(lora)
    net3.detach()
