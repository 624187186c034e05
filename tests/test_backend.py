"""The diffusers backend against diffusers' own pipelines."""

import pytest
import torch

from spo_core.backends import DiffusersBackend
from spo_core.errors import ConfigError, ModelMismatchError
from spo_core.sampling import sample_ancestral, sigma_space_to_vp
from spo_core.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a red circle above a blue square", "a green triangle"]


@pytest.mark.parametrize("make,prediction", [(tiny_sd15_pipeline, "epsilon"), (tiny_sd15_pipeline, "v_prediction"),
                                             (tiny_sdxl_pipeline, "epsilon")], ids=["sd15-eps", "sd15-v", "sdxl"])
def test_ancestral_sampling_equals_diffusers_ddim_eta1(make, prediction):
    pipe = make(prediction_type=prediction) if make is tiny_sd15_pipeline else make()
    steps, seed = 6, 1234
    ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=5.0, eta=1.0, height=32, width=32,
               output_type="latent", generator=torch.Generator().manual_seed(seed)).images
    be = DiffusersBackend.from_pipeline(pipe)
    cond = be.encode_prompts(PROMPTS, height=32, width=32)
    sig = be.schedule.ddim_sigmas(steps)
    g = torch.Generator().manual_seed(seed)
    x = be.initial_noise(2, 32, 32, sigma=float(sig[0]), generator=g)
    out = sample_ancestral(be.denoiser(5.0), cond, x, sig, eta=1.0, generator=g)
    ours = sigma_space_to_vp(out.x, float(sig[-1]))
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert out.evaluations == steps * len(PROMPTS)
    # the convenience entry point (its default sigmas come from the scheduler config) does the same
    conv = be.sample(PROMPTS, steps=steps, guidance_scale=5.0, height=32, width=32, seed=seed)
    assert float((conv.latents - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert conv.images.shape == (2, 3, 32, 32) and conv.result.evaluations == steps * len(PROMPTS)


def test_decode_and_encode_round_trip_shapes():
    be = DiffusersBackend.from_pipeline(tiny_sd15_pipeline())
    images = torch.rand(2, 3, 32, 32)
    z = be.encode_images(images)
    assert z.shape == be.latent_shape(2, 32, 32)
    out = be.decode(z)
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_sdxl_model_refuses_sd15_conditioning():
    sd15 = DiffusersBackend.from_pipeline(tiny_sd15_pipeline())
    sdxl = DiffusersBackend.from_pipeline(tiny_sdxl_pipeline())
    cond = sd15.encode_prompts(PROMPTS)
    x = torch.randn(2, 4, 16, 16)
    with pytest.raises(ModelMismatchError, match="SDXL"):
        sdxl.denoiser(5.0)(x, torch.full((2,), 1.0), cond)
    with pytest.raises(ModelMismatchError, match="expects"):
        sd15.denoiser(5.0)(x, torch.full((2,), 1.0), sdxl.encode_prompts(PROMPTS))


def test_bad_settings():
    be = DiffusersBackend.from_pipeline(tiny_sd15_pipeline())
    with pytest.raises(ConfigError, match="empty"):
        be.encode_prompts([])
    with pytest.raises(ConfigError, match="multiples"):
        be.latent_shape(1, 33, 32)


def test_from_pretrained_folder_without_tokenizer_and_single_file(tmp_path):
    import shutil

    pipe = tiny_sd15_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "tokenizer")  # rebuilt offline, never downloaded
    be = DiffusersBackend.from_pretrained(tmp_path / "model")
    assert be.arch == "custom-sd1" and be.prediction_type == "epsilon"
    a = be.denoiser(3.0)(torch.ones(1, 4, 16, 16), torch.tensor([2.0]), be.encode_prompts("x"))
    ref = DiffusersBackend.from_pipeline(pipe)
    b = ref.denoiser(3.0)(torch.ones(1, 4, 16, 16), torch.tensor([2.0]), ref.encode_prompts("x"))
    torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="model_index"):
        DiffusersBackend.from_pretrained(tmp_path)

    # a single-file LDM checkpoint (UNet + text encoder), configs from a folder, a separate VAE
    from spo_core.lora import table_for_pipeline
    from test_lora_extract_merge import _ldm_single_file

    _ldm_single_file(pipe, table_for_pipeline(pipe), tmp_path / "single.safetensors")
    single = DiffusersBackend.from_pretrained(tmp_path / "single.safetensors", arch=str(tmp_path / "model"), vae=pipe.vae)
    c = single.denoiser(3.0)(torch.ones(1, 4, 16, 16), torch.tensor([2.0]), single.encode_prompts("x"))
    torch.testing.assert_close(c, b)


