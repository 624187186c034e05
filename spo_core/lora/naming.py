"""Every naming scheme a LoRA file may use for a module, derived from the module table.

For a UNet module with canonical name `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`
and LDM name `input_blocks.1.1.transformer_blocks.0.attn1.to_q` a file may call it:

| scheme            | module prefix                                                        |
|-------------------|----------------------------------------------------------------------|
| kohya (diffusers) | lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q |
| kohya (LDM)       | lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q           |
| diffusers / PEFT  | unet.down_blocks.0...to_q, down_blocks.0...to_q, base_model.model... |
| old diffusers     | unet.down_blocks.0...attn1.processor.to_q (+ `_lora.up.weight`)      |
| ComfyUI generic   | diffusion_model.input_blocks.1.1...to_q                              |
| LyCORIS (ST)      | lycoris_down_blocks_0_..._to_q                                       |

and the tensor suffixes of `SUFFIXES`. Text encoders use `lora_te_`, `lora_te1_`, `lora_te2_`,
`text_encoder.`, `text_encoder_2.` and `text_encoders.clip_{l,g,h}.transformer.`; SD3 / Flux add
T5-XXL as kohya's `lora_te3_` (OneTrainer's Flux files: `lora_te2_`), diffusers' `text_encoder_3.`
(SD3) / `text_encoder_2.` (Flux) and ComfyUI's `text_encoders.t5xxl.transformer.`.

A Flux / SD3 transformer module (`transformer_blocks.0.attn.to_q`) may be stored under its
diffusers name (`transformer.`, PEFT `base_model.model.`, OneTrainer `lora_transformer_`,
`lycoris_`) or under its original name (kohya `lora_unet_double_blocks_0_img_attn_qkv`,
ComfyUI `diffusion_model.double_blocks.0.img_attn.qkv`); an original name of a fused weight
names a `FusedGroup` of the table, not one module.
"""

from __future__ import annotations

import dataclasses

from .tables import FLOW_FAMILIES, TE_FOLDERS, FusedGroup, ModuleInfo, ModuleTable

# tensor suffix -> (part, scheme); checked longest first
SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_up.weight": ("up", "kohya"),
    ".lora_down.weight": ("down", "kohya"),
    ".lora_mid.weight": ("mid", "kohya"),
    ".lora_B.weight": ("up", "peft"),
    ".lora_A.weight": ("down", "peft"),
    ".lora_B.default.weight": ("up", "peft"),
    ".lora_A.default.weight": ("down", "peft"),
    ".lora.up.weight": ("up", "diffusers"),
    ".lora.down.weight": ("down", "diffusers"),
    "_lora.up.weight": ("up", "diffusers_old"),
    "_lora.down.weight": ("down", "diffusers_old"),
    ".lora_linear_layer.up.weight": ("up", "diffusers_old"),
    ".lora_linear_layer.down.weight": ("down", "diffusers_old"),
    ".alpha": ("alpha", ""),
    ".diff": ("diff", "full"),
    ".diff_b": ("diff_b", "full"),
    ".dora_scale": ("dora_scale", ""),
}
SUFFIX_ORDER = sorted(SUFFIXES, key=len, reverse=True)

# LyCORIS algorithms that are not a plain low-rank product: key marker -> name
UNSUPPORTED_MARKERS = {"hada_": "LoHa", "lokr_": "LoKr", "oft_": "OFT", ".a1.weight": "GLoRA", ".b1.weight": "GLoRA",
                       ".w_norm": "LyCORIS norm", ".b_norm": "LyCORIS norm"}
# DoRA's magnitude vectors: kohya `.dora_scale` (a part of a module) and PEFT `lora_magnitude_vector`
DORA_MARKERS = (".dora_scale", "lora_magnitude_vector")


def unsupported_algorithm(key: str, dora: bool = False) -> str | None:
    """The name of the non-LoRA algorithm a key belongs to (LoHa, LoKr, OFT, ...; DoRA when asked), or None."""
    for marker, label in UNSUPPORTED_MARKERS.items():
        if marker in key:
            return label
    if dora and any(marker in key for marker in DORA_MARKERS):
        return "DoRA"
    return None


def flatten(name: str) -> str:
    return name.replace(".", "_")


def kohya_name(m: ModuleInfo, family: str) -> str:
    """The kohya/webui module name we write: diffusers-style for SD1/SD2, LDM-style for SDXL (as kohya does),
    original-style for Flux/SD3 (fused weights are named by `original_name`)."""
    if m.component == "transformer":
        return original_kohya_name(m.ldm)
    if m.component == "unet":
        base = m.ldm if (family == "sdxl" and m.ldm) else m.name
        return "lora_unet_" + flatten(base)
    if family == "sdxl" or family in FLOW_FAMILIES:
        return f"lora_{m.component}_" + flatten(m.name)  # lora_te1_ / lora_te2_ / lora_te3_
    return "lora_te_" + flatten(m.name)


def original_kohya_name(ldm: str) -> str:
    """kohya sd-scripts' name of a Flux/SD3 module: `lora_unet_` + its flattened original name."""
    return "lora_unet_" + flatten(ldm)


def comfy_name(m: ModuleInfo, family: str) -> str:
    """ComfyUI's generic key of a module: `diffusion_model.<LDM/original name>` or the TE under `text_encoders.`."""
    if m.component in ("unet", "transformer"):
        if m.ldm is None:
            raise ValueError(f"{m.component}:{m.name} has no LDM/original name")
        return "diffusion_model." + m.ldm
    return f"text_encoders.{comfy_clip(m.component, family)}.transformer." + m.name


