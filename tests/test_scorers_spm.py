"""The step-aware preference model against independent references: transformers' CLIPModel,
SPO's own preprocessing (torchvision), SPO's loss formula, the published key set."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from spo_core.errors import ModelMismatchError, WeightsNotFoundError
from spo_core.scorers import (CLIPConfigLite, CLIPTorch, SPMScorer, StepAwarePreferenceModel, clip_h14_config,
                              convert_spm_file, load_scorer, load_spm, preference_loss, save_spm)
from spo_core.scorers.preprocess import spm_pixels

PROMPTS = ["a red circle above a blue square", "a photo of a cat"]


def tiny_hf_clip(act: str, seed: int = 3):
    """A tiny transformers CLIPModel (the independent reference implementation)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act=act),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, hidden_act=act),
        projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    return model


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a ModelOutput


def hf_score(hf, pixels, ids):
    with torch.no_grad():
        img = _features(hf.get_image_features(pixel_values=pixels))
        txt = _features(hf.get_text_features(input_ids=ids))
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return hf.logit_scale.exp() * (img * txt).sum(-1)


def perturb_adaln(model, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "t_embedder" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.fixture(scope="module", params=["gelu", "quick_gelu"])
def hf_clip(request):
    return tiny_hf_clip(request.param)


@pytest.fixture
def images():
    return torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def test_identity_init_scores_equal_plain_clip_at_every_timestep(hf_clip, images):
    scorer = SPMScorer(StepAwarePreferenceModel.from_clip(hf_clip))
    ids = scorer.input_ids(PROMPTS)
    ref = hf_score(hf_clip, spm_pixels(images, 32), ids)
    for t in (0, 251, 751, 999):
        torch.testing.assert_close(scorer.score(images, PROMPTS, t), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer.score(images, PROMPTS, torch.tensor([10, 900])), ref, atol=1e-5, rtol=1e-5)


def test_random_adaln_makes_the_score_depend_on_the_timestep(hf_clip, images):
    scorer = SPMScorer(perturb_adaln(StepAwarePreferenceModel.from_clip(hf_clip)))
    s0, s1 = scorer.score(images, PROMPTS, 0), scorer.score(images, PROMPTS, 700)
    assert (s0 - s1).abs().max() > 1e-3
    # per-row timesteps: each row scores as if alone
    mixed = scorer.score(images, PROMPTS, torch.tensor([0, 700]))
    torch.testing.assert_close(mixed, torch.stack([s0[0], s1[1]]), atol=1e-5, rtol=1e-5)


def test_timestep_embedding_is_dit_sinusoidal():
    """[cos, sin] halves with frequencies exp(-ln(10000) i / 128), as DiT/GLIDE (SPO's TimestepEmbedder)."""
    from spo_core.scorers.clip_torch import TimestepEmbedder

    t = torch.tensor([0.0, 501.0])
    emb = TimestepEmbedder.sinusoidal(t, 256)
    i = torch.arange(128, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000) * i / 128)
    expected = torch.cat([torch.cos(t.double()[:, None] * freqs), torch.sin(t.double()[:, None] * freqs)], dim=-1)
    torch.testing.assert_close(emb.double(), expected, atol=1e-4, rtol=0)


def test_preprocessing_equals_spo_get_preference_score():
    """SPO maps [-1,1] -> bicubic F.interpolate (no antialias) -> torchvision CenterCrop -> clamp -> normalize."""
    from torchvision import transforms

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    for h, w in ((64, 64), (61, 90), (512, 333), (224, 224)):
        x01 = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        images = x01 * 2 - 1  # SPO received VAE outputs in [-1, 1]
        scale = 224 / min(h, w)
        new_size = (int(h * scale + 0.5), int(w * scale + 0.5))
        ref = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False)
        if new_size[0] != new_size[1]:
            ref = transforms.CenterCrop(224)(ref)
        ref = transforms.Normalize(mean, std)((ref / 2 + 0.5).clamp(0, 1).float())
        torch.testing.assert_close(spm_pixels(x01, 224), ref, atol=2e-6, rtol=0)


