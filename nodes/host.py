"""Small ComfyUI facts the nodes share: which SD model a MODEL/CLIP is, IMAGE <-> tensor
layout, progress bars, model folders and where outputs go.

ComfyUI modules are imported inside the functions: the pack's modules import anywhere (the
contract tests give them a stand-in `comfy`), and nothing is paid at ComfyUI start-up.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from spo_core.errors import ConfigError, FileMissingError, ModelMismatchError
from spo_core.progress import ProgressEvent

log = logging.getLogger(__name__)

SCORER_FOLDER = "spo_scorers"

# ComfyUI model_config class -> our architecture name (the real, full-size layouts)
_CONFIG_ARCH = {"SD15": "sd15", "SD20": "sd2", "SDXL": "sdxl"}
_CONTEXT_ARCH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
_CLIP_ARCH = {"SD1ClipModel": "sd15", "SD2ClipModel": "sd2", "SDXLClipModel": "sdxl"}
# rectified-flow text encoders (ComfyUI builds subclasses of these per loaded file): family, as SD3.5 medium and
# large (Flux dev and schnell) share them
_FLOW_CLIP_FAMILY = {"SD3ClipModel": "sd3", "FluxClipModel": "flux"}


# -- which model ---------------------------------------------------------------------------


def model_arch(model) -> str:
    """sd15 / sd2 / sdxl for a real-size SD MODEL; custom-sd1 / custom-sdxl for other UNet sizes.

    Read from the model_config class ComfyUI detected, checked against the UNet's own
    context dim and width (a fine-tune keeps both; an SSD-1B or a tiny test UNet does not).
    Raises ModelMismatchError for model families the pack does not handle (Flux, SD3...).
    """
    base = getattr(model, "model", model)
    config = getattr(base, "model_config", None)
    if config is None:
        raise ModelMismatchError("this input is not a ComfyUI MODEL (no model_config); connect a checkpoint's MODEL output")
    name = type(config).__name__
    unet = dict(getattr(config, "unet_config", {}) or {})
    ctx, width = unet.get("context_dim"), unet.get("model_channels")
    sdxl_like = name.startswith("SDXL") or bool(unet.get("adm_in_channels")) and ctx == 2048
    if name in _CONFIG_ARCH and width == 320 and _CONTEXT_ARCH.get(ctx) == _CONFIG_ARCH[name]:
        return _CONFIG_ARCH[name]
    if "transformer_depth" in unet or "model_channels" in unet:  # a UNet of the SD family, other size
        return "custom-sdxl" if sdxl_like or name in ("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B") else "custom-sd1"
    raise ModelMismatchError(
        f"this MODEL is a {name} model; the SPO nodes work with Stable Diffusion 1.5, 2.x and SDXL UNets"
    )


def clip_arch(clip) -> str | None:
    """sd15 / sd2 / sdxl for the stock SD text encoders, sd3 / flux for those of SD3 / Flux, None for anything else."""
    if clip is None:
        return None
    inner = getattr(clip, "cond_stage_model", None)
    exact = _CLIP_ARCH.get(type(inner).__name__)
    if exact is not None:
        return exact
    return next((_FLOW_CLIP_FAMILY[c.__name__] for c in type(inner).__mro__ if c.__name__ in _FLOW_CLIP_FAMILY), None)


def is_sdxl(model) -> bool:
    return model_arch(model) in ("sdxl", "custom-sdxl")


# -- IMAGE layout --------------------------------------------------------------------------


def images_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] (0..1) -> [B,3,H,W] float32 (alpha dropped, gray repeated)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ConfigError(f"expected an IMAGE batch [B,H,W,C], got {getattr(image, 'shape', type(image).__name__)}")
    x = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    return x.movedim(-1, 1).float().contiguous()


def bchw_to_images(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> ComfyUI IMAGE [B,H,W,3] float32 on the CPU."""
    return x.detach().float().clamp(0, 1).movedim(1, -1).cpu().contiguous()


def pil_to_image(pil) -> torch.Tensor:
    import numpy as np

    arr = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).unsqueeze(0)


def image_to_pil(image: torch.Tensor):
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)


# -- progress --------------------------------------------------------------------------------


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


class ComfyProgress:
    """A spo_core ProgressFn that drives ComfyUI's progress bar (and its previews), and a bar on
    the server console like the stock KSampler's.

    The bar's hook also checks for an interrupt, which makes any long operation cancellable
    from the UI; the check runs here too, for hosts without the hook.
    """

    def __init__(self, total: int, node_id: str | None = None, preview_size: int = 512):
        import comfy.utils

        from spo_core.progress import TqdmProgress

        self.bar = comfy.utils.ProgressBar(max(int(total), 1), node_id=node_id)
        self.console = TqdmProgress()
        self.preview_size = preview_size
        self.last: ProgressEvent | None = None

    def __call__(self, event: ProgressEvent) -> None:
        self.last = event
        preview = None
        if event.preview is not None:
            preview = ("JPEG", event.preview, self.preview_size)
        self.bar.update_absolute(min(event.step, event.total), max(event.total, 1), preview)
        self.console(event)
        check_interrupt()

    def close(self) -> None:
        self.console.close()


