"""`spo score`: score image files with any scorer and print a table (or JSON)."""

from __future__ import annotations

import argparse

from .common import add_scorer_weights, default_world_scorer


def register(sub) -> None:
    p = sub.add_parser("score", help="score images with a scorer (spm, pickscore, hpsv2, aesthetic, clip, jpeg_*)",
                       description="Score image files with one scorer; nothing is downloaded (see `spo scorer list`).")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, WebP ...)")
    p.add_argument("--scorer", help="spm, lrm, pickscore, hpsv2, aesthetic, clip, jpeg_compressibility, "
                                    "jpeg_incompressibility")
    add_scorer_weights(p, "the scorer's weights file or folder (see `spo scorer list`); 'world': the world's SPM or LRM")
    p.add_argument("--model", help="'world': score with the embedded world's SPM (or its LRM with --scorer lrm) unless "
                                   "--scorer-weights is given. lrm: the model (diffusers folder or checkpoint) whose VAE "
                                   "encodes the images into the latents it scores")
    p.add_argument("--prompt", help="the prompt the images were made for (prompt-aware scorers)")
    p.add_argument("--timestep", type=float, default=0,
                   help="DDPM timestep 0..999 of the images for step-aware scorers (0 = final image; default 0)")
    p.add_argument("--clip", help="aesthetic: the CLIP ViT-L/14 folder or file, if not in the --scorer-weights folder")
    p.add_argument("--model-name", help="open_clip architecture of a CLIP/HPS file (e.g. ViT-H-14)")
    p.add_argument("--scale", type=float, help="clip: the score is scale * max(cos, 0) (default 100)")
    p.add_argument("--tokenizer", help="a CLIP tokenizer folder (vocab.json + merges.txt) instead of the bundled one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_score)


def load_image(path: str):
    """An image file -> [3,H,W] float in [0,1]."""
    import numpy as np
    import torch
    from PIL import Image

    from ..errors import CorruptFileError
    from ..safe_io import check_exists

    check_exists(path, "image")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB")).copy()
    except OSError as exc:
        raise CorruptFileError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


def score_files(scorer, paths: list[str], prompt: str | None, timestep: float, batch_size: int = 8,
                encode=None) -> list[float]:
    """Scores in the order of `paths`; images of one size are batched together. `encode`: images ->
    latents, for a latent scorer (the model's VAE)."""
    import torch

    images = [load_image(p) for p in paths]
    scores: list[float] = [0.0] * len(paths)
    by_size: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(tuple(img.shape), []).append(i)
    for idx in by_size.values():
        for start in range(0, len(idx), max(1, batch_size)):
            chunk = idx[start: start + batch_size]
            batch = torch.stack([images[i] for i in chunk])
            out = scorer.score(encode(batch) if encode else batch, prompt, timestep)
            for i, s in zip(chunk, out.cpu().tolist()):
                scores[i] = s
    return scores


def _score(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..scorers import load_scorer

    from ..errors import ConfigError

    args.scorer, args.scorer_weights = default_world_scorer(args.model, args.scorer, args.scorer_weights)
    if not args.scorer:
        raise ConfigError("name the scorer: --scorer NAME (see `spo scorer list`), or --model world for the world's SPM")
    options = {k: v for k, v in (("clip", args.clip), ("model_name", args.model_name), ("scale", args.scale),
                                 ("tokenizer_path", args.tokenizer)) if v is not None}
    scorer = load_scorer(args.scorer, args.scorer_weights, device=args.device, dtype=args.dtype, **options)
    encode = latent_encoder(scorer, args.model, args.device) if scorer.input_kind == "latent" else None
    scores = score_files(scorer, args.images, args.prompt, args.timestep, args.batch_size, encode)
    if args.json:
        print(json.dumps({"scorer": args.scorer, "prompt": args.prompt, "timestep": args.timestep,
                          "scores": dict(zip(args.images, scores))}, indent=2))
        return 0
    rows = sorted(zip(args.images, scores), key=lambda r: -r[1])
    width = max(len(Path(p).name) for p in args.images) + 2
    title = args.scorer + (f" (t={args.timestep:g})" if scorer.step_aware else "")
    print(f"{'rank':<6}{'image':<{width}}{title}")
    for i, (path, s) in enumerate(rows, 1):
        print(f"{i:<6}{Path(path).name:<{width}}{s:.4f}")
    return 0


def latent_encoder(scorer, model: str | None, device: str):
    """Images -> the model's latents (its VAE's mean), for a latent scorer; the scorer must fit the model."""
    from ..errors import ConfigError
    from ..model_names import is_world

    if not model:
        raise ConfigError(f"the {scorer.name} scorer scores latents, not pixels: give --model (the model whose VAE "
                          "encodes the images: a diffusers folder or checkpoint, or world)")
    if is_world(model):
        from ..world import load_world_backend

        backend = load_world_backend(device)
    else:
        from ..backends import DiffusersBackend

        backend = DiffusersBackend.from_pretrained(model, device=device)
    from ..scorers.lrm import check_latent_scorer_fits

    table = backend.module_table()
    check_latent_scorer_fits(scorer, table.family, table.cross_attention_dim, f"the model ({backend.arch})")

    def encode(images):
        f = backend.vae_scale_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ConfigError(f"images must be a multiple of {f} pixels on each side to be encoded, got "
                              f"{images.shape[-1]}x{images.shape[-2]}")
        return backend.encode_images(images)

    return encode