def test_full_size_model_on_meta_has_exactly_the_published_keys_and_shapes():
    import transformers

    hf_cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           patch_size=14, image_size=224, hidden_act="gelu"),
        projection_dim=1024)
    with torch.device("meta"):
        ours = StepAwarePreferenceModel(clip_h14_config())
        reference = transformers.CLIPModel(hf_cfg)
    expected = {"model." + k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.endswith("position_ids")}
    expected.update({"model.t_embedder.mlp.0.weight": (1280, 256), "model.t_embedder.mlp.0.bias": (1280,),
                     "model.t_embedder.mlp.2.weight": (1280, 1280), "model.t_embedder.mlp.2.bias": (1280,),
                     "model.vision_model.adaLN_modulation.1.weight": (2560, 1280),
                     "model.vision_model.adaLN_modulation.1.bias": (2560,)})
    for i in range(32):
        expected[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = (7680, 1280)
        expected[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = (7680,)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    n = sum(v.numel() for v in ours.state_dict().values())
    assert abs(n / 1e9 - 1.306) < 0.001  # 5.22 GB in fp32, the released file size
    assert clip_h14_config() == CLIPConfigLite.from_transformers(hf_cfg)


@pytest.fixture
def trained_like(hf_clip):
    return perturb_adaln(StepAwarePreferenceModel.from_clip(hf_clip), 0.02, seed=1)


def test_save_load_round_trips_bin_and_safetensors(tmp_path, trained_like, images):
    base = SPMScorer(trained_like).score(images, PROMPTS, 500)
    save_spm(trained_like, tmp_path / "spm.safetensors")
    save_spm(trained_like, tmp_path / "spm.bin")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "spm.safetensors"), "pt") as f:
        assert set(f.keys()) == set(trained_like.state_dict()) and all(k.startswith("model.") for k in f.keys())
        assert json.loads(f.metadata()["spo.clip_config"]) == trained_like.cfg.to_dict()
    torch.load(tmp_path / "spm.bin", weights_only=True)  # a plain weights-only pickle
    for name in ("spm.safetensors", "spm.bin"):
        torch.testing.assert_close(load_scorer("spm", tmp_path / name).score(images, PROMPTS, 500), base, rtol=0, atol=0)


def test_conversion_gives_identical_scores(tmp_path, trained_like, images):
    save_spm(trained_like, tmp_path / "spm.bin")
    base = load_scorer("spm", tmp_path / "spm.bin").score(images, PROMPTS, 300)
    convert_spm_file(tmp_path / "spm.bin", tmp_path / "fp32.safetensors", dtype=torch.float32)
    torch.testing.assert_close(load_scorer("spm", tmp_path / "fp32.safetensors").score(images, PROMPTS, 300), base, rtol=0, atol=0)
    for dtype, rtol in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1)):  # identical to loading the .bin in that dtype
        out = tmp_path / f"{dtype}.safetensors"
        convert_spm_file(tmp_path / "spm.bin", out, dtype=dtype)
        a = load_scorer("spm", out, dtype=dtype).score(images, PROMPTS, 300)
        b = load_scorer("spm", tmp_path / "spm.bin", dtype=dtype).score(images, PROMPTS, 300)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, base, rtol=rtol, atol=0)
    assert (tmp_path / "torch.float16.safetensors").stat().st_size < 0.55 * (tmp_path / "fp32.safetensors").stat().st_size


