"""The offline CLIP tokenizer against open_clip's own tokenizer."""

import pytest

from spo_core.clip_tokenizer import VOCAB_SIZE, load_clip_tokenizer
from spo_core.errors import FileMissingError

PROMPTS = [
    "a photo of a cat",
    "A Red CIRCLE above a blue square, highly detailed",
    "Ünïcödé café — naïve façade 🍕🐈 日本語のテキスト",
    "  lots   of\twhitespace\n here ",
    "word " * 120,  # truncated to 77 tokens, end token kept
    "",
]


def test_ids_equal_open_clip_including_unicode_and_truncation():
    import open_clip

    reference = open_clip.get_tokenizer("ViT-H-14")
    ours = load_clip_tokenizer(pad_token="!")  # open_clip pads with id 0, which is "!"
    for prompt in PROMPTS:
        ids = ours(prompt, padding="max_length", truncation=True, max_length=77).input_ids
        assert ids == reference([prompt])[0].tolist(), prompt
    assert len(ours) == VOCAB_SIZE


def test_eos_padding_for_sd_and_pickscore():
    tok = load_clip_tokenizer()
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and set(ids[7:]) == {49407}


def test_tokenizer_folder_and_missing_folder(tmp_path):
    from spo_core.clip_tokenizer import tokenizer_files

    folder = tokenizer_files()
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    again = load_clip_tokenizer(folder)
    assert again("a cat").input_ids == load_clip_tokenizer()("a cat").input_ids
    with pytest.raises(FileMissingError):
        load_clip_tokenizer(tmp_path / "nope")


def test_a_hosts_tokenizer_folder_is_used_when_open_clip_is_absent(tmp_path, monkeypatch):
    """ComfyUI registers its comfy/sd1_tokenizer: without open_clip the scorers still tokenize, identically."""
    import shutil

    from spo_core import clip_tokenizer as ct

    ours = ct.load_clip_tokenizer()
    host = tmp_path / "sd1_tokenizer"
    host.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ct.tokenizer_files() / name, host / name)

    def absent():
        raise ct.FileMissingError("no open_clip here")

    monkeypatch.setattr(ct, "find_bpe_file", absent)
    monkeypatch.setattr(ct, "FALLBACK_FOLDERS", [])
    ct.tokenizer_files.cache_clear()
    try:
        with pytest.raises(ct.FileMissingError):
            ct.tokenizer_files()
        ct.register_tokenizer_folder(host)
        assert ct.tokenizer_files() == host
        theirs = ct.load_clip_tokenizer()
        for text in ("a red circle above a blue square", "A photo of a cat, 4k, (masterpiece)"):
            assert theirs(text).input_ids == ours(text).input_ids
    finally:
        ct.tokenizer_files.cache_clear()
