"""Tiny random-weight models built in code, for tests and benchmarks (nothing downloaded).

The shapes follow diffusers' own fast tests; the tokenizer is the real CLIP BPE built
offline (`clip_tokenizer`). Real-size architectures come from the configs shipped in
`spo_core/configs/`, instantiated with random weights or on the `meta` device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import require

CONFIG_DIR = Path(__file__).parent / "configs"


def real_config(arch: str, component: str = "unet") -> dict:
    """The diffusers/transformers config of a real SD1.5 ('sd15'), SD2 ('sd2') or SDXL ('sdxl') component."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    with open(CONFIG_DIR / arch / component / name) as f:
        return json.load(f)


def real_unet(arch: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A real-size SD UNet with random weights (or on `meta`, for key maps)."""
    diffusers = require("diffusers", "real-size UNets", "diffusers")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel.from_config(real_config(arch, "unet"))
    return unet.to(dtype=dtype)


def real_text_encoders(arch: str, device: str | torch.device = "meta") -> list:
    """The real-size text encoder(s) of an architecture (random weights)."""
    transformers = require("transformers", "text encoders", "scorers")
    out = []
    for comp, cls in (("text_encoder", transformers.CLIPTextModel), ("text_encoder_2", transformers.CLIPTextModelWithProjection)):
        if (CONFIG_DIR / arch / comp).is_dir():
            cfg = real_config(arch, comp)
            cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
            with torch.device(device):
                out.append(cls(transformers.CLIPTextConfig(**cfg)))
    return out


def tiny_text_config(hidden: int = 32, layers: int = 2, projection_dim: int = 32, **kw):
    transformers = require("transformers", "tiny text encoders", "scorers")
    return transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=projection_dim,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **kw,
    )


def tiny_vae(seed: int = 0):
    diffusers = require("diffusers", "tiny VAEs", "diffusers")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )


def tiny_unet_config(sdxl: bool = False) -> dict:
    cfg = dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    )
    if sdxl:
        cfg.update(
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
        )
    else:
        cfg.update(cross_attention_dim=32, attention_head_dim=8)
    return cfg


def ddim_scheduler(prediction_type: str = "epsilon"):
    diffusers = require("diffusers", "schedulers", "diffusers")
    return diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type, timestep_spacing="leading",
    )


def tiny_sd15_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A ~2M-parameter SD1.5-shaped StableDiffusionPipeline (32 px images, 16x16 latents)."""
    diffusers = require("diffusers", "tiny pipelines", "diffusers")
    transformers = require("transformers", "tiny pipelines", "scorers")
    from .clip_tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**tiny_unet_config(sdxl=False))
    vae = tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    text_encoder = transformers.CLIPTextModel(tiny_text_config())
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(), unet=unet,
        scheduler=ddim_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny SDXL-shaped StableDiffusionXLPipeline (two text encoders, pooled embeds, time ids)."""
    diffusers = require("diffusers", "tiny pipelines", "diffusers")
    transformers = require("transformers", "tiny pipelines", "scorers")
    from .clip_tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**tiny_unet_config(sdxl=True))
    vae = tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    te1 = transformers.CLIPTextModel(tiny_text_config())
    te2 = transformers.CLIPTextModelWithProjection(tiny_text_config())
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"), unet=unet, scheduler=ddim_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip_model(seed: int = 0, image_size: int = 32, projection_dim: int = 16):
    """A tiny transformers CLIPModel (real vocabulary size, so the real tokenizer works)."""
    transformers = require("transformers", "tiny CLIP models", "scorers")
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=projection_dim,
    )
    return transformers.CLIPModel(cfg).eval()


def real_size_pipeline(arch: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """An SD1.5 or SDXL pipeline of the real architecture with random weights: UNet, text encoder(s),
    VAE and scheduler from the shipped configs, built on `device` (fast on a GPU), nothing downloaded."""
    diffusers = require("diffusers", "real-size pipelines", "diffusers")
    from .clip_tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel.from_config(real_config(arch, "unet"))
        vae = diffusers.AutoencoderKL.from_config(real_config(arch, "vae"))
        tes = real_text_encoders(arch, device=device)
    if arch == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=load_clip_tokenizer(),
            tokenizer_2=load_clip_tokenizer(pad_token="!"), unet=unet, scheduler=ddim_scheduler())
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=tes[0], tokenizer=load_clip_tokenizer(), unet=unet, scheduler=ddim_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def tiny_sd3_pipeline(seed: int = 0, shift: float = 3.0):
    """A tiny StableDiffusion3Pipeline: an SD3Transformer2DModel, two CLIP encoders with projection and no
    T5 (diffusers pads the CLIP states to the joint width, as SD3 runs without its T5)."""
    diffusers = require("diffusers", "tiny pipelines", "diffusers")
    transformers = require("transformers", "tiny pipelines", "scorers")
    from .clip_tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32,
    )
    vae = tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    te1 = transformers.CLIPTextModelWithProjection(tiny_text_config())
    te2 = transformers.CLIPTextModelWithProjection(tiny_text_config())
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=te1, tokenizer=load_clip_tokenizer(), text_encoder_2=te2, tokenizer_2=load_clip_tokenizer(pad_token="!"),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_T5_WORDS = ("a", "an", "the", "red", "blue", "green", "apple", "car", "cat", "dog", "house", "tree", "photo", "of",
                 "on", "in", "with", "and", "painting", "sky", "sun", "flower", "small", "big", "bright", "dark", "x")


def tiny_t5_tokenizer(max_length: int = 32):
    """A T5-style (SentencePiece unigram, `</s>` appended, `<pad>` = 0) fast tokenizer of 57 pieces, built offline:
    lower-case words and letters; anything else is `<unk>`. Fits a tiny T5 encoder's 64-token vocabulary."""
    transformers = require("transformers", "tiny tokenizers", "scorers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in TINY_T5_WORDS] + [(c, -4.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces = list(dict(pieces).items())
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                                model_max_length=max_length)


def tiny_t5_encoder(seed: int = 0, d_model: int = 32):
    transformers = require("transformers", "tiny text encoders", "scorers")
    torch.manual_seed(seed)
    return transformers.T5EncoderModel(transformers.T5Config(
        d_model=d_model, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=64, feed_forward_proj="gated-gelu")).eval()


def tiny_flux_pipeline(seed: int = 0):
    """A tiny FluxPipeline: Flux transformer, CLIP-L-style encoder (pooled 32) and a T5 encoder (32 wide) with the
    tiny T5 tokenizer (prompts of up to 32 tokens), dynamic shift as Flux.1-dev."""
    diffusers = require("diffusers", "tiny pipelines", "diffusers")
    transformers = require("transformers", "tiny pipelines", "scorers")
    from .clip_tokenizer import load_clip_tokenizer

    transformer = tiny_flux_transformer(seed)
    vae = tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    te1 = transformers.CLIPTextModel(tiny_text_config()).eval()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                      base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    pipe = diffusers.FluxPipeline(scheduler=sched, vae=vae, text_encoder=te1, tokenizer=load_clip_tokenizer(),
                                  text_encoder_2=tiny_t5_encoder(seed + 3), tokenizer_2=tiny_t5_tokenizer(),
                                  transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True, joint_attention_dim: int = 32,
                          pooled_projection_dim: int = 32):
    """A tiny FluxTransformer2DModel (packed 2x2 latents of 4 channels: in_channels 16)."""
    diffusers = require("diffusers", "tiny flux models", "diffusers")
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
