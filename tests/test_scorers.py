"""The scorer protocol and registry, DDPO's JPEG rewards, bad input, the offline tokenizer
against open_clip's, and the `spo score` / `spo scorer` commands."""

import io
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from spo_core.errors import ConfigError, InvalidTensorError, WeightsNotFoundError
from spo_core.scorers import (SCORERS, SPMScorer, StepAwarePreferenceModel, available_scorers, load_scorer, save_spm,
                              tiny_clip_config)


def ddpo_jpeg_size_kb(images):
    """ddpo_pytorch/rewards.py jpeg_incompressibility, written out."""
    arr = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    return sizes


def test_jpeg_scores_follow_ddpo():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    gradient = torch.linspace(0, 1, 96).reshape(1, 1, 1, 96).expand(1, 3, 64, 96)[..., :64]
    imgs = torch.cat([flat, noise, gradient])
    expected = ddpo_jpeg_size_kb(imgs)
    inc = load_scorer("jpeg_incompressibility").score(imgs)
    comp = load_scorer("jpeg_compressibility").score(imgs, prompts=["ignored"] * 3, timesteps=500)
    assert inc.tolist() == pytest.approx(expected) and comp.tolist() == pytest.approx([-e for e in expected])
    assert inc.dtype == torch.float32 and inc[1] > 5 * inc[0]  # noise is incompressible
    assert load_scorer("jpeg_incompressibility", quality=50).score(noise)[0] < inc[1]


def test_registry_lists_every_scorer_with_what_it_needs():
    infos = {s.name: s for s in available_scorers()}
    assert set(infos) == {"spm", "lrm", "pickscore", "hpsv2", "aesthetic", "clip", "jpeg_compressibility", "jpeg_incompressibility"}
    assert [n for n, s in infos.items() if s.step_aware] == ["spm", "lrm"]
    assert "Step-Aware_Preference_Models" in infos["spm"].weights_hint and "PickScore_v1" in infos["pickscore"].weights_hint
    assert "xswu/HPSv2" in infos["hpsv2"].weights_hint and "sac+logos+ava1-l14-linearMSE.pth" in infos["aesthetic"].weights_hint
    assert not infos["jpeg_compressibility"].needs_weights and not infos["aesthetic"].needs_prompt
    assert SCORERS["spm"] is infos["spm"]


def test_load_scorer_errors_say_what_to_do(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="PickScore_v1"):
        load_scorer("pickscore", None)
    with pytest.raises(WeightsNotFoundError, match="CLIP folder not found|not found"):
        load_scorer("pickscore", tmp_path / "PickScore_v1")
    with pytest.raises(ConfigError, match="unknown scorer 'imagereward'"):
        load_scorer("imagereward", "x")
    with pytest.raises(ConfigError, match="takes no option scale"):
        load_scorer("jpeg_compressibility", scale=3)
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_scorer("jpeg_compressibility", dtype="fp8")
    with pytest.raises(WeightsNotFoundError, match="sac\\+logos"):
        load_scorer("aesthetic", tmp_path)


@pytest.fixture(scope="module")
def tiny_spm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "tiny_spm.safetensors"
    save_spm(StepAwarePreferenceModel.identity(tiny_clip_config(image_size=32), seed=0), path)
    return path


@pytest.mark.parametrize("name", ["spm", "jpeg_incompressibility"])
def test_bad_images_and_prompts(name, tiny_spm_file):
    scorer = load_scorer(name, tiny_spm_file if name == "spm" else None)
    images = torch.rand(2, 3, 40, 48)
    with pytest.raises(InvalidTensorError, match=r"\[0,1\]"):
        scorer.score(images * 2 - 1, ["a", "b"])
    with pytest.raises(InvalidTensorError, match="NaN|\\[0,1\\]"):
        scorer.score(images.masked_fill(images > 0.5, float("nan")), ["a", "b"])
    with pytest.raises(InvalidTensorError, match=r"decoded images \[B,3,H,W\] in \[0,1\], not 1-channel latents"):
        scorer.score(images[:, :1], ["a", "b"])
    with pytest.raises(InvalidTensorError, match=r"shape \[B,3,H,W\]"):
        scorer.score(images[0], ["a"])
    with pytest.raises(InvalidTensorError, match="empty"):
        scorer.score(images[:0], [])
    with pytest.raises(InvalidTensorError, match="uint8"):
        scorer.score((images * 255).to(torch.uint8), ["a", "b"])
    if scorer.needs_prompt:
        with pytest.raises(ConfigError, match="empty prompt list"):
            scorer.score(images, [])
        with pytest.raises(ConfigError, match="3 prompts for 2 images"):
            scorer.score(images, ["a", "b", "c"])
        with pytest.raises(ConfigError, match="give one prompt"):
            scorer.score(images, None)
        with pytest.raises(ConfigError, match="3 timesteps for 2 images"):
            scorer.score(images, "a", torch.tensor([1, 2, 3]))
        with pytest.raises(ConfigError, match=r"\[0, 999\]"):
            scorer.score(images, "a", 1500)
    assert scorer.score(images, "one prompt for all").shape == (2,)


