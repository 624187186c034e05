"""Integration tests against a real ComfyUI checkout (set COMFYUI_PATH; skipped otherwise).

ComfyUI is loaded in this process (tests/comfy_support/harness.py), the pack through
ComfyUI's own `load_custom_node`, and workflows run through ComfyUI's executor with tiny
models built in code. LoRA key maps are ComfyUI's own for real-size SD1.5 / SDXL models
built on the meta device.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from comfy_support.harness import env_comfy_path, get_harness, meta_model_and_clip, run_node_class  # noqa: E402
from spo_core.errors import ModelMismatchError  # noqa: E402
from spo_core.lora import load_table  # noqa: E402

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(env_comfy_path() is None, reason="COMFYUI_PATH not set")]

SPO_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WARNINGS = ("lora key not loaded", "NOT LOADED", "ERROR lora", "SHAPE MISMATCH")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    return get_harness(tmp_path_factory.mktemp("comfyui"))


def _lora_warnings(h) -> list[str]:
    return [m for m in h.log.messages(logging.WARNING) if any(w in m for w in LORA_WARNINGS)]


# -- the pack loads ------------------------------------------------------------------------------


def test_pack_imports_and_registers_every_node(comfy):
    assert comfy.pack_loaded
    assert not [m for m in comfy.log.messages() if "IMPORT FAILED" in m and "main" in m]
    spo = {k: v for k, v in comfy.nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("SPO") and not k.startswith("SPOTest_")}
    assert {"SPOLoadLoRA", "SPOSaveConvertLoRA", "SPOExtractLoRAFromModels", "SPOExtractLoRAFromFiles",
            "SPOLoadLoRAFromCheckpoint"} <= set(spo)
    for name, cls in spo.items():
        info = cls.GET_NODE_INFO_V1() if hasattr(cls, "GET_NODE_INFO_V1") else None
        assert cls.CATEGORY == "SPO"
        if info is not None:  # what /object_info serves
            assert info["category"] == "SPO" and info["display_name"] == comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[name]


# -- LoRA key maps of real-size SD1.5 / SDXL ---------------------------------------------------------


def _factors(shape, rank, g):
    n_in = 1
    for d in shape[1:]:
        n_in *= d
    return torch.randn(rank, n_in, generator=g) * 0.01, torch.randn(shape[0], rank, generator=g) * 0.01


def _spo_diffusers_file(path: Path, arch: str) -> tuple[list, list]:
    """SPO's released layout: unet.<diffusers path>.lora.down/up.weight on every attention projection."""
    g = torch.Generator().manual_seed(0)
    mods = [m for m in load_table(arch).select(("unet",), ["attn"]) if m.name.endswith(SPO_ATTN)]
    sd = {}
    for m in mods:
        down, up = _factors(m.shape, 1, g)
        sd[f"unet.{m.name}.lora.down.weight"], sd[f"unet.{m.name}.lora.up.weight"] = down, up
    save_file(sd, str(path))
    return mods, []


def _kohya_file(path: Path, arch: str) -> tuple[list, list]:
    """kohya sd-scripts' default targets (transformer Linear/Conv + text-encoder attention/MLP), with alphas."""
    g = torch.Generator().manual_seed(1)
    table = load_table(arch)
    unet = table.select(("unet",), ["attn", "ff", "proj"])
    te = [m for m in table.select(("te1", "te2")) if m.kind == "linear" and m.name != "text_projection"]
    sd = {}
    for m in unet + te:
        if m.component == "unet":
            name = "lora_unet_" + (m.ldm if arch == "sdxl" else m.name).replace(".", "_")
        else:
            name = ("lora_te_" if arch == "sd15" else "lora_te1_" if m.component == "te1" else "lora_te2_") + m.name.replace(".", "_")
        down, up = _factors(m.shape, 1, g)
        sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"], sd[name + ".alpha"] = down, up, torch.tensor(1.0)
    save_file(sd, str(path))
    return unet, te


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind", ["spo_diffusers", "kohya"])
def test_load_spo_lora_patches_every_module_of_real_key_maps(comfy, arch, kind):
    path = comfy.base / "models" / "loras" / f"{kind}_{arch}.safetensors"
    unet_mods, te_mods = (_spo_diffusers_file if kind == "spo_diffusers" else _kohya_file)(path, arch)
    model, clip = meta_model_and_clip(arch)
    comfy.log.clear()
    new_model, new_clip, text = run_node_class(comfy.node_class("SPOLoadLoRA"), model=model, clip=clip,
                                               lora_name=path.name, strength_model=1.0, strength_clip=1.0,
                                               allow_partial=False)
    assert _lora_warnings(comfy) == []
    assert set(new_model.patches) == {f"diffusion_model.{m.ldm}.weight" for m in unet_mods}
    clip_prefix = {"te1": "clip_l", "te2": "clip_g"}
    assert set(new_clip.patcher.patches) == {f"{clip_prefix[m.component]}.transformer.{m.name}.weight" for m in te_mods}
    assert f"applied {len(unet_mods)} UNet modules" in text


