"""Training data: prompt lists, a resumable seeded sampling order, and offline preference pairs
(prompt, winner image, loser image) with their VAE latents encoded once and cached.

Prompt files: .txt (one prompt per line), .json (a list of strings, or of objects with a
`caption` / `prompt` / `text` field, as SPO's 4k_training_prompts.json), .jsonl (one string or
object per line). Pair sources: a JSONL/CSV/parquet file or a folder holding one, with columns
prompt (or caption) and winner/loser image paths (relative to the file) or image bytes; or
Pick-a-Pic style `jpg_0`, `jpg_1`, `label_0` (ties dropped); or a folder of sub-folders each
with `prompt.txt`, `win.*` and `lose.*`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ConfigError, CorruptFileError, FileMissingError, MissingDependencyError

log = logging.getLogger(__name__)

PROMPT_KEYS = ("caption", "prompt", "text")
WIN_KEYS = ("win", "winner", "image_w", "chosen", "jpg_w", "image_win", "win_image", "preferred")
LOSE_KEYS = ("lose", "loser", "image_l", "rejected", "jpg_l", "image_lose", "lose_image", "dispreferred")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# -- prompts ---------------------------------------------------------------------------------------


def _prompt_of(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in PROMPT_KEYS:
            if isinstance(item.get(key), str):
                return item[key]
    raise ConfigError(f"{where}: expected a prompt string or an object with a {'/'.join(PROMPT_KEYS)} field, got {item!r:.80}")


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a .txt, .json or .jsonl file (blank lines and empty prompts are skipped);
    `world`: the embedded world's training prompts."""
    from ..model_names import is_world

    if is_world(path):
        from ..world import train_prompts

        return list(train_prompts())
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileMissingError(f"prompt file not found: {p}")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                data = next((v for v in data.values() if isinstance(v, list)), None)
                if data is None:
                    raise ConfigError(f"{p}: a JSON prompt file must be a list (or an object holding one)")
            prompts = [_prompt_of(x, str(p)) for x in data]
        elif suffix == ".jsonl":
            prompts = [_prompt_of(json.loads(line), f"{p}:{i + 1}") for i, line in enumerate(text.splitlines()) if line.strip()]
        else:
            prompts = [line.strip() for line in text.splitlines()]
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{p} is not valid JSON: {exc}") from exc
    prompts = [s.strip() for s in prompts if s and s.strip()]
    if not prompts:
        raise ConfigError(f"{p} holds no prompts")
    return prompts


