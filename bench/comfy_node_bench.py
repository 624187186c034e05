"""What the ComfyUI nodes cost on top of spo_core: the per-step resampler run through the
SPO Per-Step Resampler node and the stock SamplerCustom node, against spo_core's `resample`
called directly inside a bare ComfyUI sampler function, on the same tiny model, conditioning,
scorer, VAE, steps and seed. Both go through ComfyUI's guider (CFG, conds), so the ratio is
the nodes' own overhead (row checks, callbacks into the progress bar and previews, the trace).

    COMFYUI_PATH=/path/to/ComfyUI python bench/comfy_node_bench.py [--repeats 7] [--threads 1]

Prints a table and writes bench/results/comfy_node_bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="image size in pixels (latent = size / 8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from comfy_support.harness import comfyui_version, env_comfy_path, get_harness, tiny_cond, tiny_model, tiny_vae

    path = env_comfy_path()
    if path is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    h = get_harness(Path(tempfile.mkdtemp()))

    import comfy.sample
    import comfy.samplers
    import latent_preview
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    from spo_core.sampling import ResamplerConfig, resample
    from spo_core.scorers import load_scorer

    pack = h.pack_module
    sampling = sys.modules[pack + ".nodes.comfy_sampling"]
    resampler_node = h.node_class("SPOPerStepResampler")

    model, vae = tiny_model(0), tiny_vae(0)
    pos, neg = tiny_cond(1, seed=1), tiny_cond(1, seed=2)
    scorer = load_scorer("jpeg_compressibility")
    prompt = "a red apple"
    latent = {"samples": torch.zeros(args.batch, 4, args.size // 8, args.size // 8)}
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", args.steps).cpu()
    config = ResamplerConfig(k=args.k, policy="greedy", eta=1.0, window=(0.0, 999.0), keep_images=True)
    seed = 42

    def run_node():
        with torch.inference_mode():
            sampler = resampler_node.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(
                scorer=scorer, vae=vae, prompt=prompt, k=args.k, policy="greedy", eta=1.0, window_t_min=0,
                window_t_max=999, score_every=1, temperature=1.0, lookahead_steps=0).args[0]
            out = SamplerCustom().sample(model, True, seed, 2.0, pos, neg, sampler, sigmas, latent)
        return out[0]["samples"]

    def bare(model_k, x, sig, extra_args=None, callback=None, disable=None):
        class Rows:
            def __init__(self, n):
                self.batch_size = n

            def take(self, index):
                return Rows(len(index))

        base = model_k.inner_model.inner_model
        return resample(lambda xx, s, c: model_k(xx, s, **extra_args), Rows(x.shape[0]), x, sig,
                        sampling.noise_schedule(base), scorer,
                        lambda x0: vae.decode(base.process_latent_out(x0)).movedim(-1, 1), prompt, config,
                        seed=extra_args["seed"]).x

    def run_core():
        with torch.inference_mode():
            noise = comfy.sample.prepare_noise(latent["samples"], seed)
            samples = comfy.sample.sample_custom(model, noise, 2.0, comfy.samplers.KSAMPLER(bare), sigmas, pos, neg,
                                                 latent["samples"], seed=seed)
        return samples

    a, b = run_node(), run_core()  # warm up; same seed -> same sample
    same = bool(torch.allclose(a, b, atol=1e-5, rtol=1e-4))
    times = {"node": [], "core": []}
    for i in range(args.repeats):
        for name, fn in (("node", run_node), ("core", run_core)) if i % 2 == 0 else (("core", run_core), ("node", run_node)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["node"] / med["core"]
    evaluations = args.batch * (1 + args.k * (args.steps - 1))
    print(f"{'path':<44}{'median s':>10}{'min s':>9}{'ms / eval row':>15}")
    for name, label in (("node", "SPOPerStepResampler + SamplerCustom node"), ("core", "spo_core.resample in a bare KSAMPLER")):
        print(f"{label:<44}{med[name]:>10.3f}{min(times[name]):>9.3f}{med[name] / evaluations * 1e3:>15.2f}")
    print(f"wall-time ratio node / core: {ratio:.3f} (target <= 1.1); same sample: {same}")
    result = {
        "what": "per-step resampler through the ComfyUI nodes vs spo_core directly, same tiny model/steps/seed",
        "comfyui_version": comfyui_version(path), "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, no GPU" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "settings": {"steps": args.steps, "k": args.k, "batch": args.batch, "size": args.size, "repeats": args.repeats,
                     "scorer": "jpeg_compressibility", "vae": "random TAESD", "model": "tiny SD1.5-class UNet (1 M params)"},
        "seconds": times, "median_s": med, "ratio_node_over_core": ratio, "same_sample": same,
        "denoiser_rows": evaluations,
    }
    out = ROOT / "bench" / "results" / "comfy_node_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