def test_scorers_make_no_network_calls(tiny_spm_file, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a scorer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    scorer = load_scorer("spm", tiny_spm_file)
    assert scorer.score(torch.rand(1, 3, 32, 32), "a cat", 100).shape == (1,)


def test_load_scorer_cache_reuses_and_reloads(tiny_spm_file):
    from spo_core.scorers import clear_scorer_cache

    a = load_scorer("spm", tiny_spm_file, cache=True)
    assert load_scorer("spm", str(tiny_spm_file), cache=True) is a
    assert load_scorer("spm", tiny_spm_file) is not a
    clear_scorer_cache()
    assert load_scorer("spm", tiny_spm_file, cache=True) is not a


PROMPTS = [
    "a photo of a cat",
    "A Red CIRCLE above a blue square, highly detailed",
    "Ünïcödé café — naïve façade 🍕🐈 日本語のテキスト",
    "  lots   of\twhitespace\n here ",
    "word " * 120,  # truncated to 77 tokens, end token kept
    "",
]


def test_tokenizer_ids_equal_open_clip_including_unicode_and_truncation():
    import open_clip

    from spo_core.clip_tokenizer import load_clip_tokenizer

    reference = open_clip.get_tokenizer("ViT-H-14")
    ours = load_clip_tokenizer(pad_token="!")  # open_clip pads with id 0 ("!")
    scorer_tok = SPMScorer(StepAwarePreferenceModel.identity(tiny_clip_config())).input_ids
    for prompt in PROMPTS:
        ref = reference([prompt])[0].tolist()
        assert ours(prompt, padding="max_length", truncation=True, max_length=77).input_ids == ref, prompt
        # the SPM pads with the end token (49407) like PickScore's processor; ids up to the first end token agree
        mine = scorer_tok([prompt])[0].tolist()
        end = ref.index(49407)
        assert len(mine) == 77 and mine[: end + 1] == ref[: end + 1] and set(mine[end:]) == {49407}


# ---------------------------------------------------------------- CLI


def _png(path, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_spo_score_prints_a_table_and_json(tmp_path, tiny_spm_file, capsys):
    from spo_core.cli import main

    imgs = [_png(tmp_path / "a.png", 0), _png(tmp_path / "b.png", 1), _png(tmp_path / "c.png", 2, size=(64, 64))]
    assert main(["score", "--scorer", "spm", "--weights", str(tiny_spm_file), "--prompt", "a cat", "--timestep", "501", *imgs]) == 0
    out = capsys.readouterr().out
    assert "spm (t=501)" in out and all(n in out for n in ("a.png", "b.png", "c.png"))
    assert main(["score", "--scorer", "jpeg_incompressibility", "--json", *imgs]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = [ddpo_jpeg_size_kb(torch.from_numpy(np.asarray(Image.open(p)).copy()).permute(2, 0, 1)[None].float() / 255)[0] for p in imgs]
    assert [data["scores"][p] for p in imgs] == pytest.approx(expected)
    # the CLI batches images of one size; scores equal scoring each alone
    scorer = load_scorer("spm", tiny_spm_file)
    from spo_core.cli.score_cmd import load_image, score_files

    alone = [scorer.score(load_image(p)[None], "a cat", 501).item() for p in imgs]
    assert score_files(scorer, imgs, "a cat", 501, batch_size=2) == pytest.approx(alone, abs=1e-5)


def test_spo_score_errors(tmp_path, capsys):
    from spo_core.cli import main

    img = _png(tmp_path / "a.png", 0)
    rc = main(["score", "--scorer", "spm", "--weights", str(tmp_path / "sd-v1-5_step-aware_preference_model.bin"),
               "--prompt", "x", img])
    assert rc != 0
    assert "Step-Aware_Preference_Models" in capsys.readouterr().err


def test_spo_scorer_convert_and_list(tmp_path, capsys):
    from spo_core.cli import main

    model = StepAwarePreferenceModel.identity(tiny_clip_config(image_size=32), seed=1)
    save_spm(model, tmp_path / "spm.bin")
    assert main(["scorer", "convert", str(tmp_path / "spm.bin"), str(tmp_path / "spm.safetensors"), "--dtype", "fp16"]) == 0
    assert "wrote" in capsys.readouterr().out
    from spo_core.safe_io import read_safetensors_header

    header, meta = read_safetensors_header(tmp_path / "spm.safetensors")
    assert {v["dtype"] for v in header.values()} == {"F16"} and meta["spo.source"] == "spm.bin"
    rc = main(["scorer", "convert", str(tmp_path / "spm.bin"), str(tmp_path / "spm.safetensors")])
    assert rc != 0 and "exists" in capsys.readouterr().err
    images = torch.rand(2, 3, 32, 32)
    a = load_scorer("spm", tmp_path / "spm.safetensors", dtype="fp16").score(images, "a", 10)
    b = load_scorer("spm", tmp_path / "spm.bin", dtype=torch.float16).score(images, "a", 10)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert main(["scorer", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SCORERS)
