"""Rectified-flow pipelines (SD3 and Flux) behind the sigma-space contract: plain sampling equals the
diffusers pipelines, the resampler / FK / best-of-N run on them, and `spo sample` takes an SD3 folder."""

from __future__ import annotations

import pytest
import torch

from spo_core.backends.flow_backend import FlowBackend
from spo_core.errors import ConfigError
from spo_core.sampling import ResamplerConfig
from spo_core.testing import tiny_flux_transformer, tiny_sd3_pipeline, tiny_vae

diffusers = pytest.importorskip("diffusers")


class _Brightness:
    name = "brightness"
    needs_prompt = False

    def score(self, images, prompts, timesteps):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def sd3():
    return FlowBackend.from_pipeline(tiny_sd3_pipeline())


def test_euler_sampling_equals_diffusers_sd3_pipeline(sd3):
    sd3.schedule.step = "euler"
    try:
        out = sd3.sample(["a red apple", "a blue car"], steps=6, guidance_scale=4.0, seed=3)
    finally:
        sd3.schedule.step = "rf_ancestral"
    ref = sd3.pipe(["a red apple", "a blue car"], num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                   generator=torch.Generator().manual_seed(3), height=32, width=32).images
    torch.testing.assert_close(out.latents, ref, rtol=0, atol=2e-5)
    assert out.images.shape == (2, 3, 32, 32) and 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    assert out.result.evaluations == 2 * 6  # rows through CFG: one per image and step


def test_euler_sampling_equals_diffusers_flux_pipeline_with_dynamic_shift():
    tr, vae = tiny_flux_transformer(), tiny_vae(1)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                      base_image_seq_len=256, max_image_seq_len=4096)
    pipe = diffusers.FluxPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    emb, pooled = torch.randn(2, 7, 32, generator=g), torch.randn(2, 32, generator=g)
    be = FlowBackend(tr, vae, lambda p: (emb[:len(p)], pooled[:len(p)]), dynamic_shift=dict(sched.config), pipe=pipe,
                     arch="flux")
    be.schedule.step = "euler"
    out = be.sample(["a", "b"], steps=5, guidance_scale=3.5, seed=3, height=32, width=32)
    ref = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, num_inference_steps=5, guidance_scale=3.5,
               output_type="latent", generator=torch.Generator().manual_seed(3), height=32, width=32).images
    torch.testing.assert_close(out.latents, diffusers.FluxPipeline._unpack_latents(ref, 32, 32, pipe.vae_scale_factor),
                               rtol=0, atol=2e-5)
    assert out.result.evaluations == 2 * 5  # guidance-distilled: no CFG rows
    with pytest.raises(ConfigError, match="multiples of 4"):
        be.latent_shape(1, 30, 32)


def test_resampler_fk_and_best_of_n_on_sd3(sd3):
    prompts = ["a red apple"] * 2
    plain = sd3.sample(prompts, steps=6, seed=1)
    greedy = sd3.sample(prompts, steps=6, seed=1, scorer=_Brightness(), config=ResamplerConfig(k=3, window=(0, 1000)))
    fk = sd3.sample(prompts, steps=6, seed=1, scorer=_Brightness(),
                    config=ResamplerConfig(k=3, policy="fk", window=(0, 1000), score_every=1))
    bon = sd3.sample(prompts, steps=6, seed=1, scorer=_Brightness(), best_of=3)
    assert greedy.result.pooled_steps == 5  # every step but the last (to sigma 0)
    assert fk.result.evaluations == bon.result.evaluations == 2 * 3 * 6  # denoiser rows: prompts x particles x steps
    for out in (fk, bon):  # the final choice is the best-scoring particle / sample of each prompt
        final = out.result.trace[-1]
        torch.testing.assert_close(out.images.mean(dim=(1, 2, 3)), final.scores.max(0).values, rtol=0, atol=1e-5)
    for r in greedy.result.trace:
        if r.pooled:
            assert torch.equal(r.chosen, r.scores.argmax(0))
    assert not torch.allclose(greedy.latents, plain.latents)
    again = sd3.sample(prompts, steps=6, seed=1, scorer=_Brightness(), config=ResamplerConfig(k=3, window=(0, 1000)))
    torch.testing.assert_close(again.latents, greedy.latents)


def test_sd3_refuses_the_rgb_decoder_and_latent_scorers(sd3):
    with pytest.raises(ConfigError, match="rgb"):
        sd3.decoder("rgb")

    class Latent(_Brightness):
        input_kind = "latent"

    with pytest.raises(ConfigError, match="rectified-flow"):
        sd3.sample(["x"], steps=2, scorer=Latent(), config=ResamplerConfig(k=2, window=(0, 1000)))


def test_spo_sample_on_an_sd3_folder(tmp_path, capsys):
    from spo_core.cli import main

    folder = tmp_path / "sd3"
    tiny_sd3_pipeline().save_pretrained(folder)
    out = tmp_path / "img.png"
    assert main(["sample", "--model", str(folder), "--prompt", "a red apple", "--steps", "4", "--k", "2",
                 "--scorer", "jpeg_compressibility", "--window", "0:1000", "--out", str(out), "--no-progress"]) == 0
    assert out.is_file() and "3 pooled with k = 2" in capsys.readouterr().out
    assert main(["sample", "--model", str(folder), "--prompt", "x", "--steps", "3", "--k", "2", "--flow-step", "euler",
                 "--scorer", "jpeg_compressibility", "--window", "0:1000", "--out", str(tmp_path / "e.png"),
                 "--no-progress"]) == 2
    assert "deterministic" in capsys.readouterr().err
    assert main(["sample", "--model", str(folder), "--prompt", "x", "--steps", "3", "--k", "1", "--flow-step", "sde",
                 "--out", str(tmp_path / "s.png"), "--no-progress"]) == 0


def test_spo_sample_merges_a_flow_lora(tmp_path, capsys):
    """`spo sample --lora` on an SD3 folder: the LoRA (diffusers keys on the transformer) changes the image;
    strength 0 leaves it as it was."""
    from safetensors.torch import save_file

    from spo_core.cli import main

    folder = tmp_path / "sd3"
    pipe = tiny_sd3_pipeline()
    pipe.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, mod in pipe.transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_v")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, mod.in_features, generator=g) * 0.3
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 4, generator=g) * 0.3
    lora = tmp_path / "flow_lora.safetensors"
    save_file(sd, str(lora))
    outs = {}
    for tag, extra in (("plain", []), ("zero", ["--lora", f"{lora}:0"]), ("one", ["--lora", str(lora)])):
        out = tmp_path / f"{tag}.png"
        assert main(["sample", "--model", str(folder), "--prompt", "x", "--steps", "3", "--k", "1", "--out", str(out),
                     "--no-progress", *extra]) == 0
        outs[tag] = out.read_bytes()
    assert outs["zero"] == outs["plain"] and outs["one"] != outs["plain"]
