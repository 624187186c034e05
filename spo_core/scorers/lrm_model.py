"""LPO's Latent Reward Model (LRM, arXiv 2502.01051) as a module: the diffusion model's own UNet
encoder scores a noisy latent x_t at its timestep, with no decoding.

    features = [pooled last-layer output of each down block ..., pooled mid output]   # 4800 wide for SD1.5
    mid      = mid_uncond + w * (mid_text - mid_uncond)                              # CFG on the mid feature only
    e_I = W_v features,  e_T = W_t pooled_text (SD1.5) | CLIP-G text_embeds (SDXL)
    score = exp(logit_scale) * cos(e_I, e_T)

The UNet is a diffusers UNet2DConditionModel whose up blocks and output convolution are removed
(the LRM never uses them), so diffusers' own forward (time embedding, SDXL's added conditions)
runs conv_in, the down blocks and the mid block and returns the mid output; the down blocks'
outputs are read with forward hooks. The pooled down features are those of the text-conditioned
half only (LPO's "multiscale, cfg on mid"). Which down outputs: the last resnet/attention layer
of each down block, before its downsampler, which is res-sample index 2/5/8/11 of SD1.5 (2/5/8 of
SDXL) and generalises to any UNet (the embedded world's tiny one).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, ModelMismatchError

log = logging.getLogger(__name__)

SDXL_TIME_IDS = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)


@dataclass
class LRMConfig:
    """Everything needed to rebuild an LRM (travels in the metadata of the files we write)."""

    arch: str  # "sd1" (SD1.5 / SD2 / custom SD1-like) or "sdxl"
    unet: dict  # the diffusers UNet config (up blocks are part of it but not built)
    text: dict  # CLIPTextConfig of text_encoder
    text_2: dict | None = None  # CLIPTextConfig of text_encoder_2 (SDXL)
    projection_dim: int = 768
    guidance_scale: float = 7.5
    text_encoder_source: str = "own"  # "own": the file holds it; "world": the embedded world's base encoder
    time_ids: list = field(default_factory=lambda: list(SDXL_TIME_IDS))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LRMConfig":
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def feature_width(self) -> int:
        channels = list(self.unet["block_out_channels"])
        return sum(channels) + channels[-1]


def _clip_config(transformers, data: dict):
    keep = {k: v for k, v in data.items() if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")}
    return transformers.CLIPTextConfig(**keep)


def strip_up_blocks(unet: nn.Module) -> nn.Module:
    """Make a diffusers UNet end at its mid block: its forward then returns the mid output."""
    unet.up_blocks = nn.ModuleList()
    unet.conv_norm_out = None
    unet.conv_act = None
    unet.conv_out = nn.Identity()
    return unet


class LatentRewardModel(nn.Module):
    """Scores (noisy latent, timestep, prompt) with the UNet encoder; see the module docstring."""

    def __init__(self, cfg: LRMConfig):
        super().__init__()
        from ..errors import require

        diffusers = require("diffusers", "the latent reward model", "diffusers")
        transformers = require("transformers", "the latent reward model", "scorers")
        self.cfg = cfg
        self.unet = strip_up_blocks(diffusers.UNet2DConditionModel.from_config(cfg.unet))
        self.text_encoder = transformers.CLIPTextModel(_clip_config(transformers, cfg.text))
        self.text_encoder_2 = None
        if cfg.arch == "sdxl":
            if cfg.text_2 is None:
                raise ConfigError("an SDXL LRM needs the config of its second text encoder")
            self.text_encoder_2 = transformers.CLIPTextModelWithProjection(_clip_config(transformers, cfg.text_2))
            self.text_projection = None
        else:
            width = cfg.text["hidden_size"]
            self.text_projection = nn.Linear(width, cfg.projection_dim, bias=False)
        self.visual_projection = nn.Linear(cfg.feature_width, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._captured: list[torch.Tensor] = []
        for block in self.unet.down_blocks:
            block.register_forward_hook(self._capture)

    # -- the parts ------------------------------------------------------------------------------
    def _capture(self, module, args, output) -> None:
        _, res_samples = output
        self._captured.append(res_samples[len(module.resnets) - 1])  # the last layer's output, before downsampling

    def encode_text(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None):
        """(UNet conditioning states, pooled embedding for the score, SDXL's added text embeds or None)."""
        device = next(self.text_encoder.parameters()).device
        out = self.text_encoder(input_ids.to(device), output_hidden_states=self.cfg.arch == "sdxl")
        if self.cfg.arch != "sdxl":
            return out.last_hidden_state, self.text_projection(out.pooler_output), None
        if input_ids_2 is None:
            raise ConfigError("an SDXL LRM needs the token ids of its second tokenizer")
        out2 = self.text_encoder_2(input_ids_2.to(device), output_hidden_states=True)
        states = torch.cat([out.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return states, out2.text_embeds, out2.text_embeds

    def features(self, latents: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor,
                 uncond_states: torch.Tensor, text_pooled: torch.Tensor | None = None,
                 uncond_pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled multi-scale feature [B, width] of VP-scaled latents at DDPM timesteps."""
        b = latents.shape[0]
        p = next(self.unet.parameters())
        x = torch.cat([latents, latents]).to(p.device, p.dtype)
        t = torch.as_tensor(timesteps, dtype=torch.float32, device=p.device).reshape(-1).expand(b)
        t = torch.cat([t, t])
        states = torch.cat([text_states, uncond_states]).to(p.device, p.dtype)
        added = None
        if self.cfg.arch == "sdxl":
            time_ids = torch.tensor(self.cfg.time_ids, device=p.device, dtype=p.dtype).expand(2 * b, -1)
            added = {"text_embeds": torch.cat([text_pooled, uncond_pooled]).to(p.device, p.dtype), "time_ids": time_ids}
        self._captured = []
        mid = self.unet(x, t, encoder_hidden_states=states, added_cond_kwargs=added, return_dict=False)[0]
        downs = [f[:b].float().mean(dim=(2, 3)) for f in self._captured]  # the text-conditioned half
        self._captured = []
        pooled_mid = mid.float().mean(dim=(2, 3))
        m_text, m_uncond = pooled_mid[:b], pooled_mid[b:]
        mid_cfg = m_uncond + self.cfg.guidance_scale * (m_text - m_uncond)
        return torch.cat([*downs, mid_cfg], dim=-1)

    def image_embeds(self, features: torch.Tensor) -> torch.Tensor:
        e = self.visual_projection(features.to(self.visual_projection.weight.dtype)).float()
        return e / e.norm(dim=-1, keepdim=True)

    @staticmethod
    def normalized(e: torch.Tensor) -> torch.Tensor:
        e = e.float()
        return e / e.norm(dim=-1, keepdim=True)

    def scores(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.float().exp() * (image_embeds * self.normalized(text_embeds)).sum(-1)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor,
                uncond_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None,
                uncond_ids_2: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B] for row-aligned latents (VP scale), DDPM timesteps and token ids (uncond: one row or B)."""
        states, pooled, added = self.encode_text(input_ids, input_ids_2)
        u_states, _, u_added = self.encode_text(uncond_ids, uncond_ids_2)
        b = latents.shape[0]
        if u_states.shape[0] == 1 and b > 1:
            u_states = u_states.expand(b, *u_states.shape[1:])
            u_added = u_added.expand(b, -1) if u_added is not None else None
        feats = self.features(latents, timesteps, states, u_states, added, u_added)
        return self.scores(self.image_embeds(feats), pooled)


def lrm_from_diffusion_model(unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module | None = None,
                             projection_dim: int | None = None, text_projection: torch.Tensor | None = None,
                             guidance_scale: float = 7.5, seed: int = 0) -> LatentRewardModel:
    """A fresh LRM initialised from a diffusion model, as LPO's LRM training starts: the model's UNet
    (down and mid blocks) and text encoder(s); W_v ~ N(0, 0.02); W_t from `text_projection` (LPO: CLIP
    ViT-L's), else the identity when square; logit_scale ln(1/0.07)."""
    def text_config(te):
        d = te.config.to_dict()
        return {k: v for k, v in d.items() if not k.startswith("_")}

    sdxl = text_encoder_2 is not None
    width = text_encoder.config.hidden_size
    proj = projection_dim or (text_encoder_2.config.projection_dim if sdxl else width)
    cfg = LRMConfig(arch="sdxl" if sdxl else "sd1", unet=dict(unet.config), text=text_config(text_encoder),
                    text_2=text_config(text_encoder_2) if sdxl else None, projection_dim=proj, guidance_scale=guidance_scale)
    model = LatentRewardModel(cfg)
    own = {k: v for k, v in unet.state_dict().items() if not k.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))}
    model.unet.load_state_dict(own, strict=True)
    model.text_encoder.load_state_dict(text_encoder.state_dict(), strict=True)
    if sdxl:
        model.text_encoder_2.load_state_dict(text_encoder_2.state_dict(), strict=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.visual_projection.weight.copy_(torch.randn(model.visual_projection.weight.shape, generator=g) * 0.02)
        if model.text_projection is not None:
            w = model.text_projection.weight
            if text_projection is not None:
                w.copy_(text_projection)
            elif w.shape[0] == w.shape[1]:
                w.copy_(torch.eye(w.shape[0]))
            else:
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    return model


def check_matches_unet(cfg: LRMConfig, unet_config: dict, what: str = "this LRM") -> None:
    """Refuse an LRM built for another architecture than the sampling model, naming both."""
    keys = ("in_channels", "block_out_channels", "cross_attention_dim", "addition_embed_type")
    mine = {k: _norm(cfg.unet.get(k)) for k in keys}
    theirs = {k: _norm(unet_config.get(k)) for k in keys}
    if mine != theirs:
        kind = lambda c: "SDXL" if c.get("addition_embed_type") == "text_time" else f"an SD1-like UNet {c.get('block_out_channels')}"  # noqa: E731
        raise ModelMismatchError(
            f"{what} is built on {kind(cfg.unet)} (cross-attention {cfg.unet.get('cross_attention_dim')}) but the model "
            f"samples with {kind(unet_config)} (cross-attention {unet_config.get('cross_attention_dim')}): a latent "
            "scorer reads the model's own latents, so it must be made for the same architecture")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v
