"""Our kohya/webui output against the key-acceptance rules of ComfyUI's lora.py and the
WebUI's networks.py, re-implemented here from their documented behaviour (see
shared/reference/comfyui.md §2 and webui.md §4), on real-size SD1.5 and SDXL module sets."""

import re

import pytest

from spo_core.lora import read_lora, to_diffusers, to_webui
from spo_core.lora.tables import load_table

from lora_helpers import assert_same_deltas, kohya_default_modules, random_lora, spo_modules

# --- ComfyUI (comfy/lora.py model_lora_keys_unet / _clip, weight_adapter LoRAAdapter.load) ---------------

COMFY_UP_DOWN = [(".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                 (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                 (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight")]


def comfy_key_map(table):
    """prefix -> model state-dict key, as ComfyUI registers them for SD1.5/SDXL models."""
    key_map = {}
    for m in table.modules.values():
        if m.component != "unet":
            continue
        target = f"diffusion_model.{m.ldm}.weight"
        key_map["lora_unet_" + m.ldm.replace(".", "_")] = target  # from the model's own (LDM) keys
        key_map["diffusion_model." + m.ldm] = target  # generic
        k = m.name  # comfy.utils.unet_to_diffusers gives the diffusers names
        key_map["lora_unet_" + k.replace(".", "_")] = target
        key_map["lycoris_" + k.replace(".", "_")] = target
        for p in ("", "unet."):
            dk = p + k.replace(".to_", ".processor.to_")
            if dk.endswith(".to_out.0"):
                dk = dk[:-2]
            key_map[dk] = target
    clips = {"te1": "clip_l", "te2": "clip_g"}
    for m in table.modules.values():
        if m.component == "unet":
            continue
        clip = clips[m.component]
        target = f"{clip}.transformer.{m.name}.weight"
        flat = m.name.replace(".", "_")
        if table.family == "sdxl":
            key_map[("lora_te1_" if m.component == "te1" else "lora_te2_") + flat] = target
            key_map[("text_encoder." if m.component == "te1" else "text_encoder_2.") + m.name] = target
            if m.component == "te1":
                key_map["lora_te_" + flat] = target
        else:
            key_map["lora_te_" + flat] = target
            key_map["lora_te1_" + flat] = target
            key_map["text_encoder." + m.name] = target
        key_map[f"text_encoders.{clip}.transformer.{m.name}"] = target
    return key_map


def comfy_load(sd, key_map):
    """(patched target keys, keys not loaded) as comfy.lora.load_lora would log them."""
    loaded, patched = set(), {}
    for x, target in key_map.items():
        for up, down in COMFY_UP_DOWN:
            if x + up in sd and x + down in sd:
                loaded |= {x + up, x + down}
                if x + ".alpha" in sd:
                    loaded.add(x + ".alpha")
                patched[target] = (sd[x + up], sd[x + down])
                break
        for part in (".diff", ".diff_b"):
            if x + part in sd:
                loaded.add(x + part)
                patched.setdefault(target, None)
    return patched, sorted(set(sd) - loaded)


# --- AUTOMATIC1111 (extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis) ----------------

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _resnet_rest(rest):
    for a, b in _RESNET.items():
        if rest == a:
            return b
    return rest


def a1111_compvis_name(key):
    m = re.match(r"lora_unet_conv_in(.*)", key)
    if m:
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    m = re.match(r"lora_unet_conv_out(.*)", key)
    if m:
        return f"diffusion_model_out_2{m[1]}"
    m = re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key)
    if m:
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        rest = m[4] if m[2] == "attentions" else _resnet_rest(m[4])
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        rest = m[3] if m[1] == "attentions" else _resnet_rest(m[3])
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{rest}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        rest = m[4] if m[2] == "attentions" else _resnet_rest(m[4])
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)
    if m:
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)
    if m:
        b = int(m[1])
        return f"diffusion_model_output_blocks_{2 + b * 3}_{2 if b > 0 else 1}_conv"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    return key