def test_sdxl_lora_on_sd15_model_is_refused(comfy):
    path = comfy.base / "models" / "loras" / "spo_diffusers_sdxl.safetensors"
    if not path.exists():
        _spo_diffusers_file(path, "sdxl")
    model, clip = meta_model_and_clip("sd15")
    with pytest.raises(ModelMismatchError, match="made for sdxl but the model is sd15"):
        run_node_class(comfy.node_class("SPOLoadLoRA"), model=model, clip=clip, lora_name=path.name,
                       strength_model=1.0, strength_clip=1.0, allow_partial=True)
    assert model.patches == {}


@pytest.mark.parametrize("arch", ["sd35-large", "flux-dev"])
def test_load_spo_lora_on_real_size_flow_model_and_clip_patches_every_module(comfy, arch):
    """A diffusers-format SD3.5 / Flux LoRA (split q/k/v, CLIP-L/G and T5 layers too) through the node: every
    module lands on ComfyUI's own fused weight or text-encoder weight, no "lora key not loaded"."""
    from comfy_support.harness import meta_flow_model_and_clip
    from test_lora_flow_formats import random_lora
    from test_lora_flow_text_encoders import add_text_encoders

    from spo_core.lora import save_lora

    table = load_table(arch)
    lora = add_text_encoders(random_lora(table, rank=1, first_blocks=True), layers=(0, 11))
    path = save_lora(lora, comfy.base / "models" / "loras" / f"flow_{arch}.safetensors", fmt="diffusers", overwrite=True)
    model, clip = meta_flow_model_and_clip(arch)
    comfy.log.clear()
    new_model, new_clip, text = run_node_class(comfy.node_class("SPOLoadLoRA"), model=model, clip=clip, lora_name=path.name,
                                               strength_model=1.0, strength_clip=1.0, allow_partial=False)
    assert _lora_warnings(comfy) == []
    transformer = [info for (c, _), m in lora.modules.items() if c == "transformer" for info in [m.info]]
    assert set(new_model.patches) == {f"diffusion_model.{info.ldm}.weight" for info in transformer}
    owner = {"te1": "clip_l", "te2": "clip_g", "te3": "t5xxl"}
    te = [(c, n) for c, n in lora.modules if c != "transformer"]
    assert set(new_clip.patcher.patches) == {f"{owner[c]}.transformer.{n}.weight" for c, n in te}
    assert f"applied {len(transformer)} transformer modules" in text and f"and {len(te)} text-encoder modules" in text
    sd15 = comfy.base / "models" / "loras" / "spo_diffusers_sd15.safetensors"
    if not sd15.exists():
        _spo_diffusers_file(sd15, "sd15")
    with pytest.raises(ModelMismatchError, match=f"made for sd15 but the model is {arch}"):
        run_node_class(comfy.node_class("SPOLoadLoRA"), model=model, clip=clip, lora_name=sd15.name,
                       strength_model=1.0, strength_clip=1.0, allow_partial=True)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_load_spo_lora_on_a_flow_model_patches_as_the_stock_loader(comfy, kind):
    """On ComfyUI's own SD3 / Flux MODEL with real weights: the node given our diffusers file (split q/k/v) patches
    the same weights, to the same values, as the stock LoraLoaderModelOnly given our kohya file."""
    from comfy_support.harness import tiny_flux_model, tiny_sd3_model
    from test_lora_flow_formats import random_lora

    from spo_core.lora import save_lora

    training = sys.modules[comfy.pack_module + ".nodes.comfy_training"]
    make = tiny_sd3_model if kind == "sd3" else tiny_flux_model
    table = training.comfy_flow_table(make(0).model)
    lora = random_lora(table, rank=2, alpha=1.0, seed=3)
    loras = comfy.base / "models" / "loras"
    save_lora(lora, loras / f"tiny_{kind}_split.safetensors", fmt="diffusers", overwrite=True)
    save_lora(lora, loras / f"tiny_{kind}_kohya.safetensors", fmt="webui", overwrite=True)
    comfy.log.clear()
    ours, _, text = run_node_class(comfy.node_class("SPOLoadLoRA"), model=make(0), lora_name=f"tiny_{kind}_split.safetensors",
                                   strength_model=0.7, strength_clip=1.0, allow_partial=False)
    stock, = run_node_class(comfy.node_class("LoraLoaderModelOnly"), model=make(0), lora_name=f"tiny_{kind}_kohya.safetensors",
                            strength_model=0.7)
    assert _lora_warnings(comfy) == [] and set(ours.patches) == set(stock.patches) and ours.patches
    assert f"applied {len(lora.modules)} transformer modules" in text
    states = []
    for patcher in (ours, stock):
        patcher.patch_model()
        states.append({k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()})
        patcher.unpatch_model()
    for k, v in states[1].items():
        torch.testing.assert_close(states[0][k], v, rtol=1e-5, atol=1e-6)


