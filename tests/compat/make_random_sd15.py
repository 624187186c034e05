"""Write a random-weight SD1.5 checkpoint in the original (LDM) single-file layout, for starting a
WebUI offline in tests (Forge guesses the architecture from the keys, so A1111's empty.pt does
not do for it). Run it with the WebUI's Python, given an A1111 checkout whose
`repositories/stable-diffusion-stability-ai` holds the ldm code:

    WEBUI_PYTHON tests/compat/make_random_sd15.py A1111_PATH OUT.safetensors [--fp16]

UNet and VAE are ldm's own modules built from A1111's `configs/v1-inference.yaml`; the text
encoder is transformers' CLIPTextModel from the SD1.5 config shipped in spo_core (keys
`cond_stage_model.transformer.text_model.*`, as in the released file). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a1111", help="an AUTOMATIC1111 checkout with repositories/stable-diffusion-stability-ai")
    parser.add_argument("output")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    a1111 = Path(args.a1111).resolve()
    sys.path.insert(0, str(a1111 / "repositories" / "stable-diffusion-stability-ai"))
    from ldm.util import instantiate_from_config

    torch.manual_seed(args.seed)
    cfg = OmegaConf.load(a1111 / "configs" / "v1-inference.yaml").model.params
    tensors = {}
    unet = instantiate_from_config(cfg.unet_config)
    tensors.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    vae = instantiate_from_config(cfg.first_stage_config)
    tensors.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})

    from transformers import CLIPTextConfig, CLIPTextModel

    te_cfg = json.loads((ROOT / "spo_core" / "configs" / "sd15" / "text_encoder" / "config.json").read_text())
    te_cfg = {k: v for k, v in te_cfg.items() if k not in ("architectures", "_name_or_path", "torch_dtype", "model_type")}
    te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    tensors.update({f"cond_stage_model.transformer.{k}": v for k, v in te.state_dict().items()})

    # the DDPM buffers the original file carries (Forge reads the schedule from them when present)
    betas = torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    tensors["betas"] = betas.float()
    tensors["alphas_cumprod"] = alphas_cumprod.float()
    tensors["alphas_cumprod_prev"] = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]).float()

    dtype = torch.float16 if args.fp16 else torch.float32
    out = {k: (v.to(dtype) if v.is_floating_point() and not k.startswith(("betas", "alphas")) else v).contiguous()
           for k, v in tensors.items()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file(out, args.output, metadata={"format": "pt", "note": "random weights, for tests"})
    print(f"wrote {args.output}: {len(out)} tensors, {sum(v.numel() for v in out.values()) / 1e6:.0f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
