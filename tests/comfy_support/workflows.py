"""The example workflows of `example_workflows/`: their compact descriptions, the builder that
turns them into ComfyUI's UI (litegraph) format from the nodes' own INPUT_TYPES, and the
converter back to API format that the tests validate with a real ComfyUI.

Regenerate the files (with a ComfyUI checkout, so the stock nodes' inputs are real):
    COMFYUI_PATH=... python tests/comfy_support/workflows.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "example_workflows"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SD15 = "v1-5-pruned-emaonly.safetensors"
SPO_LORA = "spo-sd-v1-5_4k-p_10ep_lora_diffusers.safetensors"
SPM = "sd-v1-5_step-aware_preference_model.bin"
FLUX = "flux1-dev.safetensors"
PROMPT = "a photo of a red fox in the snow, golden hour"
NEGATIVE = "blurry, low quality"

# node: (id, type, [x, y], {widget: value}, {input: (source id, source slot)}, title or None)
EXAMPLES: dict[str, dict] = {
    "spo_lora_ksampler": {
        "note": "Load the SPO LoRA (any format; the official diffusers file is converted on load) and sample with the "
                "stock KSampler. The report shows what matched.",
        "nodes": [
            (1, "CheckpointLoaderSimple", [20, 200], {"ckpt_name": SD15}, {}, None),
            (2, "SPOLoadLoRA", [380, 200], {"lora_name": SPO_LORA, "strength_model": 1.0, "strength_clip": 1.0,
                                            "allow_partial": False}, {"model": (1, 0), "clip": (1, 1)}, None),
            (3, "CLIPTextEncode", [760, 80], {"text": PROMPT}, {"clip": (2, 1)}, "Positive"),
            (4, "CLIPTextEncode", [760, 330], {"text": NEGATIVE}, {"clip": (2, 1)}, "Negative"),
            (5, "EmptyLatentImage", [760, 560], {"width": 512, "height": 512, "batch_size": 1}, {}, None),
            (6, "KSampler", [1140, 200], {"seed": 42, "steps": 20, "cfg": 5.0, "sampler_name": "euler_ancestral",
                                          "scheduler": "ddim_uniform", "denoise": 1.0},
             {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)}, None),
            (7, "VAEDecode", [1500, 200], {}, {"samples": (6, 0), "vae": (1, 2)}, None),
            (8, "SaveImage", [1740, 200], {"filename_prefix": "spo_lora"}, {"images": (7, 0)}, None),
            (9, "PreviewAny", [380, 520], {}, {"source": (2, 2)}, "LoRA report"),
        ],
    },
    "spo_resampler_samplercustom": {
        "note": "The per-step resampler as a SAMPLER: at every step with t <= 751, 4 candidates from the same x_t are "
                "decoded and scored by the step-aware preference model; the best one continues. The grid shows what "
                "was chosen.",
        "nodes": [
            (1, "CheckpointLoaderSimple", [20, 200], {"ckpt_name": SD15}, {}, None),
            (2, "SPOLoadScorer", [20, 420], {"scorer": "spm", "weights": SPM, "device": "auto", "dtype": "auto"}, {}, None),
            (3, "CLIPTextEncode", [380, 60], {"text": PROMPT}, {"clip": (1, 1)}, "Positive"),
            (4, "CLIPTextEncode", [380, 300], {"text": NEGATIVE}, {"clip": (1, 1)}, "Negative"),
            (5, "EmptyLatentImage", [380, 540], {"width": 512, "height": 512, "batch_size": 1}, {}, None),
            (6, "SPOPerStepResampler", [380, 720], {"prompt": PROMPT, "k": 4, "policy": "greedy", "eta": 1.0,
                                                    "window_t_min": 0, "window_t_max": 751, "score_every": 1,
                                                    "temperature": 1.0, "lookahead_steps": 0},
             {"scorer": (2, 0), "vae": (1, 2)}, None),
            (7, "BasicScheduler", [760, 560], {"scheduler": "ddim_uniform", "steps": 20, "denoise": 1.0}, {"model": (1, 0)}, None),
            (8, "SamplerCustom", [1140, 200], {"add_noise": True, "noise_seed": 42, "cfg": 5.0},
             {"model": (1, 0), "positive": (3, 0), "negative": (4, 0), "sampler": (6, 0), "sigmas": (7, 0),
              "latent_image": (5, 0)}, None),
            (9, "VAEDecode", [1500, 200], {}, {"samples": (8, 0), "vae": (1, 2)}, None),
            (10, "SaveImage", [1740, 200], {"filename_prefix": "spo_resampler"}, {"images": (9, 0)}, None),
            (11, "SPOCandidateGrid", [1140, 620], {"cell_size": 96}, {"trace": (6, 1), "samples": (8, 0)}, None),
            (12, "PreviewImage", [1500, 620], {}, {"images": (11, 0)}, "Candidates per step"),
        ],
    },
    "spo_resampling_ksampler": {
        "note": "The same resampler through the stock KSampler: SPO Resampling patches the MODEL, and the KSampler's "
                "steps, scheduler (use ddim_uniform), CFG and seed apply.",
        "nodes": [
            (1, "CheckpointLoaderSimple", [20, 200], {"ckpt_name": SD15}, {}, None),
            (2, "SPOLoadScorer", [20, 420], {"scorer": "spm", "weights": SPM, "device": "auto", "dtype": "auto"}, {}, None),
            (3, "SPOResampling", [380, 420], {"prompt": PROMPT, "k": 4, "policy": "greedy", "eta": 1.0,
                                              "window_t_min": 0, "window_t_max": 751, "score_every": 1,
                                              "temperature": 1.0, "lookahead_steps": 0},
             {"model": (1, 0), "scorer": (2, 0), "vae": (1, 2)}, None),
            (4, "CLIPTextEncode", [380, 60], {"text": PROMPT}, {"clip": (1, 1)}, "Positive"),
            (5, "CLIPTextEncode", [760, 60], {"text": NEGATIVE}, {"clip": (1, 1)}, "Negative"),
            (6, "EmptyLatentImage", [760, 300], {"width": 512, "height": 512, "batch_size": 1}, {}, None),
            (7, "KSampler", [1140, 200], {"seed": 42, "steps": 20, "cfg": 5.0, "sampler_name": "euler_ancestral",
                                          "scheduler": "ddim_uniform", "denoise": 1.0},
             {"model": (3, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)}, None),
            (8, "VAEDecode", [1500, 200], {}, {"samples": (7, 0), "vae": (1, 2)}, None),
            (9, "SaveImage", [1740, 200], {"filename_prefix": "spo_resampling"}, {"images": (8, 0)}, None),
            (10, "SPOCandidateGrid", [1140, 620], {"cell_size": 96}, {"trace": (3, 1), "samples": (7, 0)}, None),
            (11, "PreviewImage", [1500, 620], {}, {"images": (10, 0)}, "Candidates per step"),
        ],
    },
    "train_then_sample": {
        "note": "Train an SPO LoRA on the loaded SD1.5 checkpoint (no second copy), then sample with the returned "
                "MODEL. The LoRA is saved to output/loras (the stock LoRA loader lists it); cancel keeps what was "
                "trained, resume continues.",
        "nodes": [
            (1, "CheckpointLoaderSimple", [20, 200], {"ckpt_name": SD15}, {}, None),
            (2, "SPOLoadScorer", [20, 420], {"scorer": "spm", "weights": SPM, "device": "auto", "dtype": "auto"}, {}, None),
            (3, "SPOTrainLoRA", [380, 200], {
                "prompts": "a beautiful lake at dawn\na portrait of an old fisherman\na red fox in the snow\na city street at night",
                "method": "spo", "preset": "auto", "train_steps": 500, "learning_rate": 0.0, "rank": 0, "width": 0,
                "height": 0, "seed": 42, "output_name": "my_spo_lora", "resume": False, "overwrite": False,
                "mixed_precision": "auto", "gradient_checkpointing": False, "checkpoint_every": 50, "preview_every": 50,
                "sampling_steps": 20, "guidance_scale": 5.0, "k": 0, "batch_size": 0, "pair_threshold": -1.0},
             {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "scorer": (2, 0)}, None),
            (4, "CLIPTextEncode", [800, 60], {"text": PROMPT}, {"clip": (1, 1)}, "Positive"),
            (5, "CLIPTextEncode", [800, 300], {"text": NEGATIVE}, {"clip": (1, 1)}, "Negative"),
            (6, "EmptyLatentImage", [800, 540], {"width": 512, "height": 512, "batch_size": 1}, {}, None),
            (7, "KSampler", [1180, 200], {"seed": 42, "steps": 20, "cfg": 5.0, "sampler_name": "euler_ancestral",
                                          "scheduler": "ddim_uniform", "denoise": 1.0},
             {"model": (3, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)}, None),
            (8, "VAEDecode", [1540, 200], {}, {"samples": (7, 0), "vae": (1, 2)}, None),
            (9, "SaveImage", [1780, 200], {"filename_prefix": "spo_trained"}, {"images": (8, 0)}, None),
            (10, "PreviewImage", [800, 760], {}, {"images": (3, 2)}, "Loss and reward curves"),
            (11, "PreviewAny", [1180, 620], {}, {"source": (3, 3)}, "Training report"),
        ],
    },
    "train_flux_grpo": {
        "note": "Train a LoRA on the loaded FLUX.1-dev with Flow-GRPO (preset auto = grpo-flux: 6-step SDE rollouts, "
                "groups of 24 images per prompt scored by PickScore, no second copy of the model; k sets the group "
                "size), then sample with the returned MODEL. method spo trains SPO's step-wise pairs on the same "
                "rollouts. The kohya LoRA in output/loras patches every module in the stock LoRA loader.",
        "nodes": [
            (1, "UNETLoader", [20, 120], {"unet_name": FLUX, "weight_dtype": "default"}, {}, None),
            (2, "DualCLIPLoader", [20, 300], {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                              "type": "flux"}, {}, None),
            (3, "VAELoader", [20, 520], {"vae_name": "ae.safetensors"}, {}, None),
            (4, "SPOLoadScorer", [20, 680], {"scorer": "pickscore", "weights": "PickScore_v1", "device": "auto",
                                             "dtype": "auto"}, {}, None),
            (5, "SPOTrainLoRA", [400, 200], {
                "prompts": "a beautiful lake at dawn\na portrait of an old fisherman\na red fox in the snow\na city street at night",
                "method": "grpo", "preset": "auto", "train_steps": 300, "learning_rate": 0.0, "rank": 0, "width": 0,
                "height": 0, "seed": 42, "output_name": "my_flux_grpo_lora", "resume": False, "overwrite": False,
                "mixed_precision": "auto", "gradient_checkpointing": True, "checkpoint_every": 25, "preview_every": 25,
                "sampling_steps": 0, "guidance_scale": 0.0, "k": 0, "batch_size": 0, "pair_threshold": -1.0},
             {"model": (1, 0), "clip": (2, 0), "vae": (3, 0), "scorer": (4, 0)}, None),
            (6, "CLIPTextEncode", [820, 60], {"text": PROMPT}, {"clip": (2, 0)}, "Prompt"),
            (7, "FluxGuidance", [820, 300], {"guidance": 3.5}, {"conditioning": (6, 0)}, None),
            (8, "CLIPTextEncode", [820, 440], {"text": ""}, {"clip": (2, 0)}, "Negative (unused at cfg 1)"),
            (9, "EmptySD3LatentImage", [820, 640], {"width": 1024, "height": 1024, "batch_size": 1}, {}, None),
            (10, "KSampler", [1200, 200], {"seed": 42, "steps": 28, "cfg": 1.0, "sampler_name": "euler",
                                           "scheduler": "simple", "denoise": 1.0},
             {"model": (5, 0), "positive": (7, 0), "negative": (8, 0), "latent_image": (9, 0)}, None),
            (11, "VAEDecode", [1560, 200], {}, {"samples": (10, 0), "vae": (3, 0)}, None),
            (12, "SaveImage", [1800, 200], {"filename_prefix": "flux_grpo"}, {"images": (11, 0)}, None),
            (13, "PreviewImage", [820, 860], {}, {"images": (5, 2)}, "Loss, reward and KL curves"),
            (14, "PreviewAny", [1200, 620], {}, {"source": (5, 3)}, "Training report"),
        ],
    },
}


# -- widgets ---------------------------------------------------------------------------------------


def _inputs(cls) -> list[tuple[str, object, dict]]:
    types = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in (types.get(section) or {}).items():
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, kind, opts))
    return out


def _is_widget(kind, opts) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _has_control(name: str, kind, opts) -> bool:
    return kind == "INT" and bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))


def widget_names(cls) -> list[str]:
    """The widget value slots of a node as the frontend stores them ("<name>:control" after seeds)."""
    names = []
    for name, kind, opts in _inputs(cls):
        if _is_widget(kind, opts):
            names.append(name)
            if _has_control(name, kind, opts):
                names.append(f"{name}:control")
    return names


def _type_name(kind) -> str:
    return "COMBO" if isinstance(kind, list) else str(kind)


# -- build the UI format ---------------------------------------------------------------------------


def build_ui(example: dict, classes: dict) -> dict:
    nodes, links = [], []
    outputs: dict[tuple[int, int], list[int]] = {}
    types = {nid: ntype for nid, ntype, *_ in example["nodes"]}
    for nid, ntype, pos, widgets, ins, title in example["nodes"]:
        for name, (src, slot) in ins.items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, nid, name, classes[types[src]].RETURN_TYPES[slot]])
            outputs.setdefault((src, slot), []).append(link_id)
    for order, (nid, ntype, pos, widgets, ins, title) in enumerate(example["nodes"]):
        cls = classes[ntype]
        values = []
        for slot_name in widget_names(cls):
            if slot_name.endswith(":control"):
                values.append("fixed")
                continue
            if slot_name not in widgets:
                kind, opts = next((k, o) for n, k, o in _inputs(cls) if n == slot_name)
                default = opts.get("default")
                options = kind if isinstance(kind, list) else opts.get("options")
                if default is None and options:
                    default = options[0]
                widgets = {**widgets, slot_name: default}
            values.append(widgets[slot_name])
        unknown = set(widgets) - set(widget_names(cls))
        if unknown:
            raise ValueError(f"{ntype}: no widgets {sorted(unknown)}")
        node_inputs = []
        for name, kind, opts in _inputs(cls):
            if _is_widget(kind, opts):
                continue
            link = next((link[0] for link in links if link[3] == nid and link[4] == name), None)
            node_inputs.append({"name": name, "type": _type_name(kind), "link": link})
        node_outputs = []
        return_names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        for slot, (rtype, rname) in enumerate(zip(cls.RETURN_TYPES, return_names)):
            node_outputs.append({"name": rname, "type": rtype, "links": outputs.get((nid, slot), []), "slot_index": slot})
        node = {"id": nid, "type": ntype, "pos": pos, "size": [340, 60 + 26 * (len(values) + len(node_inputs))],
                "flags": {}, "order": order, "mode": 0, "inputs": node_inputs, "outputs": node_outputs,
                "properties": {"Node name for S&R": ntype}, "widgets_values": values}
        if title:
            node["title"] = title
        nodes.append(node)
    for link in links:  # name -> input slot index
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = next(i for i, x in enumerate(target["inputs"]) if x["name"] == link[4])
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"spo_note": example["note"]}, "version": 0.4}


# -- back to the API format --------------------------------------------------------------------------


def ui_to_api(workflow: dict, classes: dict) -> dict:
    """The API-format prompt the frontend would queue for a UI-format workflow."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        cls = classes[node["type"]]
        inputs = {}
        for slot_name, value in zip(widget_names(cls), node.get("widgets_values", [])):
            if not slot_name.endswith(":control"):
                inputs[slot_name] = value
        for inp in node["inputs"]:
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def load_examples() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(EXAMPLES_DIR.glob("*.json"))}


def main() -> None:  # pragma: no cover - a maintenance tool
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from comfy_support.harness import get_harness

    h = get_harness(Path(tempfile.mkdtemp()))
    EXAMPLES_DIR.mkdir(exist_ok=True)
    for name, example in EXAMPLES.items():
        wf = build_ui(example, h.nodes.NODE_CLASS_MAPPINGS)
        (EXAMPLES_DIR / f"{name}.json").write_text(json.dumps(wf, indent=2) + "\n")
        print("wrote", EXAMPLES_DIR / f"{name}.json")


if __name__ == "__main__":
    main()