def a1111_model_names(table):
    """Flattened module names A1111 assigns to the compvis model (assign_network_names_to_compvis_modules)."""
    names = {}
    for m in table.modules.values():
        if m.component == "unet":
            names["diffusion_model_" + m.ldm.replace(".", "_")] = m
        elif table.family == "sdxl" and m.component == "te1":
            names["0_transformer_" + m.name.replace(".", "_")] = m
        elif table.family == "sdxl" and m.component == "te2":
            mm = re.match(r"text_model\.encoder\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$", m.name)
            if mm:
                layer, kind, proj = mm.groups()
                base = f"1_model_transformer_resblocks_{layer}_"
                if kind == "mlp":
                    names[base + {"fc1": "mlp_c_fc", "fc2": "mlp_c_proj"}[proj]] = m
                elif proj == "out_proj":
                    names[base + "attn_out_proj"] = m
                else:  # q/k/v live in one nn.MultiheadAttention module
                    names.setdefault(base + "attn", []).append(m)
        else:
            names["transformer_" + m.name.replace(".", "_")] = m
    return names


def a1111_match(sd, table):
    """module name -> matched model module(s), and file modules that match nothing (dropped silently by A1111)."""
    model = a1111_model_names(table)
    modules = {}
    for key in sd:
        module, _, part = key.partition(".")
        modules.setdefault(module, set()).add(part)
    matched, dropped = {}, []
    for module, parts in modules.items():
        name = a1111_compvis_name(module)
        target = model.get(name)
        if target is None:
            mm = re.match(r"(.*)_([qkv]_proj)$", name)
            if mm and mm[1] in model:
                target = model[mm[1]]
        if target is None:
            target = model.get(module.replace("lora_unet", "diffusion_model"))
        if target is None:
            target = model.get(module.replace("lora_te1_text_model", "0_transformer_text_model"))
        if target is None:
            dropped.append(module)
            continue
        assert parts <= {"lora_up.weight", "lora_down.weight", "alpha"}, (module, parts)  # else A1111 aborts the file
        matched[module] = target
    return matched, dropped


CASES = [("sd15", "spo", spo_modules, 128), ("sdxl", "spo", spo_modules, 560),
         ("sd15", "kohya-default", kohya_default_modules, None), ("sdxl", "kohya-default", kohya_default_modules, None)]


@pytest.mark.parametrize("arch,label,select,count", CASES, ids=[f"{a}-{l}" for a, l, _, _ in CASES])
def test_webui_output_loads_in_comfyui_and_a1111_and_round_trips(arch, label, select, count):
    table = load_table(arch)
    modules = select(table)
    if count:
        assert len(modules) == count
    lora = random_lora(table, modules, rank=4, alpha=3.0)
    sd = to_webui(lora)

    # ComfyUI: every key consumed, each patch on the right weight with fitting shapes
    patched, not_loaded = comfy_load(sd, comfy_key_map(table))
    assert not_loaded == [], not_loaded[:5]
    assert len(patched) == len(modules)
    for m in modules:
        target = (f"diffusion_model.{m.ldm}.weight" if m.component == "unet"
                  else f"{'clip_l' if m.component == 'te1' else 'clip_g'}.transformer.{m.name}.weight")
        up, down = patched[target]
        assert up.shape[0] == m.out_features and down.flatten(1).shape[1] == m.in_features

    # A1111: every module found (none dropped silently), on the module it was made for
    matched, dropped = a1111_match(sd, table)
    assert dropped == []
    for (comp, name), lm in lora.modules.items():
        from spo_core.lora.naming import kohya_name

        target = matched[kohya_name(lm.info, table.family)]
        assert (lm.info in target) if isinstance(target, list) else target is lm.info

    # round trip webui -> diffusers -> webui: same names, same deltas
    back = read_lora(to_diffusers(read_lora(sd)))
    assert back.arch == arch and back.is_clean()
    assert_same_deltas(lora, back)
    assert set(to_webui(back)) == set(sd)


def test_a1111_rules_for_sdxl_te2_need_all_four_attention_projections():
    """A1111 applies an OpenCLIP (MHA) LoRA only if q, k, v and out are all present: our SPO/kohya sets are complete."""
    table = load_table("sdxl")
    lora = random_lora(table, kohya_default_modules(table))
    names = {m.info.name for m in lora.modules.values() if m.info.component == "te2"}
    for layer in range(32):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"text_model.encoder.layers.{layer}.self_attn.{proj}" in names
