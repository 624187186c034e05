"""comfy.sd stand-in: load_lora_for_models records what it got and patches like ComfyUI
(every key that is not taken is recorded as 'lora key not loaded')."""

import comfy.lora

CALLS: list = []
NOT_LOADED: list = []


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    CALLS.append({"model": model, "clip": clip, "lora": dict(lora), "strength_model": strength_model, "strength_clip": strength_clip})
    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches, used = {}, set()
    for prefix, target in key_map.items():
        up, down = lora.get(prefix + ".lora_up.weight"), lora.get(prefix + ".lora_down.weight")
        if up is not None and down is not None:
            alpha = lora.get(prefix + ".alpha")
            patches[target] = (up, down, float(alpha) if alpha is not None else down.shape[0])
            used |= {prefix + ".lora_up.weight", prefix + ".lora_down.weight", prefix + ".alpha"}
        for part in (".diff", ".diff_b"):
            if prefix + part in lora:
                used.add(prefix + part)
    NOT_LOADED.extend(k for k in lora if k not in used)
    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    if new_model is not None:
        new_model.add_patches(patches, strength_model)
    if new_clip is not None:
        new_clip.add_patches(patches, strength_clip)
    return new_model, new_clip
