"""LoRA nodes: Load SPO LoRA (any format, or extracted from a fine-tuned checkpoint),
Save / Convert SPO LoRA, Extract LoRA (from two MODELs or two checkpoint files)."""

from __future__ import annotations

import logging
import os

from spo_core.errors import ConfigError
from spo_core.lora import CheckpointReader, convert_lora, extract_lora, report, save_lora

from .host import ComfyProgress, file_list, full_path, lora_output_path, text_ui
from .lora_bridge import FileCache, ComfyWeightSource, apply_lora, read_lora_cached
from .spec import In, NodeSpec, Out, Result

log = logging.getLogger(__name__)

EXTRACT_CACHE = FileCache(2)
CHECKPOINT_FOLDERS = ("checkpoints", "diffusion_models")


def _loras() -> list[str]:
    return file_list("loras")


def _checkpoints() -> list[str]:
    names: list[str] = []
    for folder in CHECKPOINT_FOLDERS:
        names += [n for n in file_list(folder) if n not in names]
    return names


def _checkpoint_path(name: str) -> str:
    import folder_paths

    for folder in CHECKPOINT_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    return full_path(CHECKPOINT_FOLDERS[0], name, "checkpoint")


STRENGTH = dict(default=1.0, min=-100.0, max=100.0, step=0.01)
RANK = dict(default=32, min=1, max=1024, step=1)


def _strength_inputs() -> list[In]:
    return [
        In("strength_model", "FLOAT", "How strongly the LoRA changes the UNet (1 = as trained).", **STRENGTH),
        In("strength_clip", "FLOAT", "How strongly the LoRA changes the text encoder(s).", **STRENGTH),
    ]


# -- Load SPO LoRA -----------------------------------------------------------------------------


def load_spo_lora(model, lora_name: str, strength_model: float = 1.0, strength_clip: float = 1.0,
                  allow_partial: bool = False, clip=None) -> Result:
    path = full_path("loras", lora_name, "LoRA")
    lora = read_lora_cached(path)
    new_model, new_clip, text = apply_lora(model, clip, lora, strength_model, strength_clip, allow_partial, source=path)
    return Result((new_model, new_clip, text), text_ui(text))


LOAD_LORA = NodeSpec(
    "SPOLoadLoRA", "Load SPO LoRA",
    "Load a LoRA in any format (kohya/webui, diffusers as the SPO release, PEFT, old diffusers, ComfyUI) and apply "
    "it with ComfyUI's own patching. Shows what matched; refuses a LoRA for another base model, and a partial "
    "match unless allowed.",
    inputs=[
        In("model", "MODEL", "The diffusion model to apply the LoRA to."),
        In("lora_name", "COMBO", "A LoRA file from models/loras.", options=_loras),
        *_strength_inputs(),
        In("allow_partial", "BOOLEAN", "Apply the modules that match even if some keys of the file match nothing.", default=False),
        In("clip", "CLIP", "The text encoder(s); leave unconnected to patch the UNet only.", optional=True),
    ],
    outputs=[Out("MODEL", "MODEL"), Out("CLIP", "CLIP"), Out("STRING", "report", "What the file holds and what was applied.")],
    run=load_spo_lora,
)


# -- Load SPO LoRA from a fine-tuned checkpoint ---------------------------------------------------


def extracted_lora(base_path: str, tuned_path: str, rank: int, text_encoders: str, node_id: str | None = None):
    """Extract (or take from the cache) the LoRA that turns base into tuned."""
    key = FileCache.key((base_path, tuned_path), rank, text_encoders)
    hit = EXTRACT_CACHE.get(key)
    if hit is not None:
        return hit
    te = {"auto": "auto", "yes": True, "no": False}[text_encoders]
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    with CheckpointReader(base_path) as base, CheckpointReader(tuned_path) as tuned:
        total = sum(1 for _ in base.table.select(("unet",), ("attn", "ff", "proj")))
        progress = ComfyProgress(total, node_id)
        lora, rep = extract_lora(base, tuned, rank=rank, text_encoders=te, device=device, progress=progress)
    EXTRACT_CACHE.put(key, (lora, rep))
    return lora, rep


