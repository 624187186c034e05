"""`spo sample`: sample a local diffusers model with the per-step resampler (or plainly, or best-of-N)."""

from __future__ import annotations

import argparse

from .common import add_no_progress, add_scorer_weights, alias, default_world_scorer


def register(sub) -> None:
    p = sub.add_parser(
        "sample", help="sample with the per-step resampler (k candidates per step, scored, one kept)",
        description="Text to image on a local SD1.5/SD2/SDXL model with SPO's stochastic DDIM sampler. With --k > 1, "
        "every step inside the window draws k candidates from the same x_t, scores their predicted x0 and keeps one "
        "(greedy: the best; softmax: Feynman-Kac-style; random: SPO's continuation). --best-of N is the baseline: N "
        "full samples, the best final image kept.")
    p.add_argument("--model", required=True, help="diffusers folder (SD1.5/SD2/SDXL, SD3/SD3.5, Flux) or single-file "
                   "checkpoint (SD1.5/SD2/SDXL; SD3/SD3.5/Flux with --text-encoders and --vae where the file lacks "
                   "them); 'world': the embedded tiny model, 'world-flow' its rectified-flow model (the world's SPM is "
                   "then the default scorer)")
    files = p.add_argument_group("SD3 / Flux single files (what ComfyUI and Forge users keep)")
    files.add_argument("--text-encoders", dest="text_encoders", action="append", default=[], metavar="FILE[,FILE]",
                       help="the model's text encoders in transformers' layout: clip_l, clip_g (SD3), t5xxl "
                       "(fp16 or fp8) .safetensors; any order. SD3 files that carry them need none")
    files.add_argument("--vae", help="the VAE file when the model file has none (Flux: ae.safetensors)")
    files.add_argument("--t5-tokenizer", dest="t5_tokenizer", metavar="DIR",
                       help="a local T5 tokenizer folder (an SD3.5 download's tokenizer_3, a Flux one's tokenizer_2, or "
                       "ComfyUI's comfy/text_encoders/t5_tokenizer); default: the hub's google/t5-v1_1-xxl")
    files.add_argument("--config", metavar="DIR", help="a diffusers folder of the model (configs only) when it is "
                       "not SD3.5 medium/large or Flux.1 dev/schnell, whose configs are shipped")
    p.add_argument("--arch", help="architecture of a single-file checkpoint (sd15, sd2, sdxl); detected if omitted")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", dest="negative_prompt", default=None, help="negative prompt")
    alias(p, "--negative", dest="negative_prompt")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help="merge a LoRA first (any format)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (SPO: 20, t = 951, 901, ..., 1)")
    p.add_argument("--guidance-scale", dest="guidance_scale", type=float, default=5.0, help="CFG scale (SPO uses 5)")
    alias(p, "--cfg", dest="guidance_scale", type=float)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (flow models: the RF ancestral eta, or the SDE/CPS "
                   "noise level); > 0 so that candidates differ (SPO: 1)")
    p.add_argument("--flow-step", dest="flow_step", choices=["rf_ancestral", "sde", "cps", "euler"], default="rf_ancestral",
                   help="rectified-flow models (SD3/SD3.5/Flux folders): the step; rf_ancestral is ComfyUI's euler_ancestral, "
                   "sde Flow-GRPO's, cps coefficients-preserving, euler deterministic (k = 1 only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images (one batch, same prompt)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--k", type=int, default=4, help="candidates per step (1 = plain sampling)")
    p.add_argument("--policy", choices=["greedy", "softmax", "random", "fk"], default="greedy",
                   help="greedy/softmax/random: one chain, k candidates per pooled step; fk: Feynman-Kac steering, "
                        "a population of --particles particles resampled by their rewards")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax policy: temperature (1/lambda)")
    fk = p.add_argument_group("fk (Feynman-Kac particles)")
    fk.add_argument("--particles", type=int, help="particles per prompt (sets --policy fk and --k)")
    fk.add_argument("--potential", choices=["max", "diff", "add", "rt"], default="max", help="the potential of the rewards")
    fk.add_argument("--lam", type=float, default=10.0, help="lambda: how strongly rewards weigh (> 0)")
    fk.add_argument("--resample-every", type=int, help="resample every n-th step inside the window (default 5); always at the last step")
    fk.add_argument("--adaptive", action="store_true", help="resample only when the effective sample size < N/2")
    p.add_argument("--window", help="parent timesteps where pools are drawn, LO:HI (default 0:751, SPO's; fk: 0:999)")
    p.add_argument("--score-every", type=int, default=1, help="pool every n-th step inside the window")
    p.add_argument("--inner-steps", type=int, default=0, help="multi-step segments: j steps per candidate before scoring")
    p.add_argument("--best-of", type=int, default=0, metavar="N", help="baseline: best of N full samples instead")
    p.add_argument("--scorer", help="scorer name (see `spo scorer list`); needed with --k > 1 or --best-of")
    add_scorer_weights(p)
    p.add_argument("--clip", help="aesthetic scorer: CLIP ViT-L/14 folder")
    p.add_argument("--decoder", default="vae",
                   help="how candidates are decoded for scoring: vae (full VAE), rgb (near-free linear approximation) "
                        "or a local TAESD folder; the final image always uses the full VAE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--out", default="spo_sample.png", help="output image (several images get _0, _1 ... suffixes)")
    p.add_argument("--trace", metavar="PNG", help="also write the candidate grid (what was chosen at each step)")
    p.add_argument("--overwrite", action="store_true")
    add_no_progress(p)
    p.set_defaults(handler=_sample)