def test_converted_lora_loads_in_the_stock_lora_loader_without_warnings(comfy):
    src = comfy.base / "models" / "loras" / "spo_diffusers_sdxl.safetensors"
    if not src.exists():
        _spo_diffusers_file(src, "sdxl")
    path, _ = run_node_class(comfy.node_class("SPOSaveConvertLoRA"), lora_name=src.name, format="webui", dtype="fp16",
                             output_name="stock_check", allow_partial=False, overwrite=True)
    model, clip = meta_model_and_clip("sdxl")
    comfy.log.clear()
    name = Path(path).name  # output/loras is a loras search path, as in a running ComfyUI
    new_model, _ = run_node_class(comfy.node_class("LoraLoader"), model=model, clip=clip, lora_name=name,
                                  strength_model=1.0, strength_clip=1.0)
    assert _lora_warnings(comfy) == []
    assert len(new_model.patches) == len([m for m in load_table("sdxl").select(("unet",), ["attn"]) if m.name.endswith(SPO_ATTN)])


# -- the per-step resampler in real workflows -------------------------------------------------------

STEPS = 5  # ddim_uniform gives exactly 5 steps in KSampler and BasicScheduler alike (6 would give 7 vs 6)


def _graph(sampler: str, k: int = 3, batch: int = 2, seed: int = 42, eta: float = 1.0, mask: bool = False,
           window=(0, 999), policy: str = "greedy", flow_shift: float | None = None) -> dict:
    """API-format workflow: tiny model/VAE/conds, a JPEG scorer, and the resampler through SamplerCustom
    ("custom"), the stock KSampler with the SPO Resampling patch ("ksampler"), or stock euler_ancestral
    ("reference"); "fk-custom" / "fk-ksampler": FK steering with k particles, the same two ways.
    `flow_shift`: the model made a rectified-flow (CONST) model by the stock ModelSamplingSD3 node."""
    options = {"scorer": ["6", 0], "vae": ["2", 0], "prompt": "a red apple", "k": k, "policy": policy, "eta": eta,
               "window_t_min": window[0], "window_t_max": window[1], "score_every": 1, "temperature": 1.0,
               "lookahead_steps": 0}
    fk = sampler.startswith("fk-")
    if fk:
        options = {"scorer": ["6", 0], "vae": ["2", 0], "prompt": "a red apple", "particles": k, "potential": "diff",
                   "lam": 10.0, "eta": eta, "window_t_min": window[0], "window_t_max": window[1], "resample_every": 2,
                   "adaptive": False}
        sampler = sampler[3:]
    g = {
        "1": {"class_type": "SPOTest_TinyModel", "inputs": {"seed": 0, "sdxl": False}},
        "2": {"class_type": "SPOTest_TinyVAE", "inputs": {"seed": 0}},
        "3": {"class_type": "SPOTest_TinyCond", "inputs": {"seed": 1, "sdxl": False}},
        "4": {"class_type": "SPOTest_TinyCond", "inputs": {"seed": 2, "sdxl": False}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "6": {"class_type": "SPOLoadScorer", "inputs": {"scorer": "jpeg_compressibility", "weights": "(none)",
                                                         "device": "auto", "dtype": "auto"}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "ddim_uniform", "steps": STEPS, "denoise": 1.0}},
    }
    latent = ["5", 0]
    scheduler = "ddim_uniform"
    if flow_shift is not None:
        g["16"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": flow_shift}}
        scheduler = "simple"
        g["8"]["inputs"].update(model=["16", 0], scheduler=scheduler)
    model = ["16", 0] if flow_shift is not None else ["1", 0]
    if mask:
        g["12"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
        g["13"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["12", 0]}}
        latent = ["13", 0]
    if sampler in ("custom", "reference"):
        if sampler == "custom":
            g["7"] = {"class_type": "SPOFKSteeringSampler" if fk else "SPOPerStepResampler", "inputs": options}
        else:
            g["7"] = {"class_type": "SamplerEulerAncestral", "inputs": {"eta": eta, "s_noise": 1.0}}
        g["9"] = {"class_type": "SamplerCustom", "inputs": {"model": model, "add_noise": True, "noise_seed": seed, "cfg": 2.0,
                                                             "positive": ["3", 0], "negative": ["4", 0], "sampler": ["7", 0],
                                                             "sigmas": ["8", 0], "latent_image": latent}}
    else:
        g["7"] = {"class_type": "SPOFKSteering" if fk else "SPOResampling", "inputs": {"model": model, **options}}
        g["9"] = {"class_type": "KSampler", "inputs": {"model": ["7", 0], "seed": seed, "steps": STEPS, "cfg": 2.0,
                                                       "sampler_name": "euler", "scheduler": scheduler, "positive": ["3", 0],
                                                       "negative": ["4", 0], "latent_image": latent, "denoise": 1.0}}
    g["10"] = {"class_type": "SPOTest_Capture", "inputs": {"value": ["9", 0], "key": "latent"}}
    if sampler != "reference" and k > 1:
        g["11"] = {"class_type": "SPOCandidateGrid", "inputs": {"trace": ["7", 1], "samples": ["9", 0], "cell_size": 48}}
        g["14"] = {"class_type": "SPOTest_Capture", "inputs": {"value": ["11", 0], "key": "grid"}}
        g["15"] = {"class_type": "SPOTest_Capture", "inputs": {"value": ["7", 1], "key": "trace"}}
    return g


def _sample(comfy, **kw):
    comfy.captured.clear()
    comfy.progress.clear()
    comfy.run(_graph(**kw))
    return dict(comfy.captured)


def test_resampler_with_one_candidate_is_comfyuis_euler_ancestral(comfy):
    """k = 1: the resampler is plain DDIM(eta) = Euler ancestral; same seed, same noise stream, same latent."""
    ours = _sample(comfy, sampler="custom", k=1)["latent"]["samples"]
    ref = _sample(comfy, sampler="reference")["latent"]["samples"]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_resampler_through_sampler_custom_pools_scores_and_reports_progress(comfy):
    out = _sample(comfy, sampler="custom", k=3, batch=2)
    latent, grid, trace = out["latent"]["samples"], out["grid"], out["trace"]
    assert latent.shape == (2, 4, 8, 8) and torch.isfinite(latent).all()
    pooled = [r for r in trace.result.trace if r.pooled]
    assert len(pooled) == STEPS - 1  # every step but the last (to sigma 0) inside the window
    for r in pooled:  # greedy keeps the best-scoring candidate of each prompt
        assert torch.equal(r.chosen, r.scores.argmax(0))
    assert trace.result.evaluations == 2 * (1 + 3 * (STEPS - 1))  # k rows per pool instead of 1
    assert grid.shape[0] == 2 and grid.shape[-1] == 3 and 0 <= float(grid.min()) and float(grid.max()) <= 1
    sampler_progress = [p for p in comfy.progress if p[0] == "9"]
    assert [p[1] for p in sampler_progress] == list(range(1, STEPS + 1)) and sampler_progress[-1][2] == STEPS
    assert any(p[3] for p in sampler_progress)  # live previews
    again = _sample(comfy, sampler="custom", k=3, batch=2)["latent"]["samples"]
    torch.testing.assert_close(again, latent)  # seeded
    other = _sample(comfy, sampler="custom", k=3, batch=2, seed=43)["latent"]["samples"]
    assert not torch.allclose(other, latent)


def test_stock_ksampler_with_spo_resampling_patch_equals_sampler_custom(comfy):
    custom = _sample(comfy, sampler="custom", k=3, batch=2)["latent"]["samples"]
    out = _sample(comfy, sampler="ksampler", k=3, batch=2)
    torch.testing.assert_close(out["latent"]["samples"], custom)
    assert out["grid"].shape[0] == 2
    assert [p[1] for p in comfy.progress if p[0] == "9"] == list(range(1, STEPS + 1))


def test_fk_steering_through_sampler_custom_and_the_ksampler_patch(comfy):
    """The latent's batch is the images; each is a population of k particles sampled as one batch."""
    out = _sample(comfy, sampler="fk-custom", k=3, batch=2)
    latent, trace = out["latent"]["samples"], out["trace"]
    assert latent.shape == (2, 4, 8, 8) and torch.isfinite(latent).all()
    result = trace.result
    assert result.evaluations == 2 * 3 * STEPS  # images x particles x steps (a row through CFG): nothing extra
    events = result.particle_stats.events
    assert events and events[-1].i == STEPS - 1  # always weighed at the last step
    assert out["grid"].shape[0] == 2
    assert [p[1] for p in comfy.progress if p[0] == "9"] == list(range(1, STEPS + 1))
    patched = _sample(comfy, sampler="fk-ksampler", k=3, batch=2)["latent"]["samples"]
    torch.testing.assert_close(patched, latent)
    torch.testing.assert_close(_sample(comfy, sampler="fk-custom", k=3, batch=2)["latent"]["samples"], latent)  # seeded


def test_flow_model_resampler_with_one_candidate_is_comfyuis_rf_euler_ancestral(comfy):
    """A CONST (rectified-flow) MODEL: k = 1 is what the stock euler_ancestral runs on it (sample_euler_ancestral_RF)."""
    ours = _sample(comfy, sampler="custom", k=1, flow_shift=3.0)["latent"]["samples"]
    ref = _sample(comfy, sampler="reference", flow_shift=3.0)["latent"]["samples"]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    discrete = _sample(comfy, sampler="reference")["latent"]["samples"]
    assert not torch.allclose(ref, discrete, atol=1e-3)  # the flow patch really changed the sampling


def test_flow_model_resampler_and_fk_through_sampler_custom_and_the_ksampler_patch(comfy):
    out = _sample(comfy, sampler="custom", k=3, batch=2, flow_shift=3.0, window=(0, 1000))
    latent, trace = out["latent"]["samples"], out["trace"]
    assert torch.isfinite(latent).all() and out["grid"].shape[0] == 2
    pooled = [r for r in trace.result.trace if r.pooled]
    assert len(pooled) == STEPS - 1 and all(0 < r.t <= 1000 for r in pooled)  # t = 1000 sigma, the first at 1000
    assert trace.result.evaluations == 2 * (1 + 3 * (STEPS - 1))
    torch.testing.assert_close(_sample(comfy, sampler="ksampler", k=3, batch=2, flow_shift=3.0, window=(0, 1000))["latent"]["samples"], latent)
    fk = _sample(comfy, sampler="fk-custom", k=3, batch=2, flow_shift=3.0, window=(0, 1000))
    assert fk["trace"].result.evaluations == 2 * 3 * STEPS and torch.isfinite(fk["latent"]["samples"]).all()
    torch.testing.assert_close(_sample(comfy, sampler="fk-ksampler", k=3, batch=2, flow_shift=3.0, window=(0, 1000))["latent"]["samples"],
                               fk["latent"]["samples"])


def test_rf_ancestral_step_equals_comfyuis_own_sampler_function_and_tables(comfy):
    """spo_core's RF ancestral step over a 20-step shifted schedule against ComfyUI's sample_euler_ancestral_RF,
    and the flow training tables against ModelSamplingDiscreteFlow / ModelSamplingFlux."""
    from comfy.k_diffusion.sampling import sample_euler_ancestral_RF
    from comfy.model_sampling import ModelSamplingDiscreteFlow, ModelSamplingFlux

    from spo_core.sampling.flow import FlowSchedule, rf_ancestral_step

    ms = ModelSamplingDiscreteFlow()
    ms.set_parameters(shift=3.0)
    torch.testing.assert_close(FlowSchedule(3.0).sigmas.float(), ms.sigmas.float(), rtol=0, atol=2e-7)  # ComfyUI: float32 math
    flux = ModelSamplingFlux()
    flux.set_parameters(shift=1.15, timesteps=1000)
    torch.testing.assert_close(FlowSchedule(mu=1.15).sigmas.float(), flux.sigmas.float(), rtol=0, atol=2e-7)
    g = torch.Generator().manual_seed(3)
    sigmas = FlowSchedule(3.0).diffusers_sigmas(20)
    x = torch.randn(2, 4, 8, 8, generator=g)
    noises = [torch.randn(x.shape, generator=g) for _ in range(20)]

    def model(x, s, **kw):
        return torch.tanh(0.7 * x) * (1 - 0.3 * float(torch.as_tensor(s).reshape(-1)[0]))

    for eta in (1.0, 0.5):
        it = iter(noises)
        ref = sample_euler_ancestral_RF(model, x, sigmas, disable=True, eta=eta, noise_sampler=lambda a, b: next(it))
        ours = x
        for i in range(20):
            mean, std = rf_ancestral_step(ours, model(ours, sigmas[i]), float(sigmas[i]), float(sigmas[i + 1]), eta)
            ours = mean + std * noises[i] if std > 0 else mean
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_noise_mask_with_batch_above_one_is_a_clear_error_and_the_queue_goes_on(comfy):
    comfy.captured.clear()
    result = comfy.run(_graph(sampler="custom", k=3, batch=2, mask=True), expect_success=False)
    assert not result["success"]
    assert "noise mask works with batch size 1 only" in result["error"]["exception_message"]
    out = _sample(comfy, sampler="custom", k=3, batch=1, mask=True)  # batch 1 with a mask works
    assert out["latent"]["samples"].shape == (1, 4, 8, 8)


def test_eta_zero_with_several_candidates_is_refused_in_the_node(comfy):
    result = comfy.run(_graph(sampler="custom", k=3, eta=0.0), expect_success=False)
    assert "eta = 0 makes every step deterministic" in result["error"]["exception_message"]


# -- training ----------------------------------------------------------------------------------------


def _comfy_x0(model, positive, negative, cfg: float, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 as ComfyUI's own sampling path computes it (CFGGuider, conds, model_wrap): a one-step probe sampler."""
    import comfy.sample
    import comfy.samplers

    seen = {}

    def probe(model_k, noise, sigmas, extra_args=None, callback=None, disable=None):
        seen["x0"] = model_k(x, torch.full((x.shape[0],), sigma), **extra_args)
        return noise

    comfy.sample.sample_custom(model, torch.zeros_like(x), cfg, comfy.samplers.KSAMPLER(probe), torch.tensor([sigma, 0.0]),
                               positive, negative, torch.zeros_like(x), seed=0)
    return seen["x0"]


@pytest.mark.parametrize("sdxl", [False, True])
def test_training_host_denoiser_is_comfyuis_cfg_denoiser(comfy, sdxl):
    """The trainer's denoiser on the MODEL equals what ComfyUI's sampler computes for the same prompt and CFG."""
    from comfy_support.harness import tiny_clip, tiny_model

    training = sys.modules[comfy.pack_module + ".nodes.comfy_training"]
    model, clip = tiny_model(3, sdxl=sdxl), tiny_clip(3)

    def encode(text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * 3
    ref = _comfy_x0(model, encode("a red apple"), encode(""), 4.0, x, 3.0)
    host = training.ComfyTrainingHost(model, clip, None)
    with torch.inference_mode(False), torch.enable_grad():
        cond = host.encode_prompts(["a red apple", "a red apple"], None, height=64, width=64)
        ours = host.denoiser(4.0)(x, torch.tensor([3.0, 3.0]), cond)
    torch.testing.assert_close(ours.detach(), ref, rtol=1e-4, atol=1e-5)


def _train_graph(output_name: str, steps: int = 3, scorer: str = "SPOTest_BrightnessScorer", prompts: str = "a red apple\na blue car",
                 resume: bool = False, overwrite: bool = True) -> dict:
    return {
        "1": {"class_type": "SPOTest_TinyModel", "inputs": {"seed": 0, "sdxl": False}},
        "2": {"class_type": "SPOTest_TinyVAE", "inputs": {"seed": 0}},
        "3": {"class_type": "SPOTest_TinyCLIP", "inputs": {"seed": 0}},
        "4": {"class_type": scorer, "inputs": {}},
        "5": {"class_type": "SPOTrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["3", 0], "vae": ["2", 0], "scorer": ["4", 0], "prompts": prompts, "method": "spo",
            "preset": "auto", "train_steps": steps, "learning_rate": 1e-3, "rank": 2, "width": 64, "height": 64, "seed": 1,
            "output_name": output_name, "resume": resume, "overwrite": overwrite, "mixed_precision": "auto",
            "gradient_checkpointing": False, "checkpoint_every": 1, "preview_every": 0, "sampling_steps": 4,
            "guidance_scale": 3.0, "k": 2, "batch_size": 2, "pair_threshold": 0.0}},
        "6": {"class_type": "SPOTest_Capture", "inputs": {"value": ["5", 1], "key": "path"}},
        "7": {"class_type": "SPOTest_Capture", "inputs": {"value": ["5", 0], "key": "model"}},
        "8": {"class_type": "SPOTest_Capture", "inputs": {"value": ["5", 2], "key": "curves"}},
        "9": {"class_type": "SPOTest_Capture", "inputs": {"value": ["5", 3], "key": "report"}},
    }


def _stock_load(comfy, lora_name: str):
    """The stock LoraLoaderModelOnly on a fresh tiny model; returns (patched MODEL, LoRA warnings)."""
    from comfy_support.harness import tiny_model

    comfy.log.clear()
    patched, = run_node_class(comfy.node_class("LoraLoaderModelOnly"), model=tiny_model(0), lora_name=lora_name,
                              strength_model=1.0)
    return patched, _lora_warnings(comfy)


def test_train_spo_lora_three_steps_and_the_stock_loader_takes_the_file(comfy):
    from safetensors import safe_open

    comfy.captured.clear()
    comfy.progress.clear()
    comfy.run(_train_graph("tiny_spo"))
    path = Path(comfy.captured["path"])
    assert path == comfy.base / "output" / "loras" / "tiny_spo.safetensors" and path.is_file()
    assert "spo LoRA trained for 3 steps" in comfy.captured["report"]
    assert comfy.captured["curves"].shape[0] == 1 and comfy.captured["curves"].shape[-1] == 3
    progress = [p for p in comfy.progress if p[0] == "5"]  # the bar counts hundredths of a step
    assert [p[1] for p in progress if not p[3]][-3:] == [100, 200, 300] and progress[-1][2] == 300
    first = next(i for i, p in enumerate(progress) if p[1] >= 100)
    assert any(0 < p[1] < 100 for p in progress[:first])  # the first sampling round moves the bar
    assert any(p[3] for p in progress)  # the final base-vs-LoRA grid as a preview
    patched, warnings = _stock_load(comfy, path.name)
    assert warnings == []
    with safe_open(str(path), "pt") as f:
        trained_modules = {k.split(".")[0] for k in f.keys()}
        assert f.metadata()["ss_network_module"] == "networks.lora" and f.metadata()["spo_method"] == "spo"
    assert len(patched.patches) == len(trained_modules) > 0
    assert len(comfy.captured["model"].patches) == len(trained_modules)  # the returned MODEL has it applied


def test_interrupt_mid_training_leaves_a_usable_partial_lora_and_resume_finishes(comfy):
    from safetensors import safe_open

    comfy.captured.clear()
    comfy.progress.clear()
    comfy.interrupt_after = 6  # press Cancel after the first optimizer steps (4 sampling updates come first)
    result = comfy.run(_train_graph("tiny_cancel", steps=6), expect_success=False)
    assert not result["success"]
    assert any(e == "execution_interrupted" for e, _ in result["messages"])
    path = comfy.base / "output" / "loras" / "tiny_cancel.safetensors"
    assert path.is_file()
    with safe_open(str(path), "pt") as f:
        steps_saved = int(f.metadata()["ss_steps"])
    assert 1 <= steps_saved < 6
    patched, warnings = _stock_load(comfy, path.name)
    assert warnings == [] and len(patched.patches) > 0
    assert not list((comfy.base / "output" / "loras").glob("*.partial*"))  # no half-written file
    comfy.captured.clear()
    comfy.run(_train_graph("tiny_cancel", steps=6, resume=True, overwrite=False))  # the queue goes on; resume finishes
    with safe_open(str(path), "pt") as f:
        assert int(f.metadata()["ss_steps"]) == 6


def test_training_bad_input_gives_clear_errors_and_writes_nothing(comfy):
    result = comfy.run(_train_graph("tiny_empty", prompts="  \n "), expect_success=False)
    assert "the prompt list is empty" in result["error"]["exception_message"]
    result = comfy.run(_train_graph("tiny_oom", scorer="SPOTest_OOMScorer"), expect_success=False)
    message = result["error"]["exception_message"]
    assert "out of memory" in message and "lower" in message and "sample_batch_size" in message
    assert not (comfy.base / "output" / "loras" / "tiny_oom.safetensors").exists()
    assert not (comfy.base / "output" / "loras" / "tiny_empty.safetensors").exists()
    comfy.run(_train_graph("tiny_after_errors", steps=1))  # the queue is not hung


def test_train_on_image_pairs_with_diffusion_dpo(comfy):
    g = _train_graph("tiny_dpo")
    g["4"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0xFF0000}}
    g["10"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x0000FF}}
    inputs = {k: v for k, v in g["5"]["inputs"].items() if k not in ("scorer", "sampling_steps", "guidance_scale", "k",
                                                                      "batch_size", "pair_threshold")}
    inputs.update(method="diffusion_dpo", preset="auto", prompts="a red square", winners=["4", 0], losers=["10", 0], train_steps=2)
    g["5"] = {"class_type": "SPOTrainLoRAOnPairs", "inputs": inputs}
    comfy.captured.clear()
    comfy.run(g)
    assert "diffusion_dpo LoRA trained for 2 steps" in comfy.captured["report"]
    patched, warnings = _stock_load(comfy, Path(comfy.captured["path"]).name)
    assert warnings == [] and len(patched.patches) > 0


