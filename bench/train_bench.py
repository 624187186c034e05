"""SPO pair-update cost: our shared-x_t evaluation vs a naive one, on a real-size random UNet.

One SPO pair update = the log-probabilities of a (winner, loser) pair of transitions from a
shared parent x_t under the policy (LoRA on, with grad) and the frozen reference (LoRA off),
SPO's loss, backward and an AdamW step. Ours evaluates the parent once per model (one policy
call, one reference call; CFG inside, so 2 UNet rows each); the naive version evaluates
policy and reference separately for the winner and the loser (4 calls, 2 with grad).

    python bench/train_bench.py                       # CPU, SD1.5-size UNet, 16x16 latents, ours vs naive
    python bench/train_bench.py --device cuda --dtype fp16 --gradient-checkpointing --arch sd15 --resolution 512
    python bench/train_bench.py --device cuda --dtype fp16 --gradient-checkpointing --arch sdxl --resolution 1024 --rank 64

Each mode runs in its own process so that its peak memory is its own (CPU: peak RSS minus the
RSS after loading the model; GPU: torch.cuda.max_memory_allocated). Results go to
bench/results/train_bench.json (merged with earlier runs, keyed by device/arch/resolution).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "train_bench.json"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(arch: str, device, dtype):
    """A diffusers backend around a real-size random UNet (tiny VAE and text encoders: never the bottleneck)."""
    import diffusers
    import torch
    import transformers

    from spo_core.backends import DiffusersBackend
    from spo_core.clip_tokenizer import load_clip_tokenizer
    from spo_core.testing import ddim_scheduler, real_unet, tiny_text_config, tiny_vae

    unet = real_unet(arch, device="cpu", dtype=dtype)
    tok = load_clip_tokenizer()
    if arch == "sdxl":
        te1 = transformers.CLIPTextModel(tiny_text_config(hidden=768, layers=1, projection_dim=768))
        te2 = transformers.CLIPTextModelWithProjection(tiny_text_config(hidden=1280, layers=1, projection_dim=1280))
        pipe = diffusers.StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                                   tokenizer_2=load_clip_tokenizer(pad_token="!"), unet=unet,
                                                   scheduler=ddim_scheduler())
    else:
        te = transformers.CLIPTextModel(tiny_text_config(hidden=768, layers=1, projection_dim=768))
        pipe = diffusers.StableDiffusionPipeline(vae=tiny_vae(), text_encoder=te, tokenizer=tok, unet=unet,
                                                 scheduler=ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.to(device=device, dtype=dtype)
    return DiffusersBackend(pipe, arch=arch)


def make_pairs(backend, n: int, latent: int, seed: int = 0):
    """n shared-parent pairs at SPO's t = 501 -> 451 transition (values do not change the cost)."""
    import torch

    from spo_core.sampling.step import ancestral_mean, ancestral_sigmas
    from spo_core.training.objectives import PairItem

    g = torch.Generator().manual_seed(seed)
    sched = backend.schedule
    s, s_next = float(sched.sigma(501)), float(sched.sigma(451))
    down, up = ancestral_sigmas(s, s_next, 1.0)
    items = []
    for i in range(n):
        x = torch.randn(4, latent, latent, generator=g) * s
        mean = ancestral_mean(x[None], torch.randn(1, 4, latent, latent, generator=g), s, float(down))[0]
        items.append(PairItem(x, None, mean + float(up) * torch.randn(x.shape, generator=g),
                              mean + float(up) * torch.randn(x.shape, generator=g), s, s_next, 1.0, 501.0, 1.0, 0.0, f"p{i}"))
    return items