class IndexSampler:
    """An endless order over n items: a fresh seeded permutation per epoch, with a saved position.

    With several processes every process keeps the same order and takes its own strided share
    of each draw, so the processes see different items and the state is the same on all of them.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise ConfigError("nothing to sample from: the list is empty")
        self.n, self.seed, self.rank, self.world = n, int(seed), rank, world
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _next(self) -> int:
        if self.position >= self.n:
            self.epoch += 1
            self.position = 0
            self._perm = self._permutation(self.epoch)
        i = self._perm[self.position]
        self.position += 1
        return i

    def take(self, count: int) -> list[int]:
        """The next `count` indices for this process (count * world are consumed in total)."""
        draws = [self._next() for _ in range(count * self.world)]
        return draws[self.rank::self.world]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n:
            raise ConfigError(f"the data changed since the checkpoint: it had {state['n']} items, now {self.n}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


# -- preference pairs -------------------------------------------------------------------------------


@dataclass
class PairRecord:
    prompt: str
    win: str | bytes  # a path or encoded image bytes
    lose: str | bytes


def _pick(row: dict, keys: Sequence[str]):
    for k in keys:
        if k in row and row[k] not in (None, ""):
            return row[k]
    return None


def _rows_to_pairs(rows: list[dict], base: Path, where: str) -> list[PairRecord]:
    out = []
    for i, row in enumerate(rows):
        prompt = _pick(row, PROMPT_KEYS)
        if "label_0" in row and "jpg_0" in row:  # Pick-a-Pic
            label = float(row["label_0"])
            if label not in (0.0, 1.0):
                continue  # tie
            win, lose = (row["jpg_0"], row["jpg_1"]) if label == 1.0 else (row["jpg_1"], row["jpg_0"])
        else:
            win, lose = _pick(row, WIN_KEYS), _pick(row, LOSE_KEYS)
        if not isinstance(prompt, str) or win is None or lose is None:
            raise ConfigError(
                f"{where}, row {i + 1}: needs a prompt ({'/'.join(PROMPT_KEYS)}) and winner/loser images "
                f"({'/'.join(WIN_KEYS[:4])} and {'/'.join(LOSE_KEYS[:4])}); found columns {', '.join(map(str, row))}"
            )
        out.append(PairRecord(prompt, _resolve_image(win, base), _resolve_image(lose, base)))
    return out


def _resolve_image(v, base: Path):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, dict) and "bytes" in v:  # datasets' Image feature
        return bytes(v["bytes"])
    p = Path(str(v)).expanduser()
    return str(p if p.is_absolute() else base / p)


def load_pairs(source: str | os.PathLike) -> list[PairRecord]:
    """Preference pairs from a folder or a JSONL/CSV/parquet file (see the module docstring)."""
    p = Path(source).expanduser()
    if not p.exists():
        raise FileMissingError(f"pair data not found: {p}")
    if p.is_dir():
        for name in ("pairs.jsonl", "metadata.jsonl", "pairs.csv", "metadata.csv", "pairs.parquet", "metadata.parquet"):
            if (p / name).is_file():
                return load_pairs(p / name)
        tables = sorted(q for q in p.iterdir() if q.suffix.lower() in (".jsonl", ".csv", ".parquet"))
        if len(tables) == 1:
            return load_pairs(tables[0])
        pairs = []
        for sub in sorted(q for q in p.iterdir() if q.is_dir()):
            win = _find_image(sub, "win")
            lose = _find_image(sub, "lose")
            prompt_file = sub / "prompt.txt"
            if win and lose and prompt_file.is_file():
                pairs.append(PairRecord(prompt_file.read_text(encoding="utf-8").strip(), str(win), str(lose)))
        if not pairs:
            raise ConfigError(
                f"{p} holds no pairs: put a pairs.jsonl/.csv/.parquet in it, or sub-folders each with prompt.txt, "
                "win.png and lose.png")
        return pairs
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CorruptFileError(f"{p}:{i + 1} is not valid JSON: {exc}") from exc
    elif suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix == ".parquet":
        try:
            import pandas as pd

            rows = pd.read_parquet(p).to_dict("records")
        except ImportError as exc:
            raise MissingDependencyError(f"reading {p.name} needs pandas with pyarrow: pip install pyarrow ({exc})") from exc
    else:
        raise ConfigError(f"unsupported pair file {p.name}: use .jsonl, .csv or .parquet (or a folder)")
    pairs = _rows_to_pairs(rows, p.parent, str(p))
    if not pairs:
        raise ConfigError(f"{p} holds no usable pairs (ties are dropped)")
    return pairs


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        q = folder / f"{stem}{suffix}"
        if q.is_file():
            return q
    return None


def load_image(src: str | bytes, height: int, width: int) -> torch.Tensor:
    """An image as float [3,H,W] in [0,1], resized (shorter side) and center-cropped to H x W."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        img = img.convert("RGB")
    except FileNotFoundError as exc:
        raise FileMissingError(f"pair image not found: {src}") from exc
    except OSError as exc:
        raise CorruptFileError(f"cannot read pair image {src if isinstance(src, str) else '<bytes>'}: {exc}") from exc
    w0, h0 = img.size
    scale = max(width / w0, height / h0)
    nw, nh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    img = img.crop((left, top, left + width, top + height))
    import numpy as np

    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float() / 255.0


class LatentPairs:
    """Pairs with their winner/loser latents, encoded once (batched) and cached in a safetensors file."""

    def __init__(self, prompts: list[str], win: torch.Tensor, lose: torch.Tensor):
        self.prompts, self.win, self.lose = prompts, win, lose

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def build(cls, pairs: list[PairRecord], encode: Callable[[torch.Tensor], torch.Tensor], height: int, width: int,
              cache_dir: str | os.PathLike | None = None, model_key: str = "", batch_size: int = 8,
              cancel: Callable[[], bool] | None = None) -> "LatentPairs":
        key = _cache_key(pairs, height, width, model_key)
        cache = Path(cache_dir) / f"latents-{key}.safetensors" if cache_dir else None
        prompts = [p.prompt for p in pairs]
        if cache is not None and cache.is_file():
            from ..safe_io import load_state_dict

            sd, _ = load_state_dict(cache)
            if sd["win"].shape[0] == len(pairs):
                log.info("using cached latents %s", cache)
                return cls(prompts, sd["win"], sd["lose"])
        wins, loses = [], []
        for start in range(0, len(pairs), batch_size):
            if cancel is not None and cancel():
                from ..errors import Cancelled

                raise Cancelled("encoding the pair images was cancelled")
            chunk = pairs[start:start + batch_size]
            images = torch.stack([load_image(p.win, height, width) for p in chunk] + [load_image(p.lose, height, width) for p in chunk])
            lat = encode(images).float().cpu()
            wins.append(lat[:len(chunk)])
            loses.append(lat[len(chunk):])
        win, lose = torch.cat(wins), torch.cat(loses)
        if cache is not None:
            from ..safe_io import save_safetensors

            save_safetensors({"win": win, "lose": lose}, cache, {"pairs": str(len(pairs)), "size": f"{height}x{width}"},
                             overwrite=True)
        return cls(prompts, win, lose)


def _cache_key(pairs: list[PairRecord], height: int, width: int, model_key: str) -> str:
    h = hashlib.sha256(f"{height}x{width}|{model_key}|{len(pairs)}".encode())
    for p in pairs:
        h.update(p.prompt.encode("utf-8", "replace"))
        for src in (p.win, p.lose):
            if isinstance(src, bytes):
                h.update(hashlib.sha256(src).digest())
            else:
                st = Path(src).stat() if Path(src).exists() else None
                h.update(f"{src}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()[:16]