class MeanScorer:
    name, step_aware, needs_prompt, differentiable = "mean", False, False, False

    def score(self, images, prompts, timesteps=None):
        return images.mean(dim=(1, 2, 3)) * 100


def test_resampled_sampling_is_deterministic_per_seed():
    be = DiffusersBackend.from_pipeline(tiny_sd15_pipeline())
    kw = dict(steps=4, height=32, width=32, k=2, scorer=MeanScorer(), decode="rgb")
    from spo_core.sampling import ResamplerConfig

    cfg = ResamplerConfig(k=2, window=(0, 999))
    a = be.sample("a cat", seed=3, config=cfg, **kw)
    b = be.sample("a cat", seed=3, config=cfg, **kw)
    c = be.sample("a cat", seed=4, config=cfg, **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)
    assert a.result.pooled_steps == 4 and a.result.evaluations == 1 + 3 * 2
    best = be.sample("a cat", seed=3, best_of=3, **kw)
    assert best.result.trace[0].scores.shape == (3, 1) and best.result.evaluations == 3 * 4


def test_sdxl_pooled_and_time_id_mismatch_is_a_model_mismatch():
    sdxl = DiffusersBackend.from_pipeline(tiny_sdxl_pipeline())
    cond = sdxl.encode_prompts(PROMPTS, height=32, width=32)
    assert cond["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    bad = type(cond)({**cond.tensors, "time_ids": cond["time_ids"][:, :4]})
    with pytest.raises(ModelMismatchError, match="time ids"):
        sdxl.denoiser(5.0)(torch.randn(2, 4, 16, 16), torch.full((2,), 1.0), bad)


def test_decoders_rgb_taesd_and_fp16_vae_upcast(tmp_path):
    import diffusers

    be = DiffusersBackend.from_pipeline(tiny_sd15_pipeline())
    z = torch.randn(2, 4, 16, 16)
    rgb = be.decoder("rgb")(z)
    assert rgb.shape == (2, 3, 32, 32) and 0 <= float(rgb.min()) and float(rgb.max()) <= 1
    torch.manual_seed(0)
    taesd = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                      num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4,
                                      upsampling_scaling_factor=2)
    taesd.save_pretrained(tmp_path / "taesd")
    dec = be.decoder(str(tmp_path / "taesd"))
    images = dec(z)
    ref = (taesd.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
    assert images.shape == ref.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, ref)
    with pytest.raises(ConfigError, match="TAESD"):
        be.decoder(str(tmp_path))
    be.vae.to(torch.float16)  # the tiny VAE's config says force_upcast, like SDXL's original VAE
    out = be.decode(z)
    assert be.vae.dtype == torch.float32 and torch.isfinite(out).all()


def test_quiet_load_hides_loading_bars_and_restores_them():
    pytest.importorskip("diffusers")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    from spo_core.backends.diffusers_backend import quiet_load

    seen = quiet_load(lambda: (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()))
    assert seen == (False, False)
    assert dlog.is_progress_bar_enabled() and tlog.is_progress_bar_enabled()
    with pytest.raises(ValueError):
        quiet_load(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert dlog.is_progress_bar_enabled() and tlog.is_progress_bar_enabled()
    # the CLI keeps them for multi-GB checkpoints
    assert quiet_load(lambda: dlog.is_progress_bar_enabled(), show_bars=True) is True
