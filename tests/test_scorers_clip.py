"""PickScore, CLIP score, aesthetic and HPS scorers against transformers, open_clip and PIL-based
preprocessing, with tiny random models saved in the layout the real weights use."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from spo_core.errors import ModelMismatchError, WeightsNotFoundError
from spo_core.scorers import load_scorer
from spo_core.scorers.preprocess import clip_processor_pixels, hps_pixels, normalize
from spo_core.testing import tiny_clip_model

PROMPTS = ["a red circle above a blue square", "a photo of a cat"]


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a ModelOutput


def smooth_images(h, w, n=1, seed=0):
    """Image-like inputs (smooth, quantized to uint8 levels) rather than white noise."""
    base = torch.rand(n, 3, h // 8 + 1, w // 8 + 1, generator=torch.Generator().manual_seed(seed))
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


def to_pil(x):
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.fixture
def images():
    return smooth_images(40, 52, n=2)


@pytest.mark.parametrize("size", [(512, 512), (300, 451), (97, 130), (640, 360)])
def test_clip_preprocessing_matches_clip_image_processor(size):
    """Same geometry as transformers' CLIPImageProcessor (PIL bicubic on uint8): within uint8 rounding."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    x = smooth_images(*size, seed=size[0])
    ref = torch.from_numpy(proc(images=to_pil(x[0]), return_tensors="np")["pixel_values"])
    diff = (clip_processor_pixels(x, 224) - ref).abs()
    assert diff.max() < 0.03 and diff.mean() < 0.008  # 0.03 in normalized units is about 2/255


