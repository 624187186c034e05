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
