"""CLIP text and vision towers in plain torch, with transformers' parameter names.

The step-aware preference model must load the released SPO checkpoints in every host
(the WebUI pins transformers 4.30, current installs have 5.x, whose CLIP internals changed),
so its forward pass depends on no transformers internals: these modules reproduce CLIP's
architecture (pre-LN transformer, causal text attention, EOS pooling, class-token pooling,
quick_gelu or gelu) under the exact state-dict names of `transformers.CLIPModel`. The vision
tower optionally carries SPO's DiT-style adaLN timestep modulation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class TowerConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class TextConfig(TowerConfig):
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407


@dataclass
class VisionConfig(TowerConfig):
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3


@dataclass
class CLIPConfigLite:
    """The sizes of a CLIP model: enough to build it and to travel with a saved file as JSON."""

    text: TextConfig
    vision: VisionConfig
    projection_dim: int
    logit_scale_init_value: float = 2.6592

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfigLite":
        return cls(TextConfig(**d["text"]), VisionConfig(**d["vision"]), d["projection_dim"], d.get("logit_scale_init_value", 2.6592))

    @classmethod
    def from_transformers(cls, cfg) -> "CLIPConfigLite":
        """From a transformers CLIPConfig (object or config.json dict); absent keys take
        transformers' CLIP defaults (quick_gelu, ViT-B/32 sizes), as transformers itself does."""
        d = cfg if isinstance(cfg, dict) else cfg.to_dict()
        t = {**_HF_TEXT_DEFAULTS, **(d.get("text_config") or d.get("text_config_dict") or {})}
        v = {**_HF_VISION_DEFAULTS, **(d.get("vision_config") or d.get("vision_config_dict") or {})}
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps")
        # configs of transformers < 4.2x carried eos_token_id 2 and pooled at argmax(ids): the CLIP BPE end token
        eos = t.get("eos_token_id")
        eos = 49407 if eos in (None, 2) and t["vocab_size"] == 49408 else eos
        text = TextConfig(**{k: t[k] for k in keys}, vocab_size=t["vocab_size"],
                          max_position_embeddings=t["max_position_embeddings"], eos_token_id=eos)
        vision = VisionConfig(**{k: v[k] for k in keys}, image_size=v["image_size"], patch_size=v["patch_size"],
                              num_channels=v["num_channels"])
        return cls(text, vision, d.get("projection_dim", 512), d.get("logit_scale_init_value", 2.6592))


# transformers' CLIPTextConfig / CLIPVisionConfig defaults (unchanged from 4.2x to 5.x)
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                           image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def clip_h14_config() -> CLIPConfigLite:
    """CLIP ViT-H/14 (LAION 2B; PickScore_v1 and SPO's preference model)."""
    return CLIPConfigLite(
        text=TextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"),
        vision=VisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                            hidden_act="gelu", image_size=224, patch_size=14),
        projection_dim=1024,
    )


class Attention(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t):
            return t.reshape(b, n, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class EncoderLayer(nn.Module):
    """A pre-LN transformer layer; with `adaln` it is SPO's time-conditioned layer (DiT adaLN-Zero style)."""

    def __init__(self, cfg: TowerConfig, adaln: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        if adaln:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, causal: bool = False, time_cond: torch.Tensor | None = None) -> torch.Tensor:
        if time_cond is None:
            x = x + self.self_attn(self.layer_norm1(x), causal)
            return x + self.mlp(self.layer_norm2(x))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(time_cond).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.self_attn(modulate(self.layer_norm1(x), shift_msa, scale_msa), causal)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.layer_norm2(x), shift_mlp, scale_mlp))


class Encoder(nn.Module):
    def __init__(self, cfg: TowerConfig, adaln: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, adaln) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x, causal=False, time_cond=None):
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, causal, time_cond, use_reentrant=False)
            else:
                x = layer(x, causal, time_cond)
        return x


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # CLIP's initialization (a fresh model trains from here)
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(pos)


class TextTransformer(nn.Module):
    """transformers' `text_model`: returns the final-layer-normed EOS token."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.final_layer_norm(self.encoder(self.embeddings(input_ids), causal=True))
        eos = (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)  # first EOS (= argmax of ids for CLIP BPE)
        return h[torch.arange(h.shape[0], device=h.device), eos]


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(d) * d ** -0.5)
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, d)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.reshape(1, 1, -1).expand(pixels.shape[0], 1, -1)
        x = torch.cat([cls.to(patches.dtype), patches], dim=1)
        return x + self.position_embedding.weight.unsqueeze(0)


class VisionTransformer(nn.Module):
    """transformers' `vision_model` (+ SPO's per-layer and final adaLN when `adaln`): returns the pooled token."""

    def __init__(self, cfg: VisionConfig, adaln: bool = False):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg, adaln)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if adaln:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))

    def forward(self, pixels: torch.Tensor, time_cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False, time_cond=time_cond)
        pooled = self.post_layernorm(h[:, 0])
        if time_cond is not None:
            shift, scale = self.adaLN_modulation(time_cond).chunk(2, dim=1)
            pooled = pooled * (1 + scale) + shift
        return pooled


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: sinusoidal(256, [cos, sin], max_period 10000) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(self.sinusoidal(t, self.frequency_embedding_size).to(w.dtype))


class CLIPTorch(nn.Module):
    """CLIP (text + vision + projections + logit scale) with transformers' names; `time_conditioned`
    adds SPO's timestep embedder and adaLN modulation (the step-aware preference model)."""

    def __init__(self, cfg: CLIPConfigLite, time_conditioned: bool = False):
        super().__init__()
        self.cfg = cfg
        self.time_conditioned = time_conditioned
        self.text_model = TextTransformer(cfg.text)
        self.vision_model = VisionTransformer(cfg.vision, adaln=time_conditioned)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init_value)))
        if time_conditioned:
            self.t_embedder = TimestepEmbedder(cfg.vision.hidden_size)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text_model(input_ids))

    def image_features(self, pixels: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        time_cond = None
        if self.time_conditioned:
            if timesteps is None:
                timesteps = torch.zeros(pixels.shape[0], device=pixels.device)
            timesteps = torch.as_tensor(timesteps, device=pixels.device).reshape(-1).expand(pixels.shape[0])
            time_cond = self.t_embedder(timesteps)
        return self.visual_projection(self.vision_model(pixels, time_cond))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.text_model.encoder.gradient_checkpointing = enabled
        self.vision_model.encoder.gradient_checkpointing = enabled


def tiny_clip_config(image_size: int = 32, hidden: int = 32, layers: int = 2, projection_dim: int = 16,
                     act: str = "gelu") -> CLIPConfigLite:
    """A small CLIP with the real vocabulary (so the real tokenizer works), for tests and the demo world."""
    return CLIPConfigLite(
        text=TextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2, hidden_act=act),
        vision=VisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                            hidden_act=act, image_size=image_size, patch_size=8),
        projection_dim=projection_dim,
    )


__all__ = ["CLIPConfigLite", "CLIPTorch", "TextConfig", "VisionConfig", "TimestepEmbedder", "clip_h14_config",
           "tiny_clip_config"]
