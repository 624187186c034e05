"""`spo scorer ...`: list the scorers; convert SPO's step-aware preference model to safetensors."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("scorer", help="list scorers; convert SPO's preference model to safetensors")
    verbs = p.add_subparsers(dest="scorer_verb", metavar="ACTION")
    verbs.required = True
    ls = verbs.add_parser("list", help="every scorer, what it needs and whether it is step-aware")
    ls.set_defaults(handler=_list)
    c = verbs.add_parser("convert", help="SPM .bin (pickle, fp32, 5.22 GB) or an LPO latent reward model folder -> one "
                                         ".safetensors (fp16 by default, memory-mapped loads)",
                         description="Convert a step-aware preference model file, or an LPO latent reward model (a folder "
                                     "with unet/, text_encoder/ and state_dict.pt), to one safetensors file with its "
                                     "configuration in the metadata. SPM keys stay as released; the LRM drops the UNet's "
                                     "up blocks, which it never uses.")
    c.add_argument("input", help="sd-v1-5_step-aware_preference_model.bin, sdxl_step-aware_preference_model.bin, any SPM "
                                 "file, or an LRM folder")
    c.add_argument("output", help="the .safetensors file to write")
    c.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(handler=_convert)


def _list(args: argparse.Namespace) -> int:
    from ..scorers import available_scorers

    for s in available_scorers():
        flags = ", ".join(f for f, on in (("step-aware", s.step_aware), ("differentiable", s.differentiable),
                                          ("needs a prompt", s.needs_prompt)) if on) or "-"
        print(f"{s.name:<24}{s.description}\n{'':<24}[{flags}]\n{'':<24}weights: {s.weights_hint}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ..scorers import convert_spm_file, resolve_dtype
    from ..scorers.lrm_files import convert_lrm, is_lrm_source

    start = time.perf_counter()
    convert = convert_lrm if is_lrm_source(Path(args.input)) else convert_spm_file
    out = convert(args.input, args.output, dtype=resolve_dtype(args.dtype), overwrite=args.overwrite)
    size = Path(out).stat().st_size / 1e9
    print(f"wrote {out} ({size:.2f} GB, {args.dtype}) in {time.perf_counter() - start:.1f} s")
    return 0