def load_lora_from_checkpoint(model, base_checkpoint: str, tuned_checkpoint: str, rank: int = 32,
                              strength_model: float = 1.0, strength_clip: float = 1.0, text_encoders: str = "auto",
                              clip=None, node_id: str | None = None) -> Result:
    base_path = _checkpoint_path(base_checkpoint)
    tuned_path = _checkpoint_path(tuned_checkpoint)
    if os.path.realpath(base_path) == os.path.realpath(tuned_path):
        raise ConfigError("the base and the fine-tuned checkpoint are the same file: there is no difference to extract")
    lora, rep = extracted_lora(base_path, tuned_path, rank, text_encoders, node_id)
    new_model, new_clip, text = apply_lora(model, clip, lora, strength_model, strength_clip, False,
                                           source=f"LoRA extracted from {tuned_checkpoint}")
    text = f"extracted at rank {rank} from {tuned_checkpoint} against {base_checkpoint}\n{rep.to_text(limit=10)}\n\n{text}"
    return Result((new_model, new_clip, text), text_ui(text))


LOAD_FROM_CHECKPOINT = NodeSpec(
    "SPOLoadLoRAFromCheckpoint", "Load SPO LoRA from Fine-tuned Checkpoint",
    "Extract a LoRA from a full fine-tuned checkpoint (e.g. the SPO-SDXL release, a full UNet) against its base "
    "checkpoint by truncated SVD, and apply it. The extraction is cached until either file changes.",
    inputs=[
        In("model", "MODEL", "The diffusion model to apply the extracted LoRA to (usually the base checkpoint)."),
        In("base_checkpoint", "COMBO", "The base model the fine-tune started from (checkpoints or diffusion_models).", options=_checkpoints),
        In("tuned_checkpoint", "COMBO", "The fine-tuned model (a full checkpoint or a bare UNet file).", options=_checkpoints),
        In("rank", "INT", "LoRA rank of the extraction (higher keeps more of the difference).", **RANK),
        *_strength_inputs(),
        In("text_encoders", "COMBO", "Extract the text encoders too: auto = only if they differ.", options=["auto", "yes", "no"], default="auto"),
        In("clip", "CLIP", "The text encoder(s); leave unconnected to patch the UNet only.", optional=True),
    ],
    outputs=[Out("MODEL", "MODEL"), Out("CLIP", "CLIP"), Out("STRING", "report")],
    run=load_lora_from_checkpoint,
    wants_node_id=True,
)


# -- Save / Convert ------------------------------------------------------------------------------


def convert_spo_lora(lora_name: str, format: str = "webui", dtype: str = "keep", output_name: str = "spo_converted",
                     allow_partial: bool = False, overwrite: bool = False) -> Result:
    src = full_path("loras", lora_name, "LoRA")
    dst = lora_output_path(output_name, overwrite, suffix="" if format == "peft" else ".safetensors")
    lora, rep = convert_lora(src, dst, fmt=format, dtype=None if dtype == "keep" else dtype, overwrite=overwrite,
                             allow_partial=allow_partial, title=dst.stem, create_parent=True)
    text = f"wrote {format} LoRA: {dst}\n{rep.to_text()}"
    return Result((str(dst), text), text_ui(text))


CONVERT_LORA = NodeSpec(
    "SPOSaveConvertLoRA", "Save / Convert SPO LoRA",
    "Convert a LoRA of any format to kohya/webui (loads in ComfyUI, the WebUI and diffusers), diffusers or PEFT, "
    "into output/loras.",
    inputs=[
        In("lora_name", "COMBO", "The LoRA file to convert (models/loras).", options=_loras),
        In("format", "COMBO", "webui = kohya keys with alphas and ss_ metadata.", options=["webui", "diffusers", "peft"], default="webui"),
        In("dtype", "COMBO", "Tensor precision of the written file.", options=["keep", "fp16", "bf16", "fp32"], default="keep"),
        In("output_name", "STRING", "File name inside output/loras (sub-folders allowed).", default="spo_converted"),
        In("allow_partial", "BOOLEAN", "Write the matching modules even if some keys match nothing.", default=False),
        In("overwrite", "BOOLEAN", "Replace an existing file of that name (otherwise a counter is added).", default=False),
    ],
    outputs=[Out("STRING", "path"), Out("STRING", "report")],
    run=convert_spo_lora,
    output_node=True,
)


# -- Extract -------------------------------------------------------------------------------------


def _save_extracted(lora, rep, output_name: str, overwrite: bool, what: str) -> Result:
    dst = lora_output_path(output_name, overwrite)
    save_lora(lora, dst, fmt="webui", overwrite=overwrite, title=dst.stem, extra_metadata={"spo_extracted_from": what})
    text = f"wrote {dst}\n{rep.to_text(limit=20)}\n{report(lora).summary_line()}"
    return Result((str(dst), text), text_ui(text))


def _energy(energy: float) -> float | None:
    return None if energy <= 0 else float(energy)