def test_released_layout_without_config(tmp_path, hf_clip, images):
    """The released .bin: a plain `model.`-prefixed state dict with position_ids buffers and no config.
    It is read as CLIP-H; a file of another size without metadata is refused with a clear message."""
    model = StepAwarePreferenceModel.from_clip(hf_clip)
    sd = dict(model.state_dict())
    sd["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(sd, tmp_path / "released_like.bin")
    with pytest.raises(ModelMismatchError, match="not CLIP ViT-H/14"):
        load_spm(tmp_path / "released_like.bin")
    # position_ids tolerated, config from our metadata
    sd["spo.clip_config"] = json.dumps(model.cfg.to_dict())
    torch.save(sd, tmp_path / "with_config.bin")
    load_spm(tmp_path / "with_config.bin")


def test_missing_key_is_named(tmp_path, trained_like):
    save_spm(trained_like, tmp_path / "spm.bin")
    sd = torch.load(tmp_path / "spm.bin", weights_only=True)
    del sd["model.vision_model.encoder.layers.1.adaLN_modulation.1.weight"]
    torch.save(sd, tmp_path / "broken.bin")
    with pytest.raises(ModelMismatchError, match=r"missing 1 keys: model\.vision_model\.encoder\.layers\.1\.adaLN_modulation\.1\.weight"):
        load_spm(tmp_path / "broken.bin")


def test_a_pickscore_checkpoint_is_not_an_spm(tmp_path, hf_clip):
    from spo_core.safe_io import save_safetensors
    from spo_core.scorers.spm_model import spm_metadata

    plain = {"model." + k: v for k, v in hf_clip.state_dict().items() if not k.endswith("position_ids")}
    save_safetensors(plain, tmp_path / "pickscore_like.safetensors", spm_metadata(CLIPConfigLite.from_transformers(hf_clip.config)))
    with pytest.raises(ModelMismatchError, match=r"missing \d+ keys: .*adaLN") as err:
        load_scorer("spm", tmp_path / "pickscore_like.safetensors")
    assert "plain CLIP/PickScore checkpoint" in str(err.value)
    hf_clip.save_pretrained(tmp_path / "PickScore_v1")  # a PickScore folder given as the SPM
    with pytest.raises(WeightsNotFoundError, match="holds no step-aware preference model"):
        load_scorer("spm", tmp_path / "PickScore_v1")
    weights = next(f for f in (tmp_path / "PickScore_v1").iterdir() if f.name in ("model.safetensors", "pytorch_model.bin"))
    with pytest.raises(ModelMismatchError, match="not CLIP ViT-H/14|does not fit"):
        load_scorer("spm", weights)


def test_missing_file_names_it_and_the_download(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="sd-v1-5_step-aware_preference_model.bin.*SPO-Diffusion-Models/Step-Aware_Preference_Models"):
        load_scorer("spm", tmp_path / "sd-v1-5_step-aware_preference_model.bin")


def test_from_clip_folder_and_training_api(tmp_path, hf_clip, images):
    hf_clip.save_pretrained(tmp_path / "pick")
    model = StepAwarePreferenceModel.from_clip(str(tmp_path / "pick"))
    scorer = SPMScorer(model)
    ids = scorer.input_ids(PROMPTS)
    model.train()
    logits = model(images, ids, torch.tensor([100.0, 600.0]))
    torch.testing.assert_close(logits.detach(), scorer.score(images, PROMPTS, torch.tensor([100, 600])), atol=1e-5, rtol=1e-5)
    loss = preference_loss(logits, logits.flip(0), torch.tensor([1.0, 0.5]))
    loss.backward()
    adaln = model.model.vision_model.encoder.layers[0].adaLN_modulation[1].weight
    assert adaln.grad is not None and adaln.grad.abs().sum() > 0
    # the source model is untouched (weights were copied, not shared)
    assert model.model.logit_scale.data_ptr() != hf_clip.logit_scale.data_ptr()


def test_preference_loss_matches_spo_criterion():
    """spm_criterion.py (no in-batch negatives): label_0*CE(l,0) + label_1*CE(l,1) + log(0.5)*tie, weighted by
    1/num_examples_per_prompt normalized, summed."""
    l0, l1 = torch.tensor([20.0, 18.5, 21.0]), torch.tensor([19.0, 19.5, 21.0])
    label_0 = torch.tensor([1.0, 0.0, 0.5])
    n_per_prompt = torch.tensor([1.0, 2.0, 4.0])
    logits = torch.stack([l0, l1], -1)
    ce0 = F.cross_entropy(logits, torch.zeros(3, dtype=torch.long), reduction="none")
    ce1 = F.cross_entropy(logits, torch.ones(3, dtype=torch.long), reduction="none")
    per = label_0 * ce0 + (1 - label_0) * ce1 + (label_0 == 1 - label_0).float() * math.log(0.5)
    w = (1 / n_per_prompt) / (1 / n_per_prompt).sum()
    torch.testing.assert_close(preference_loss(l0, l1, label_0, weights=1 / n_per_prompt), (per * w).sum())
    assert preference_loss(torch.tensor([5.0]), torch.tensor([5.0]), torch.tensor([0.5])).abs() < 1e-6  # a perfect tie is 0


def test_scores_are_differentiable_wrt_images(tmp_path, trained_like, images):
    save_spm(trained_like, tmp_path / "spm.safetensors")
    scorer = load_scorer("spm", tmp_path / "spm.safetensors")
    assert not any(p.requires_grad for p in scorer.model.parameters())  # a loaded scorer is frozen
    x = images.clone().requires_grad_(True)
    s = scorer.score(x, PROMPTS, torch.tensor([100, 600]))
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not scorer.score(images, PROMPTS).requires_grad  # no graph without a reason


def test_tiny_model_from_config_only(tmp_path, images):
    """The demo world's path: a tiny SPM from a config alone, saved and loaded through the registry."""
    from spo_core.scorers import tiny_clip_config

    model = StepAwarePreferenceModel.identity(tiny_clip_config(image_size=32), seed=0)
    save_spm(model, tmp_path / "tiny_spm.safetensors")
    s = load_scorer("spm", tmp_path / "tiny_spm.safetensors").score(images, PROMPTS, 250)
    assert s.shape == (2,) and torch.isfinite(s).all()
    assert isinstance(model.model, CLIPTorch) and model.model.time_conditioned
