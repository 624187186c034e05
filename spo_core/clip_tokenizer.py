"""A CLIP BPE tokenizer built offline.

Every CLIP-family model the pack touches (the SD text encoders, PickScore, the step-aware
preference model, HPS) uses OpenAI's CLIP BPE vocabulary. open_clip's wheel ships that
vocabulary (`bpe_simple_vocab_16e6.txt.gz`); from it we write the `vocab.json` and
`merges.txt` that transformers' `CLIPTokenizer` reads (same algorithm as OpenAI's
`SimpleTokenizer`), so no tokenizer is ever downloaded. The files are found without
importing open_clip (which needs a working torchvision).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import os
from pathlib import Path

from .errors import FileMissingError, require

log = logging.getLogger(__name__)

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def find_bpe_file() -> Path:
    """Locate open_clip's bundled BPE vocabulary, or say how to get it."""
    env = os.environ.get("SPO_CLIP_BPE")
    if env and Path(env).is_file():
        return Path(env)
    spec = importlib.util.find_spec("open_clip")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        cand = Path(loc) / BPE_FILENAME
        if cand.is_file():
            return cand
    raise FileMissingError(
        f"the CLIP BPE vocabulary ({BPE_FILENAME}) was not found. Install open_clip_torch "
        f"(pip install open_clip_torch), set SPO_CLIP_BPE to the .txt.gz file, or pass a "
        f"tokenizer folder (vocab.json + merges.txt)."
    )


# tokenizer folders (vocab.json + merges.txt of the same CLIP BPE) a host ships, used when the BPE
# file is absent: ComfyUI registers its comfy/sd1_tokenizer
FALLBACK_FOLDERS: list[Path] = []


def register_tokenizer_folder(folder: str | os.PathLike) -> None:
    """A host's own CLIP tokenizer files, for installs without open_clip (same vocabulary)."""
    path = Path(folder)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file() and path not in FALLBACK_FOLDERS:
        FALLBACK_FOLDERS.append(path)
        tokenizer_files.cache_clear()


def bpe_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """Build the 49,408-entry vocabulary and the merge list from the BPE file."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _cache_dir() -> Path:
    base = os.environ.get("SPO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "spo_pack")
    return Path(base) / "clip_tokenizer"


@functools.lru_cache(maxsize=1)
def tokenizer_files() -> Path:
    """Folder holding vocab.json and merges.txt, written once from the bundled BPE file (or a
    host's own tokenizer folder when open_clip's file is absent)."""
    try:
        bpe = find_bpe_file()
    except FileMissingError:
        if FALLBACK_FOLDERS:
            log.info("open_clip's BPE file is absent: using the host's CLIP tokenizer in %s", FALLBACK_FOLDERS[0])
            return FALLBACK_FOLDERS[0]
        raise
    folder = _cache_dir()
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return folder
    vocab, merges = bpe_vocab_and_merges(bpe)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="spo_clip_tok_"))
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    for path, text in (
        (vocab_path, json.dumps(vocab, ensure_ascii=False)),
        (merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n"),
    ):
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    log.info("wrote CLIP tokenizer files to %s", folder)
    return folder


def load_clip_tokenizer(folder: str | os.PathLike | None = None, max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer from `folder` (vocab.json + merges.txt or tokenizer.json),
    or from open_clip's bundled vocabulary when no folder is given.

    Works on transformers 4.x (slow tokenizer from files) and 5.x. `pad_token` is
    "<|endoftext|>" for SD1.5's encoder and PickScore, "!" (id 0) for SDXL's second encoder
    and open_clip.
    """
    transformers = require("transformers", "the CLIP tokenizer", "scorers")
    if folder is None:
        folder = tokenizer_files()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileMissingError(f"tokenizer folder not found: {folder}")
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        raise FileMissingError(f"{folder} holds neither vocab.json + merges.txt nor tokenizer.json")
    kwargs = dict(model_max_length=max_length, pad_token=pad_token)
    if has_bpe:
        if int(transformers.__version__.split(".")[0]) < 5:
            return transformers.CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"), **kwargs)
        # transformers 5 builds CLIPTokenizer from the vocabulary and merges themselves
        with open(folder / "vocab.json", encoding="utf-8") as f:
            vocab = json.load(f)
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines if m and not m.startswith("#version")]
        return transformers.CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