def extract_from_models(base_model, tuned_model, rank: int = 32, energy: float = 0.0, output_name: str = "spo_extracted",
                        overwrite: bool = False, base_clip=None, tuned_clip=None, node_id: str | None = None) -> Result:
    base = ComfyWeightSource(base_model, base_clip)
    tuned = ComfyWeightSource(tuned_model, tuned_clip, arch=None)
    te = bool(base_clip is not None and tuned_clip is not None)
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    total = len(base.table.select(("unet",), ("attn", "ff", "proj")))
    lora, rep = extract_lora(base, tuned, rank=rank, energy=_energy(energy), text_encoders="auto" if te else False,
                             device=device, progress=ComfyProgress(total, node_id))
    return _save_extracted(lora, rep, output_name, overwrite, "two ComfyUI models")


EXTRACT_MODELS = NodeSpec(
    "SPOExtractLoRAFromModels", "Extract LoRA (from two models)",
    "Extract the difference between two MODELs (e.g. a merge, or a checkpoint with LoRAs applied) as a kohya/webui "
    "LoRA in output/loras, by truncated SVD.",
    inputs=[
        In("base_model", "MODEL", "The base model."),
        In("tuned_model", "MODEL", "The changed model (same architecture)."),
        In("rank", "INT", "LoRA rank (the cap when energy is set).", **RANK),
        In("energy", "FLOAT", "If > 0, the smallest rank per layer keeping this fraction of the difference.", default=0.0, min=0.0, max=1.0, step=0.01),
        In("output_name", "STRING", "File name inside output/loras.", default="spo_extracted"),
        In("overwrite", "BOOLEAN", "Replace an existing file of that name.", default=False),
        In("base_clip", "CLIP", "Base text encoder(s), to extract the text encoders too.", optional=True),
        In("tuned_clip", "CLIP", "Changed text encoder(s).", optional=True),
    ],
    outputs=[Out("STRING", "path"), Out("STRING", "report")],
    run=extract_from_models,
    output_node=True,
    wants_node_id=True,
)


def extract_from_files(base_checkpoint: str, tuned_checkpoint: str, rank: int = 32, energy: float = 0.0,
                       output_name: str = "spo_extracted", overwrite: bool = False, text_encoders: str = "auto",
                       node_id: str | None = None) -> Result:
    base_path, tuned_path = _checkpoint_path(base_checkpoint), _checkpoint_path(tuned_checkpoint)
    if os.path.realpath(base_path) == os.path.realpath(tuned_path):
        raise ConfigError("the base and the fine-tuned checkpoint are the same file: there is no difference to extract")
    te = {"auto": "auto", "yes": True, "no": False}[text_encoders]
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    with CheckpointReader(base_path) as base, CheckpointReader(tuned_path) as tuned:
        total = len(base.table.select(("unet",), ("attn", "ff", "proj")))
        lora, rep = extract_lora(base, tuned, rank=rank, energy=_energy(energy), text_encoders=te, device=device,
                                 progress=ComfyProgress(total, node_id))
    return _save_extracted(lora, rep, output_name, overwrite, f"{tuned_checkpoint} - {base_checkpoint}")


EXTRACT_FILES = NodeSpec(
    "SPOExtractLoRAFromFiles", "Extract LoRA (from checkpoint files)",
    "Extract a kohya/webui LoRA from a fine-tuned checkpoint file against its base (single-file checkpoints, bare "
    "UNet files or diffusers folders), reading one tensor at a time, into output/loras.",
    inputs=[
        In("base_checkpoint", "COMBO", "The base model file.", options=_checkpoints),
        In("tuned_checkpoint", "COMBO", "The fine-tuned model file.", options=_checkpoints),
        In("rank", "INT", "LoRA rank (the cap when energy is set).", **RANK),
        In("energy", "FLOAT", "If > 0, the smallest rank per layer keeping this fraction of the difference.", default=0.0, min=0.0, max=1.0, step=0.01),
        In("output_name", "STRING", "File name inside output/loras.", default="spo_extracted"),
        In("overwrite", "BOOLEAN", "Replace an existing file of that name.", default=False),
        In("text_encoders", "COMBO", "Extract the text encoders too: auto = only if they differ.", options=["auto", "yes", "no"], default="auto"),
    ],
    outputs=[Out("STRING", "path"), Out("STRING", "report")],
    run=extract_from_files,
    output_node=True,
    wants_node_id=True,
)

SPECS = [LOAD_LORA, LOAD_FROM_CHECKPOINT, CONVERT_LORA, EXTRACT_MODELS, EXTRACT_FILES]
