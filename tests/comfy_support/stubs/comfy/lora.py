"""comfy.lora stand-in: the generic ComfyUI key names plus kohya names with LDM paths.

(The real map also has kohya names with diffusers paths; the integration tests check the nodes
against the real one.) calculate_weight applies plain lora_up/lora_down patches.
"""

import torch

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def model_lora_keys_unet(model, key_map={}):
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            base = k[len("diffusion_model."):-len(".weight")]
            key_map["diffusion_model." + base] = k
            key_map["lora_unet_" + base.replace(".", "_")] = k
    return key_map


def model_lora_keys_clip(model, key_map={}):
    sd = model.state_dict()
    for k in sd:
        if k.endswith(".weight"):
            key_map["text_encoders." + k[:-len(".weight")]] = k
    for k in sd:
        for clip, prefix in (("clip_l", "lora_te1_"), ("clip_g", "lora_te2_")):
            head = f"{clip}.transformer.text_model.encoder.layers."
            if k.startswith(head) and k.endswith(".weight"):
                rest = k[len(head):-len(".weight")]
                layer, _, module = rest.partition(".")
                if module in LORA_CLIP_MAP:
                    key_map[f"{prefix}text_model_encoder_layers_{layer}_{LORA_CLIP_MAP[module]}"] = k
                    if clip == "clip_l":
                        key_map[f"lora_te_text_model_encoder_layers_{layer}_{LORA_CLIP_MAP[module]}"] = k
    return key_map


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    for strength, value, strength_model, _offset, _fn in patches:
        up, down, alpha = value
        delta = (up.float().flatten(1) @ down.float().flatten(1)).reshape(weight.shape)
        weight = weight * strength_model + strength * (alpha / down.shape[0]) * delta
    return weight