# -- training on rectified-flow MODELs (ComfyUI's own SD3 MMDiT and Flux) -------------------------------


def _encode(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_hooks_on_comfyuis_fused_qkv_equal_the_split_diffusers_modules(comfy, kind):
    """The trainer's LoRA on ComfyUI's fused q/k/v Linears (Flux: q/k/v/mlp) gives the model the same output as
    the same factors on diffusers' separate to_q/to_k/to_v, through the LoRA file in between."""
    from comfy_support.harness import tiny_flux_model, tiny_sd3_model, tiny_sd3_transformer

    from spo_core.lora import read_lora
    from spo_core.lora.write import save_lora
    from spo_core.training.lora_network import inject_lora

    training = sys.modules[comfy.pack_module + ".nodes.comfy_training"]
    model = tiny_sd3_model(0) if kind == "sd3" else tiny_flux_model(0)
    host = training.ComfyTrainingHost(model, None, None)
    table = host.module_table()
    assert table.arch == f"custom-{kind}" and host.schedule.is_flow and host.distilled_guidance == (kind == "flux")
    g = torch.Generator().manual_seed(1)
    x, ctx, pooled = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    with torch.inference_mode(False), torch.no_grad():
        net = inject_lora(host.lora_root(), table, "attn", 2, 2.0, "gaussian", 0)
        fused_hosts = {id(m) for m in net._hosts.values()}
        assert len(fused_hosts) < len(net.branches) and not net.missing  # q, k and v share one ComfyUI Linear
        for branch in net.branches.values():
            branch.up.copy_(torch.randn(branch.up.shape, generator=g) * 0.2)
        guidance = 3.5 if kind == "flux" else None
        with_lora = host.x0(x, torch.tensor([0.7]), ctx, pooled, guidance=guidance)
        with net.disabled():
            without = host.x0(x, torch.tensor([0.7]), ctx, pooled, guidance=guidance)
        lora = net.to_lora()
        net.detach()
    assert float((with_lora - without).abs().max()) > 1e-3
    if kind == "flux":
        return  # ComfyUI's tiny Flux has no diffusers twin here; the fused rows are checked through SD3's below
    path = comfy.base / "fused_check.safetensors"
    save_lora(lora, path, fmt="webui", overwrite=True)
    transformer = tiny_sd3_transformer(0)
    from spo_core.backends.flow_backend import FlowBackend
    from spo_core.testing import tiny_vae

    backend = FlowBackend(transformer, tiny_vae(1), lambda p: (ctx, pooled), shift=3.0)
    split = inject_lora(transformer, backend.module_table(), "attn", 2, 2.0, "gaussian", 0)
    split.load_lora(read_lora(path, arch=backend.module_table()))
    with torch.no_grad():
        v = transformer(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=ctx, pooled_projections=pooled,
                        return_dict=False)[0]
    split.detach()
    torch.testing.assert_close(with_lora, x - 0.7 * v, rtol=0, atol=2e-5)


def _comfy_euler(model, clip, vae, prompt: str, seed: int, sigmas: torch.Tensor, cfg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's own sampling of one image: its euler sampler over the given sigmas, CFG (or Flux's FluxGuidance
    through the conditioning), seed noise as ComfyUI draws it; (latent, decoded image [1,3,H,W])."""
    import comfy.sample
    import comfy.samplers

    positive, negative = _encode(clip, prompt), _encode(clip, "")
    if model.model.model_config.unet_config.get("guidance_embed"):
        positive = [[c, {**d, "guidance": cfg}] for c, d in positive]
        cfg = 1.0
    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, positive, negative,
                                     latent, seed=seed)
    image = vae.decode(out)[..., :3].movedim(-1, 1).float().clamp(0, 1)
    return out, image


@pytest.mark.parametrize("kind,method", [("sd3", "spo"), ("sd3", "grpo"), ("flux", "spo"), ("flux", "grpo")])
def test_train_on_a_flow_model_and_comfyui_draws_the_trainers_image(comfy, kind, method):
    """SPOTrainLoRA on ComfyUI's SD3 (MMDiT) / Flux MODEL: the kohya file is patched whole by the stock
    LoraLoaderModelOnly (no warning, one patch per stored module; GRPO runs with gradient checkpointing, SPO
    without), and ComfyUI's own euler sampling of the
    patched MODEL draws, at the same seed, the image the trainer's validation draws with its hooks."""
    from comfy_support.harness import tiny_clip, tiny_flux_model, tiny_sd3_model, tiny_vae16
    from safetensors import safe_open

    from spo_core.lora import read_lora
    from spo_core.training.lora_network import inject_lora
    from spo_core.training.validation import sample_images

    training = sys.modules[comfy.pack_module + ".nodes.comfy_training"]
    make = tiny_sd3_model if kind == "sd3" else tiny_flux_model
    clip, vae = tiny_clip(0), tiny_vae16(0)
    scorer, = run_node_class(comfy.node_class("SPOTest_BrightnessScorer"))
    name = f"tiny_{kind}_{method}"
    comfy.log.clear()
    model_out, path, curves, report = run_node_class(
        comfy.node_class("SPOTrainLoRA"), model=make(0), clip=clip, vae=vae, scorer=scorer, prompts="a red apple\na blue car",
        method=method, preset="auto", train_steps=2, learning_rate=2e-2, rank=2, width=64, height=64, seed=1,
        output_name=name, resume=False, overwrite=True, mixed_precision="auto", gradient_checkpointing=method == "grpo",
        checkpoint_every=0, preview_every=-1, sampling_steps=6, guidance_scale=3.0, k=2, batch_size=2,
        pair_threshold=0.0)
    assert f"{method} LoRA trained for 2 steps on a custom-{kind} model" in report
    with safe_open(path, "pt") as f:
        stored = {k.split(".")[0] for k in f.keys()}
        assert f.metadata()["spo_method"] == method
    assert any("_attn_qkv" in k or "linear1" in k for k in stored)  # ComfyUI's fused layout, kohya names
    assert len(model_out.patches) == len(stored) and not _lora_warnings(comfy)  # the node's MODEL has it applied
    patched, warnings = run_node_class(comfy.node_class("LoraLoaderModelOnly"), model=make(0), lora_name=Path(path).name,
                                       strength_model=1.0)[0], _lora_warnings(comfy)
    assert warnings == [] and len(patched.patches) == len(stored)

    host = training.ComfyTrainingHost(make(0), clip, vae)
    sigmas = host.schedule.spo_sigmas(6)
    with torch.inference_mode(False), torch.enable_grad():
        net = inject_lora(host.lora_root(), host.module_table(), "attn", 2, 2.0, "gaussian", 0)
        assert net.load_lora(read_lora(path, arch=host.module_table())) == len(net.branches)
        ours = sample_images(host, net, ["a red apple"], [5], 6, 3.0, 1.0, None, 64, 64, sigmas=sigmas)
        base = sample_images(host, net, ["a red apple"], [5], 6, 3.0, 0.0, None, 64, 64, sigmas=sigmas)
        net.detach()
    _, theirs = _comfy_euler(patched, clip, vae, "a red apple", 5, sigmas, 3.0)
    assert float((ours - base).abs().max()) > 1e-3  # the LoRA changed the picture
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-4)