def parse_window(text: str) -> tuple[float, float]:
    from ..errors import ConfigError

    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--window must be LO:HI timesteps (e.g. 0:751), got {text!r}") from None
    return lo, hi


def save_images(images, out: str, overwrite: bool) -> list[str]:
    """[B,3,H,W] in [0,1] -> PNG files written atomically."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from ..safe_io import atomic_output

    paths = []
    base = Path(out)
    for i, img in enumerate(images):
        path = base if len(images) == 1 else base.with_name(f"{base.stem}_{i}{base.suffix or '.png'}")
        arr = (img.detach().float().clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8).transpose(1, 2, 0)
        with atomic_output(path, overwrite=overwrite, suffix=".png") as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
        paths.append(str(path))
    return paths


def _sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import ConfigError, OutputExistsError
    from ..progress import TqdmProgress
    from ..sampling import ResamplerConfig, default_window

    args.scorer, args.scorer_weights = default_world_scorer(args.model, args.scorer, args.scorer_weights)
    if args.particles is not None:
        args.policy, args.k = "fk", args.particles
    if args.policy == "fk" and args.k < 2:
        raise ConfigError(f"FK steering with {args.k} particle is plain sampling: use --particles 2 or more, or --k 1 "
                          "without --policy fk")
    fk = args.policy == "fk"
    window = parse_window(args.window) if args.window else default_window(args.policy)
    if args.k < 1:
        raise ConfigError(f"--k must be at least 1, got {args.k}")
    pooled = args.k > 1 or args.best_of > 1
    config = ResamplerConfig(k=args.k if args.best_of <= 1 else 1, policy=args.policy if args.best_of <= 1 else "greedy",
                             eta=args.eta, temperature=args.temperature, window=window,
                             score_every=(args.resample_every or 5) if fk else args.score_every,
                             inner_steps=args.inner_steps, keep_images=bool(args.trace), potential=args.potential,
                             lam=args.lam, adaptive=args.adaptive)
    config.validate()  # eta = 0 with k > 1 and the like: say so before loading the model
    if args.num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {args.num_images}")
    if pooled and not args.scorer:
        from ..scorers import available_scorers

        names = ", ".join(info.name for info in available_scorers())
        raise ConfigError(f"--k {args.k} / --best-of need a scorer to rank candidates: --scorer NAME (one of {names}) "
                          "and --scorer-weights PATH where it needs weights; or --k 1 for plain sampling")
    for path in filter(None, [args.out, args.trace]):  # fail before minutes of sampling, not after
        if Path(path).exists() and not args.overwrite:
            raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    if args.trace and not (args.k > 1 and args.best_of <= 1):
        raise ConfigError("--trace shows the per-step candidates: it needs --k > 1 (and no --best-of)")

    backend = load_sampling_backend(args)
    for spec in args.lora:
        _merge_lora(backend, spec)
    scorer = None
    if pooled:
        from ..scorers import load_scorer  # lazily: the scorers package is only needed here

        options = {"clip": args.clip} if args.clip else {}
        scorer = load_scorer(args.scorer, args.scorer_weights, device=args.device, **options)
    bar = TqdmProgress(disable=args.no_progress)
    try:
        out = backend.sample([args.prompt] * args.num_images, args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                             eta=args.eta, height=args.height, width=args.width, seed=args.seed, scorer=scorer,
                             decode=args.decoder, config=config, best_of=args.best_of if args.best_of > 1 else 0,
                             progress=bar)
    finally:
        bar.close()
    paths = save_images(out.images, args.out, args.overwrite)
    res = out.result
    steps = len(out.sigmas) - 1
    if args.best_of > 1:
        how = f"best of {args.best_of} full samples per image"
    elif args.policy == "fk":
        st = res.particle_stats
        resampled = sum(int(e.resampled.sum()) for e in st.events)
        how = (f"FK steering with {args.k} particles ({args.potential}, lambda {args.lam:g}): {len(st.events)} weighting "
               f"steps, {resampled} resamplings" + (f", {st.nan_rewards} NaN rewards weighted 0" if st.nan_rewards else ""))
    elif args.k > 1:
        how = f"{res.pooled_steps} pooled with k = {args.k}"
    else:
        how = "plain sampling"
    per_image = args.num_images
    print(f"wrote {', '.join(paths)}: {steps} steps, {how}; per image: {res.evaluations / per_image:.0f} denoiser "
          f"evaluations ({res.evaluations / per_image / steps:.2f} per step), {res.decodes / per_image:.0f} decodes, "
          f"{res.scorer_rows / per_image:.0f} scorer rows")
    if args.trace:
        from ..safe_io import atomic_output
        from ..sampling.trace import render_grid

        grid = render_grid(res, 0, title=args.prompt)
        with atomic_output(args.trace, overwrite=args.overwrite, suffix=".png") as tmp:
            grid.save(tmp, format="PNG")
        print(f"wrote the candidate grid to {args.trace}")
    return 0


def load_sampling_backend(args: argparse.Namespace):
    """A DiffusersBackend for SD1.5/SD2/SDXL, a FlowBackend for SD3/SD3.5/Flux folders (the flow step from --flow-step)."""
    from ..backends import DiffusersBackend
    from ..backends.flow_backend import is_flow_model_spec, load_flow_model
    from ..lora.write import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    if is_flow_model_spec(args.model):  # world-flow, SD3/SD3.5 and Flux folders and single files
        from ..backends.flow_files import FlowFiles

        files = FlowFiles([f.strip() for spec in args.text_encoders for f in spec.split(",") if f.strip()],
                          vae=args.vae, t5_tokenizer=args.t5_tokenizer, config=args.config)
        backend = load_flow_model(args.model, args.device, dtype, files=files)
        backend.schedule.step = args.flow_step
        return backend
    if args.flow_step != "rf_ancestral":
        from ..errors import ConfigError

        raise ConfigError(f"--flow-step {args.flow_step} is for rectified-flow models (SD3/SD3.5/Flux folders); "
                          f"{args.model} samples with DDIM(eta)")
    if args.text_encoders or args.vae or args.t5_tokenizer or args.config:
        from ..errors import ConfigError

        raise ConfigError(f"--text-encoders / --vae / --t5-tokenizer / --config are for SD3/SD3.5/Flux single files; "
                          f"{args.model} is not one")
    return DiffusersBackend.from_pretrained(args.model, arch=args.arch, device=args.device, dtype=dtype,
                                            loading_bars=not args.no_progress)


def flow_lora_targets(backend, family: str) -> dict:
    """A flow model's modules by LoRA component: its transformer and, for a diffusers pipeline, the
    text encoders under the pipeline attribute of each (Flux's T5 is `text_encoder_2`)."""
    from ..lora.naming import diffusers_folder
    from ..lora.tables import TE_FOLDERS

    targets = {"transformer": backend.transformer}
    pipe = getattr(backend, "pipe", None)
    if pipe is not None:
        for comp in TE_FOLDERS.get(family, {}).values():
            module = getattr(pipe, diffusers_folder(comp, family), None)
            if module is not None:
                targets[comp] = module
    return targets


def _merge_lora(backend, spec: str) -> None:
    from ..errors import ConfigError
    from ..lora import merge_into_modules, read_lora

    path, strength = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            path, strength = head, float(tail)
        except ValueError:
            pass  # a colon inside the path
    lora = read_lora(path, arch=backend.module_table())
    lora.require_clean(what=path)
    if getattr(backend, "is_flow", False):
        targets = flow_lora_targets(backend, lora.table.family)
        left = [c for c in lora.components() if c not in targets]
        if left:
            raise ConfigError(f"{path}: this model has no {', '.join(left)} to apply the LoRA's modules of that "
                              "component to (a pipeline loaded without that text encoder)")
        merge_into_modules(targets, lora, strength)
        return
    pipe = backend.pipe
    merge_into_modules({"unet": pipe.unet, "te1": pipe.text_encoder, "te2": getattr(pipe, "text_encoder_2", None)}, lora, strength)
