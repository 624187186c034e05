"""Original (BFL Flux / SD3 MMDiT) names of the diffusers Flux and SD3 transformer modules.

Flux LoRAs from kohya sd-scripts, ComfyUI and single-file checkpoints use Black Forest Labs'
names (`double_blocks.0.img_attn.qkv`, `single_blocks.0.linear1`); SD3 ones use the MMDiT names
(`joint_blocks.0.x_block.attn.qkv`). Those layouts fuse what diffusers splits: q, k and v in one
`qkv` Linear, and in Flux single blocks q, k, v and the MLP input in `linear1`. Each diffusers
module therefore gets its original name and, when it is a part of a fused weight (or its rows are
permuted, as the final adaLN's scale/shift swap), the row ranges of that weight it occupies, in
diffusers' row order. The rule follows diffusers' single-file converters and ComfyUI's
`flux_to_diffusers` / `mmdit_to_diffusers`; tests check it against both.
"""

from __future__ import annotations

Rows = tuple[tuple[int, int], ...]

_FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_FLUX_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}

_SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
_SD3_JOINT = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_SD3_JOINT_FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
# name -> (double-block prefix, single-block prefix) per family
_BLOCKS = {"flux": (("transformer_blocks", "double_blocks"), ("single_transformer_blocks", "single_blocks")),
           "sd3": (("transformer_blocks", "joint_blocks"), None)}


def _swapped(out: int) -> Rows:
    """adaLN (scale, shift) in diffusers vs (shift, scale) in the original: the halves swap."""
    half = out // 2
    return ((half, out), (0, half))


def original_names(family: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, Rows | None]]:
    """diffusers module name -> (original name, row ranges or None) for one transformer.

    `shapes` holds every weight-carrying module's weight shape by diffusers name; modules with
    no original twin (none in Flux.1 / SD3.5) are left out.
    """
    top, blocks, blocks_fused = ((_FLUX_TOP, _FLUX_DOUBLE, _FLUX_DOUBLE_FUSED) if family == "flux"
                                 else (_SD3_TOP, _SD3_JOINT, _SD3_JOINT_FUSED))
    out: dict[str, tuple[str, Rows | None]] = {}
    for name, ldm in top.items():
        if name in shapes:
            out[name] = (ldm, None)
    if "norm_out.linear" in shapes:
        out["norm_out.linear"] = ("final_layer.adaLN_modulation.1", _swapped(shapes["norm_out.linear"][0]))
    double, single = _BLOCKS[family]
    plans = [(double, blocks, blocks_fused)] + ([(single, _FLUX_SINGLE, _FLUX_SINGLE_FUSED)] if single else [])
    for (src, dst), plain, fused in plans:
        indices = sorted({int(n.split(".")[1]) for n in shapes if n.startswith(src + ".")})
        for i in indices:
            head, orig = f"{src}.{i}", f"{dst}.{i}"
            for sub, ldm in plain.items():
                name = f"{head}.{sub}"
                if name in shapes:
                    out[name] = (f"{orig}.{ldm}", None)
            for ldm, subs in fused.items():
                start = 0
                for sub in subs:
                    name = f"{head}.{sub}"
                    if name not in shapes:
                        break  # e.g. SD3 blocks without attn2
                    rows = shapes[name][0]
                    out[name] = (f"{orig}.{ldm}", ((start, start + rows),))
                    start += rows
            if family == "sd3":
                ctx = f"{head}.norm1_context.linear"
                hidden = shapes[f"{head}.attn.to_q"][0]
                if ctx in shapes and shapes[ctx][0] == 2 * hidden:  # the last block: AdaLayerNormContinuous
                    out[ctx] = (f"{orig}.context_block.adaLN_modulation.1", _swapped(shapes[ctx][0]))
    return out