def random_cond(backend, n: int, device, dtype, resolution: int):
    import torch

    from spo_core.sampling import TensorConditioning

    g = torch.Generator().manual_seed(1)
    ctx = backend.unet.config.cross_attention_dim
    t = {"cond": torch.randn(n, 77, ctx, generator=g), "uncond": torch.randn(n, 77, ctx, generator=g)}
    if backend.is_sdxl:
        cfg = backend.unet.config  # the added embedding takes the pooled text embedding and 6 time ids
        pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        t["pooled"] = torch.randn(n, pooled, generator=g)
        t["uncond_pooled"] = torch.randn(n, pooled, generator=g)
        t["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32).repeat(n, 1)
    return TensorConditioning({k: v.to(device=device, dtype=dtype) for k, v in t.items()})


def naive_log_probs(den, network, pairs, cond, device, autocast):
    """Policy and reference evaluated separately for the winner and the loser (4 calls, 2 with grad)."""
    import torch

    from spo_core.sampling.step import ancestral_mean, ancestral_sigmas, transition_log_prob

    x = torch.stack([p.x_t for p in pairs]).to(device)
    sigma = torch.tensor([p.sigma for p in pairs], device=device)
    down, up = ancestral_sigmas(pairs[0].sigma, pairs[0].sigma_next, 1.0)
    out = {}
    for member, children in (("w", [p.x_win for p in pairs]), ("l", [p.x_lose for p in pairs])):
        child = torch.stack(children).to(device)
        with torch.no_grad(), network.disabled(), autocast():
            x0_ref = den(x.clone(), sigma, cond)
        with autocast():
            x0 = den(x.clone(), sigma, cond)
        out[f"ref_logp_{member}"] = transition_log_prob(child, ancestral_mean(x, x0_ref.float(), sigma, float(down)), float(up))
        out[f"logp_{member}"] = transition_log_prob(child, ancestral_mean(x, x0.float(), sigma, float(down)), float(up))
    return out


def run_mode(args) -> dict:
    import contextlib

    import torch

    from spo_core.training import DiffusersTrainingHost, inject_lora
    from spo_core.training.objectives import pair_log_probs, spo_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    backend = build(args.arch, device, dtype)
    host = DiffusersTrainingHost(backend)
    latent = args.resolution // 8
    net = inject_lora(host.lora_root(), host.module_table(), "attn", rank=args.rank, device=device)
    for p in backend.unet.parameters():
        p.requires_grad_(False)
    if args.gradient_checkpointing:
        host.set_gradient_checkpointing(True, net.checkpoint_function())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=1e-4)
    pairs = make_pairs(backend, args.pairs, latent)
    cond = random_cond(backend, args.pairs, device, dtype, args.resolution)
    den = host.denoiser(5.0)
    use_autocast = device.type == "cuda" and dtype != torch.float32

    def autocast():
        return torch.autocast("cuda", dtype=dtype) if use_autocast else contextlib.nullcontext()

    def update():
        fn = pair_log_probs if args.mode == "ours" else naive_log_probs
        lp = fn(den, net, pairs, cond, device, autocast)
        loss, _ = spo_loss(lp["logp_w"], lp["logp_l"], lp["ref_logp_w"], lp["ref_logp_l"], 10.0, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    base_rss = _rss_mb()
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated() / 2**20
    for _ in range(args.warmup):
        update()
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        update()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    out = {"mode": args.mode, "s_per_update": median, "s_per_pair": median / args.pairs, "times": times,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_load_mb": base_rss}
    out["peak_rss_delta_mb"] = out["peak_rss_mb"] - base_rss
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["model_gpu_mb"] = base_gpu
        out["gpu"] = torch.cuda.get_device_name(device)
    out["lora_parameters"] = net.num_parameters()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--resolution", type=int, default=128, help="image size in pixels (latent = resolution / 8)")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per update")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--mode", default="both", choices=("both", "ours", "naive"))
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child process: print one JSON line
    args = ap.parse_args()
    if args.mode != "both":
        result = run_mode(args)
        print(json.dumps(result) if args.json else result)
        return
    results = {}
    for mode in ("ours", "naive"):
        cmd = [sys.executable, __file__, "--mode", mode, "--json"] + [
            a for pair in (("--arch", args.arch), ("--device", args.device), ("--dtype", args.dtype),
                           ("--resolution", str(args.resolution)), ("--pairs", str(args.pairs)), ("--rank", str(args.rank)),
                           ("--warmup", str(args.warmup)), ("--repeats", str(args.repeats)), ("--threads", str(args.threads)))
            for a in pair] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, naive = results["ours"], results["naive"]
    ratio = ours["s_per_update"] / naive["s_per_update"]
    mem_key = "peak_gpu_mb" if "peak_gpu_mb" in ours else "peak_rss_delta_mb"
    print(f"SPO pair update, {args.arch} random UNet, {args.resolution}px ({args.resolution // 8}x{args.resolution // 8} latent), "
          f"{args.pairs} pairs/update, {args.device} {args.dtype}{' + grad ckpt' if args.gradient_checkpointing else ''}")
    print(f"{'mode':8} {'s/update':>9} {'s/pair':>8} {'peak MB':>9}")
    for mode in ("ours", "naive"):
        r = results[mode]
        print(f"{mode:8} {r['s_per_update']:9.3f} {r['s_per_pair']:8.3f} {r[mem_key]:9.0f}")
    print(f"time ours/naive = {ratio:.2f} (target <= 0.6); memory ours/naive = {ours[mem_key] / naive[mem_key]:.2f}")
    key = f"{args.device.split(':')[0]}-{args.arch}-{args.resolution}px-{args.dtype}{'-gc' if args.gradient_checkpointing else ''}"
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    import torch

    data[key] = {
        "arch": args.arch, "device": args.device, "dtype": args.dtype, "resolution": args.resolution,
        "latent": args.resolution // 8, "pairs_per_update": args.pairs, "rank": args.rank,
        "gradient_checkpointing": args.gradient_checkpointing, "threads": args.threads or torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs" + (f", {ours.get('gpu')}" if ours.get("gpu") else ""),
        "memory_measure": "torch.cuda.max_memory_allocated" if mem_key == "peak_gpu_mb" else "peak RSS minus RSS after model load",
        "ours": ours, "naive": naive, "time_ratio_ours_over_naive": ratio,
        "memory_ratio_ours_over_naive": ours[mem_key] / naive[mem_key],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {RESULTS} [{key}]")


if __name__ == "__main__":
    main()