def interrupted_error():
    """ComfyUI's interrupt exception class (raised to stop a run the way the stock nodes do)."""
    import comfy.model_management

    return comfy.model_management.InterruptProcessingException


# -- folders and outputs -------------------------------------------------------------------


def register_folders() -> None:
    """`models/spo_scorers` for scorer weights, and `output/loras` as a LoRA search path."""
    try:
        import folder_paths
    except ImportError:  # imported outside ComfyUI (docs, tools): nothing to register
        return
    scorer_dir = os.path.join(folder_paths.models_dir, SCORER_FOLDER)
    if SCORER_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[SCORER_FOLDER] = ([scorer_dir], set(folder_paths.supported_pt_extensions))
    folder_paths.add_model_folder_path("loras", os.path.join(folder_paths.get_output_directory(), "loras"))
    register_comfy_tokenizer()


def register_comfy_tokenizer() -> None:
    """ComfyUI's own SD1 CLIP tokenizer files (the same BPE vocabulary): the scorers' tokenizer when
    open_clip is not installed, so the SPM works on a default ComfyUI install."""
    try:
        import comfy
    except ImportError:
        return
    from spo_core.clip_tokenizer import register_tokenizer_folder

    for folder in list(getattr(comfy, "__path__", [])):  # comfy is a namespace package: no __file__
        register_tokenizer_folder(Path(folder) / "sd1_tokenizer")


def file_list(folder: str) -> list[str]:
    import folder_paths

    try:
        return sorted(folder_paths.get_filename_list(folder))
    except KeyError:
        return []


def full_path(folder: str, name: str, what: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(folder, name) if name else None
    if path is None:
        try:
            where = ", ".join(folder_paths.get_folder_paths(folder))
        except KeyError:
            where = f"models/{folder}"
        raise FileMissingError(f"{what} '{name}' was not found in {where}; put the file there and refresh (press R)")
    return path


def scorer_weight_options() -> list[str]:
    """Files and sub-folders of every `spo_scorers` path (HF-style scorers are folders)."""
    import folder_paths

    names = set(file_list(SCORER_FOLDER))
    try:
        roots = folder_paths.get_folder_paths(SCORER_FOLDER)
    except KeyError:
        roots = []
    for root in roots:
        if os.path.isdir(root):
            for entry in os.scandir(root):
                if entry.is_dir() and not entry.name.startswith("."):
                    names.add(entry.name + "/")
    return sorted(names)


def scorer_weight_path(name: str) -> str:
    """The full path of a file or folder of `spo_scorers`; a clear error when it is missing."""
    import folder_paths

    try:
        roots = folder_paths.get_folder_paths(SCORER_FOLDER)
    except KeyError:
        roots = [os.path.join(folder_paths.models_dir, SCORER_FOLDER)]
    clean = name.rstrip("/")
    if clean and not _unsafe_name(clean):
        for root in roots:
            candidate = os.path.join(root, clean)
            if os.path.exists(candidate):
                return candidate
    raise FileMissingError(
        f"scorer weights '{name}' were not found in {', '.join(roots)}; put the file (or folder) there and refresh (press R)"
    )


def _unsafe_name(name: str) -> bool:
    return os.path.isabs(name) or ".." in Path(name).parts


_NAME_RE = re.compile(r"[^A-Za-z0-9_.\-/ ]+")


def lora_output_path(name: str, overwrite: bool = False, suffix: str = ".safetensors") -> Path:
    """`<output>/loras/<name>.safetensors`; with overwrite off, the next free `<name>_00001` etc.

    `name` may hold sub-folders inside `loras/`, never a path outside it.
    """
    import folder_paths

    clean = _NAME_RE.sub("_", (name or "").strip()).strip("/ ")
    if not clean or _unsafe_name(clean):
        raise ConfigError(f"output name {name!r} is not a valid file name inside output/loras")
    if clean.endswith(suffix):
        clean = clean[: -len(suffix)]
    root = Path(folder_paths.get_output_directory()) / "loras"
    path = root / (clean + suffix)
    if overwrite or not path.exists():
        return path
    for counter in range(1, 100000):
        candidate = root / f"{clean}_{counter:05d}{suffix}"
        if not candidate.exists():
            return candidate
    raise ConfigError(f"no free file name for {clean} in {root}")


def text_ui(text: str) -> dict[str, Any]:
    """The UI dict that shows text on a node (as the stock Preview Any does)."""
    return {"text": [text]}