# -- example workflows validate in the real ComfyUI ---------------------------------------------------


def test_example_workflows_validate_in_comfyui(comfy):
    import asyncio

    import execution

    from comfy_support.workflows import load_examples, ui_to_api

    placeholders = {"ckpt_name": "checkpoints", "lora_name": "loras", "unet_name": "diffusion_models",
                    "clip_name1": "text_encoders", "clip_name2": "text_encoders", "vae_name": "vae"}
    for name, wf in load_examples().items():
        prompt = ui_to_api(wf, comfy.nodes.NODE_CLASS_MAPPINGS)
        for node in prompt.values():  # empty files stand in for the models the workflow names
            for key, folder in placeholders.items():
                if key in node["inputs"]:
                    (comfy.base / "models" / folder / node["inputs"][key]).touch()
            if node["class_type"] == "SPOLoadScorer":
                (comfy.base / "models" / "spo_scorers" / node["inputs"]["weights"]).touch()
        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("x", prompt, None))
        assert ok, (name, error, node_errors)
        assert outputs


def test_comfyuis_own_tokenizer_is_registered_and_tokenizes_like_ours(comfy):
    """Without open_clip the SPM falls back to ComfyUI's comfy/sd1_tokenizer: same ids as the bundled BPE."""
    from spo_core import clip_tokenizer as ct

    folder = next(f for f in ct.FALLBACK_FOLDERS if f.name == "sd1_tokenizer")
    theirs, ours = ct.load_clip_tokenizer(folder), ct.load_clip_tokenizer()
    for text in ("a red circle above a blue square", "A photo of a cat, 4k, (masterpiece:1.2), café"):
        assert theirs(text).input_ids == ours(text).input_ids


def test_the_scorer_is_named_in_comfyuis_load_log(comfy):
    scorers = sys.modules[comfy.pack_module + ".nodes.scorer_nodes"]
    from spo_core.scorers import load_scorer

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x

    inner = load_scorer("jpeg_compressibility")
    inner.modules = lambda: [Tiny()]
    managed = scorers.ManagedScorer(inner, torch.device("cpu"), torch.device("cpu"))
    comfy.log.clear()
    managed.prepare()
    assert any("Requested to load SPOScorer_jpeg_compressibility" in m for m in comfy.log.messages(logging.INFO))
