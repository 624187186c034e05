"""`spo lora ...`: inspect, convert, extract, merge, resize."""

from __future__ import annotations

import argparse
import json

from ..lora.tables import ALL_ARCHS

TO_FORMATS = ["webui", "kohya", "comfy", "diffusers", "peft"]


def register(sub) -> None:
    p = sub.add_parser("lora", help="inspect, convert, extract, merge and resize LoRAs",
                       description="LoRA tools: any format in, webui/comfy/diffusers/peft out. "
                                   f"Architectures: {', '.join(ALL_ARCHS)} (Flux/SD3: the transformer only).")
    verbs = p.add_subparsers(dest="lora_verb", metavar="ACTION")
    verbs.required = True

    i = verbs.add_parser("inspect", help="show format, base model, ranks, modules per block, unmatched keys")
    i.add_argument("file", help="LoRA file (.safetensors/.bin/.pt) or PEFT folder")
    i.add_argument("--arch", choices=ALL_ARCHS, help="force the base architecture")
    i.add_argument("--model", help="check the LoRA against this model instead of the SD tables: a diffusers folder "
                   "or single-file checkpoint, or 'world' (the embedded tiny model)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(handler=_inspect)

    c = verbs.add_parser("convert", help="convert between webui/kohya, comfy, diffusers and PEFT")
    c.add_argument("input")
    c.add_argument("output", help="output file (.safetensors); a folder for --to peft")
    c.add_argument("--to", dest="fmt", default="webui", choices=TO_FORMATS)
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="tensor dtype of the output (default: as read)")
    c.add_argument("--arch", choices=ALL_ARCHS, help="force the base architecture")
    c.add_argument("--allow-partial", action="store_true", help="write even if some keys match no module (they are listed)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(handler=_convert)

    e = verbs.add_parser("extract", help="extract a LoRA from a fine-tuned checkpoint against its base")
    e.add_argument("--base", required=True, help="base model: diffusers folder or single-file checkpoint")
    e.add_argument("--tuned", required=True, help="fine-tuned model, same architecture")
    g = e.add_argument_group("rank (give --rank, --energy, or both: the rank then caps the energy choice)")
    g.add_argument("--rank", type=int, help="fixed rank per layer")
    g.add_argument("--energy", type=float, help="per-layer rank keeping this fraction of the difference's energy (e.g. 0.9)")
    e.add_argument("--svd", choices=["randomized", "full"], default="randomized")
    e.add_argument("--groups", default="attn,ff,proj", help="layer groups: attn,ff,proj,resnet,conv,embed "
                   "(UNet); attn,ff,proj,mod,embed (Flux/SD3 transformer)")
    e.add_argument("--conv-rank", type=int, help="also extract 3x3 convs (resnets, samplers) at this rank")
    e.add_argument("--text-encoder", choices=["auto", "yes", "no"], default="auto",
                   help="include text encoders (auto: only if they differ)")
    e.add_argument("--min-diff", type=float, default=1e-6, help="skip layers whose max |diff| is at most this")
    e.add_argument("--device", default="cpu", help="device for the SVDs (cuda is much faster)")
    e.add_argument("--to", dest="fmt", default="webui", choices=TO_FORMATS)
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--report", metavar="JSON", help="also write the per-layer report as JSON")
    e.add_argument("output")
    e.set_defaults(handler=_extract)

    m = verbs.add_parser("merge", help="merge a LoRA into a checkpoint (diffusers folder or single file)")
    m.add_argument("--checkpoint", required=True)
    m.add_argument("--lora", required=True)
    m.add_argument("--strength", type=float, default=1.0)
    m.add_argument("--allow-partial", action="store_true")
    m.add_argument("--only", metavar="COMPONENTS", help="merge only these components of the LoRA, comma-separated: "
                   "unet, transformer, te1 (CLIP-L), te2 (CLIP-G), te3 (T5-XXL); e.g. a Flux LoRA's transformer "
                   "part into a transformer-only checkpoint")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("output")
    m.set_defaults(handler=_merge)

    r = verbs.add_parser("resize", help="change a LoRA's rank by SVD")
    r.add_argument("input")
    r.add_argument("output")
    r.add_argument("--rank", type=int, help="new rank (or cap with --energy)")
    r.add_argument("--energy", type=float, help="per-module rank keeping this fraction of each delta's energy")
    r.add_argument("--to", dest="fmt", default="webui", choices=TO_FORMATS)
    r.add_argument("--dtype", choices=["fp32", "fp16", "bf16"])
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(handler=_resize)


def _inspect(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..lora import read_lora, report

    arch = args.arch
    if args.model:
        if args.arch:
            raise ConfigError("give --arch or --model, not both")
        arch = _model_table(args.model)
    lora = read_lora(args.file, arch=arch)
    rep = report(lora, args.file)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep.to_text())
    return 0 if rep.ok else 1


def _model_table(model: str):
    """The LoRA module table of a model the user names (its real module names and shapes)."""
    if model == "world":
        from ..world import load_world_backend

        return load_world_backend().module_table()
    if _is_flow_model(model):
        from ..lora import CheckpointReader

        with CheckpointReader(model) as reader:
            return reader.table
    from ..backends import DiffusersBackend

    return DiffusersBackend.from_pretrained(model).module_table()


def _is_flow_model(model: str) -> bool:
    """A Flux/SD3 model (diffusers folder with transformer/, or a transformer single file): read by
    the LoRA engine itself, since the SD backend cannot load it."""
    from pathlib import Path

    from ..model_names import resolve_model
    from ..safe_io import is_safetensors, read_safetensors_header

    path = Path(resolve_model(model)).expanduser()
    if path.is_dir():
        return (path / "transformer").is_dir() and not (path / "unet").is_dir()
    if not (path.is_file() and is_safetensors(path)):
        return False
    header, _ = read_safetensors_header(path)
    heads = ("double_blocks.", "single_blocks.", "joint_blocks.", "transformer_blocks.", "single_transformer_blocks.")
    return any(k.split("diffusion_model.", 1)[-1].startswith(heads) for k in header)


def _convert(args: argparse.Namespace) -> int:
    import time

    from ..lora import convert_lora

    start = time.perf_counter()
    lora, rep = convert_lora(args.input, args.output, fmt=args.fmt, dtype=args.dtype, overwrite=args.overwrite,
                             arch=args.arch, allow_partial=args.allow_partial)
    print(rep.summary_line())
    if rep.unmatched:
        print(f"warning: {len(rep.unmatched)} keys were not converted: " + ", ".join(rep.unmatched[:8]))
    print(f"wrote {args.output} ({args.fmt}) in {time.perf_counter() - start:.2f} s")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from ..lora import CheckpointReader, extract_lora, save_lora
    from ..progress import TqdmProgress
    from ..safe_io import check_output_path

    check_output_path(args.output, [args.base, args.tuned], folder=args.fmt == "peft")
    if args.report:
        check_output_path(args.report, [args.base, args.tuned, args.output])
    te = {"auto": "auto", "yes": True, "no": False}[args.text_encoder]
    bar = TqdmProgress()
    try:
        with CheckpointReader(args.base) as base, CheckpointReader(args.tuned) as tuned:
            lora, rep = extract_lora(base, tuned, rank=args.rank, energy=args.energy, groups=args.groups.split(","),
                                     text_encoders=te, conv_rank=args.conv_rank, method=args.svd, min_diff=args.min_diff,
                                     device=args.device, progress=bar)
    finally:
        bar.close()
    save_lora(lora, args.output, fmt=args.fmt, dtype=args.dtype, overwrite=args.overwrite)
    print(rep.to_text())
    if args.report:
        from ..safe_io import atomic_output

        with atomic_output(args.report, overwrite=True) as tmp:
            tmp.write_text(json.dumps(rep.to_dict(), indent=2))
    print(f"wrote {args.output}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ..lora import merge_into_checkpoint, read_lora
    from ..lora.merge import merged_output_path
    from ..progress import TqdmProgress
    from ..safe_io import check_output_path

    out = merged_output_path(args.checkpoint, args.output)
    check_output_path(out, [args.checkpoint, args.lora], folder=_is_dir(args.checkpoint))
    lora = read_lora(args.lora)
    lora.require_clean(allow_partial=args.allow_partial, what=args.lora)
    if args.only:
        lora = lora.only(c.strip() for c in args.only.split(",") if c.strip())
    bar = TqdmProgress()
    try:
        out = merge_into_checkpoint(args.checkpoint, lora, args.output, strength=args.strength, overwrite=args.overwrite,
                                    progress=bar, inputs=(args.lora,))
    finally:
        bar.close()
    renamed = "" if str(out) == args.output else " (a merged single file is always written as safetensors)"
    print(f"merged {len(lora.modules) + len(lora.diffs)} modules at strength {args.strength:g} into {out}{renamed}")
    return 0


def _resize(args: argparse.Namespace) -> int:
    from ..lora import read_lora, resize_lora, save_lora
    from ..safe_io import check_output_path

    check_output_path(args.output, [args.input], folder=args.fmt == "peft")
    lora = read_lora(args.input)
    lora.require_clean(what=args.input)
    new, retained = resize_lora(lora, rank=args.rank, energy=args.energy)
    save_lora(new, args.output, fmt=args.fmt, dtype=args.dtype, overwrite=args.overwrite)
    worst = min(retained.values()) if retained else 1.0
    mean = sum(retained.values()) / max(len(retained), 1)
    print(f"resized {len(retained)} modules to ranks {sorted(new.ranks())}; retained energy mean {mean:.4f}, worst {worst:.4f}")
    print(f"wrote {args.output}")
    return 0


def _is_dir(path: str) -> bool:
    from pathlib import Path

    from ..model_names import resolve_model

    return Path(resolve_model(path)).expanduser().is_dir()