@pytest.mark.parametrize("size", [(512, 512), (300, 451), (640, 360), (97, 130)])
def test_hps_preprocessing_matches_resize_max_size(size):
    """HPS's ResizeMaxSize(224) on a PIL image: longest side round(s * scale), black padding pad//2 first."""
    x = smooth_images(*size, seed=size[1])
    h, w = size
    scale = 224 / max(h, w)
    new = (round(h * scale), round(w * scale))
    canvas = Image.new("RGB", (224, 224), (0, 0, 0))
    canvas.paste(to_pil(x[0]).resize((new[1], new[0]), Image.BICUBIC), ((224 - new[1]) // 2, (224 - new[0]) // 2))
    ref = normalize(torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)[None].float() / 255)
    diff = (hps_pixels(x, 224) - ref).abs()
    assert diff.max() < 0.03 and diff.mean() < 0.008


def test_pickscore_and_clip_score_from_a_transformers_folder(tmp_path, images):
    hf = tiny_clip_model(seed=3)
    hf.save_pretrained(tmp_path / "PickScore_v1")
    pick = load_scorer("pickscore", tmp_path / "PickScore_v1")
    pixels = clip_processor_pixels(images, 32)
    ids = pick.backbone.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        img = _features(hf.get_image_features(pixel_values=pixels))
        txt = _features(hf.get_text_features(input_ids=ids))
    cos = ((img / img.norm(dim=-1, keepdim=True)) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    torch.testing.assert_close(pick.score(images, PROMPTS), hf.logit_scale.exp() * cos, atol=1e-5, rtol=1e-5)
    clip = load_scorer("clip", tmp_path / "PickScore_v1")
    torch.testing.assert_close(clip.score(images, PROMPTS), 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-5)
    clip25 = load_scorer("clip", tmp_path / "PickScore_v1", scale=2.5)
    torch.testing.assert_close(clip25.score(images, PROMPTS), 2.5 * cos.clamp(min=0), atol=1e-5, rtol=1e-5)
    # one prompt for every image; timesteps are accepted and ignored by a non-step-aware scorer
    one = pick.score(images, PROMPTS[0], timesteps=500)
    torch.testing.assert_close(one[0], pick.score(images[:1], PROMPTS[:1])[0])


def test_pickscore_rejects_a_step_aware_checkpoint_folder(tmp_path):
    from spo_core.scorers import StepAwarePreferenceModel

    hf = tiny_clip_model(seed=1)
    hf.save_pretrained(tmp_path / "pick")
    spm_sd = {k[len("model."):]: v for k, v in StepAwarePreferenceModel.from_clip(hf).state_dict().items()}
    from safetensors.torch import save_file

    save_file(spm_sd, str(tmp_path / "pick" / "model.safetensors"))
    with pytest.raises(ModelMismatchError, match="(?s)unexpected .*adaLN.*load it as 'spm'"):
        load_scorer("pickscore", tmp_path / "pick")


def _tiny_open_clip(tmp_path, name, quick_gelu, width=64, head_width=64):
    import open_clip

    cfg_dir = tmp_path / "open_clip_cfg"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / f"{name}.json").write_text(json.dumps({
        "embed_dim": 16, "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": width, "head_width": head_width, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": width // head_width, "layers": 2}}))
    open_clip.add_model_config(str(cfg_dir))
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval(), open_clip.get_tokenizer(name)


def _open_clip_reference(model, tokenizer, pixels, prompts):
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokenizer(prompts), normalize=True)
    return (img * txt).sum(-1)


def test_hpsv2_on_open_clip(tmp_path, images):
    model, tok = _tiny_open_clip(tmp_path, "tiny-hps", quick_gelu=False, width=32, head_width=16)
    # HPS's file: {'state_dict': ...} with DataParallel's module. prefix
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "HPS_v2.1_compressed.pt")
    scorer = load_scorer("hpsv2", tmp_path, model_name="tiny-hps")  # the folder holding the file
    expected = _open_clip_reference(model, tok, hps_pixels(images, 32), PROMPTS)
    torch.testing.assert_close(scorer.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelMismatchError, match="not an open_clip ViT-B-32 checkpoint"):
        load_scorer("hpsv2", tmp_path / "HPS_v2.1_compressed.pt", model_name="ViT-B-32")
    with pytest.raises(WeightsNotFoundError, match="xswu/HPSv2"):
        load_scorer("hpsv2", tmp_path / "nothing_here.pt")


def _aesthetic_head(dim, seed=0):
    from spo_core.scorers.aesthetic import AestheticHead

    torch.manual_seed(seed)
    head = AestheticHead(dim).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(3)  # outputs of order 1, like the real head's 1..10
    return head


def test_aesthetic_on_a_transformers_clip_folder(tmp_path, images):
    from spo_core.scorers.aesthetic import HEAD_FILE

    hf = tiny_clip_model(seed=5, projection_dim=16)  # transformers' CLIP default activation: quick_gelu, as OpenAI's
    assert hf.config.vision_config.hidden_act == "quick_gelu"
    (tmp_path / "aes").mkdir()
    hf.save_pretrained(tmp_path / "aes" / "clip-vit-large-patch14")
    head = _aesthetic_head(16)
    torch.save(head.state_dict(), tmp_path / "aes" / HEAD_FILE)
    scorer = load_scorer("aesthetic", tmp_path / "aes")
    assert not scorer.needs_prompt
    with torch.no_grad():
        emb = _features(hf.get_image_features(pixel_values=clip_processor_pixels(images, 32)))
        expected = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scorer.score(images), expected, atol=1e-5, rtol=1e-5)
    # the head file alone: the CLIP must be given
    with pytest.raises(WeightsNotFoundError, match="CLIP ViT-L/14"):
        load_scorer("aesthetic", tmp_path / "aes" / HEAD_FILE)
    again = load_scorer("aesthetic", tmp_path / "aes" / HEAD_FILE, clip=tmp_path / "aes" / "clip-vit-large-patch14")
    torch.testing.assert_close(again.score(images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("archive", ["torchscript", "state_dict"])
def test_aesthetic_on_an_openai_clip_file_uses_quick_gelu(tmp_path, images, archive):
    """OpenAI's ViT-L-14.pt (a TorchScript archive) or its state dict: sizes inferred, QuickGELU used."""
    from spo_core.scorers.aesthetic import HEAD_FILE

    model, tok = _tiny_open_clip(tmp_path, "tiny-openai", quick_gelu=True)
    if archive == "torchscript":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace_module(model, {"encode_image": torch.zeros(1, 3, 32, 32)}).save(str(tmp_path / "ViT-L-14.pt"))
    else:
        torch.save(model.state_dict(), tmp_path / "ViT-L-14.pt")
    head = _aesthetic_head(16, seed=1)
    torch.save(head.state_dict(), tmp_path / HEAD_FILE)
    scorer = load_scorer("aesthetic", tmp_path / HEAD_FILE, clip=tmp_path / "ViT-L-14.pt")
    pixels = clip_processor_pixels(images, 32)
    with torch.no_grad():
        expected = head(model.encode_image(pixels, normalize=True)).squeeze(-1)
        gelu_model, _ = _tiny_open_clip(tmp_path, "tiny-gelu", quick_gelu=False)
        gelu_model.load_state_dict(model.state_dict())
        with_gelu = head(gelu_model.encode_image(pixels, normalize=True)).squeeze(-1)
    assert (with_gelu - expected).abs().max() > 1e-3  # the test can tell the activations apart
    torch.testing.assert_close(scorer.score(images), expected, atol=1e-5, rtol=1e-5)


def test_clip_score_on_an_open_clip_file(tmp_path, images):
    model, tok = _tiny_open_clip(tmp_path, "tiny-laion", quick_gelu=False, width=32, head_width=16)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "open_clip_model.bin")
    scorer = load_scorer("clip", tmp_path / "open_clip_model.bin", model_name="tiny-laion", scale=1.0)
    expected = _open_clip_reference(model, tok, clip_processor_pixels(images, 32), PROMPTS).clamp(min=0)
    torch.testing.assert_close(scorer.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelMismatchError, match="pass model_name"):
        load_scorer("clip", tmp_path / "open_clip_model.bin")  # not OpenAI-layout ViT sizes: needs the architecture


def test_scorers_move_between_devices_and_dtypes(tmp_path, images):
    hf = tiny_clip_model(seed=2)
    hf.save_pretrained(tmp_path / "pick")
    scorer = load_scorer("pickscore", tmp_path / "pick")
    base = scorer.score(images, PROMPTS)
    scorer.to(dtype=torch.bfloat16)
    assert scorer.dtype == torch.bfloat16 and next(scorer.backbone.module.parameters()).dtype == torch.bfloat16
    low = scorer.score(images, PROMPTS)
    assert low.dtype == torch.float32 and torch.allclose(low, base, atol=0.1)  # 14.3 * cos: cos within 0.007
    scorer.to("cpu", torch.float32)  # back to fp32 (the weights keep their bf16 rounding)
    assert next(scorer.backbone.module.parameters()).dtype == torch.float32 and scorer.device == torch.device("cpu")
    assert torch.allclose(scorer.score(images, PROMPTS), low, atol=0.1)