def comfy_clip(component: str, family: str) -> str:
    """ComfyUI's name of a text encoder inside its CLIP object (`clip_l`, `clip_h`, `clip_g`, `t5xxl`)."""
    if component == "te1":
        return "clip_h" if family == "sd2" else "clip_l"
    return "clip_g" if component == "te2" else "t5xxl"


def diffusers_folder(component: str, family: str) -> str:
    """The pipeline attribute / subfolder of a component: `unet`, `transformer`, `text_encoder`, ..."""
    if component in ("unet", "transformer"):
        return component
    return next(folder for folder, comp in TE_FOLDERS[family].items() if comp == component)


def diffusers_prefix(m: ModuleInfo, family: str) -> str:
    return f"{diffusers_folder(m.component, family)}.{m.name}"


def _processor_name(name: str) -> str | None:
    """Old diffusers attention-processor path: attn1.to_q -> attn1.processor.to_q, to_out.0 -> processor.to_out."""
    for proj in ("to_q", "to_k", "to_v"):
        if name.endswith("." + proj):
            return name[: -len(proj)] + "processor." + proj
    if name.endswith(".to_out.0"):
        return name[: -len("to_out.0")] + "processor.to_out"
    return None


def _old_clip_attention_name(name: str) -> str | None:
    """self_attn.q_proj -> self_attn.to_q (diffusers' old text-encoder LoRA names; its kohya converter still writes them)."""
    for new, old in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("out_proj", "to_out")):
        if name.endswith(".self_attn." + new):
            return name[: -len(new)] + old
    return None


def aliases(m: ModuleInfo, family: str) -> list[str]:
    """Every module prefix under which a LoRA file may store this module."""
    n = m.name
    if m.component == "transformer":
        flat = flatten(n)
        out = [n, "transformer." + n, "base_model.model." + n, "transformer.base_model.model." + n,
               "lora_transformer_" + flat, "lycoris_" + flat]
        if m.ldm and m.ldm_rows is None:
            out += original_aliases(m.ldm)
        return out
    if m.component == "unet":
        out = [
            "lora_unet_" + flatten(n), n, "unet." + n, "base_model.model." + n, "unet.base_model.model." + n,
            "lycoris_" + flatten(n),
        ]
        if m.ldm:
            out += ["lora_unet_" + flatten(m.ldm), "diffusion_model." + m.ldm, "model.diffusion_model." + m.ldm]
        proc = _processor_name(n)
        if proc:
            out += [proc, "unet." + proc]
        return out
    flat = flatten(n)
    folder = diffusers_folder(m.component, family)
    out = [f"lora_{m.component}_" + flat, f"{folder}.{n}", f"{folder}.base_model.model.{n}",
           f"text_encoders.{comfy_clip(m.component, family)}.transformer.{n}"]
    old = _old_clip_attention_name(n) if m.component in ("te1", "te2") else None
    if old:
        out.append(f"{folder}.{old}")  # diffusers' old CLIP attention-processor LoRA (`to_q_lora.down.weight`)
    if m.component == "te1" and family not in FLOW_FAMILIES:
        out.append("lora_te_" + flat)  # SD1/SD2 kohya (and ComfyUI's alias for SDXL's CLIP-L)
    if m.component == "te3" and family == "flux":
        out.append("lora_te2_" + flat)  # OneTrainer's Flux files number T5 second, as ComfyUI reads them
    return out


def original_aliases(ldm: str) -> list[str]:
    """Prefixes under which a file stores a Flux/SD3 weight by its original name (kohya, ComfyUI, bare)."""
    return [original_kohya_name(ldm), "diffusion_model." + ldm, "model.diffusion_model." + ldm, ldm]


def alias_map(table: ModuleTable) -> dict[str, ModuleInfo | FusedGroup]:
    """prefix -> module (or fused group) for every alias of every module of `table` (built once per table)."""
    cached = table.__dict__.get("_alias_map")
    if cached is None:
        cached = {}
        for m in table.modules.values():
            for a in aliases(m, table.family):
                cached.setdefault(a, m)
        for g in table.groups.values():
            for a in original_aliases(g.ldm):
                cached.setdefault(a, g)
            qkv = qkv_prefix(g)
            if qkv is not None:  # ComfyUI's `linear1_qkv`: a LoRA on the q/k/v rows of Flux's linear1 only
                for a in original_aliases(g.ldm + "_qkv"):
                    cached.setdefault(a, qkv)
        table.__dict__["_alias_map"] = cached
    return cached


def qkv_prefix(group: FusedGroup) -> FusedGroup | None:
    """The q/k/v parts of a fused weight that holds more (Flux single blocks' linear1 = q, k, v, MLP input)
    when they are its leading rows: ComfyUI keys a LoRA of those rows alone as `<linear1>_qkv`."""
    n = 0
    while n < len(group.parts) and group.parts[n].name.endswith(("to_q", "to_k", "to_v")):
        n += 1
    if n != 3 or n == len(group.parts):
        return None
    rows = [r for p in group.parts[:3] for r in (p.ldm_rows or ())]
    end = max(b for _, b in rows)
    if sorted(rows)[0][0] != 0 or sum(b - a for a, b in rows) != end:
        return None
    return dataclasses.replace(group, parts=group.parts[:3], rows=end)


def split_key(key: str, amap: dict[str, ModuleInfo | FusedGroup]) -> tuple[ModuleInfo | FusedGroup, str, str] | None:
    """(module or fused group, part, scheme) of a LoRA file key, or None if no module of the table matches."""
    for suffix in SUFFIX_ORDER:
        if key.endswith(suffix):
            m = amap.get(key[: -len(suffix)])
            if m is not None:
                part, scheme = SUFFIXES[suffix]
                if scheme == "" and suffix == ".alpha":
                    scheme = "kohya" if key.startswith(("lora_", "lycoris_")) else ""
                return m, part, scheme
    return None
