"""The LoRA format engine: read any LoRA, detect its format and base model, write webui /
diffusers / PEFT, extract from fine-tuned checkpoints, merge, resize.

Needs only torch, safetensors and numpy (diffusers only to rebuild the shipped tables).
"""

from .checkpoints import CheckpointReader
from .extract import ExtractReport, StateDictSource, extract_lora
from .merge import merge_into_checkpoint, merge_into_modules
from .model import DiffModule, LoRA, LoRAModule
from .read import detect_arch, read_lora
from .report import LoRAReport, report
from .resize import resize_lora
from .table_build import table_for_pipeline, table_from_models
from .tables import ALL_ARCHS, KNOWN_ARCHS, ModuleInfo, ModuleTable, load_table
from .write import FORMATS, normalize_format, save_lora, to_diffusers, to_peft, to_webui


def convert_lora(src, dst, fmt: str = "webui", dtype=None, overwrite: bool = False, arch=None,
                 allow_partial: bool = False, title: str | None = None, create_parent: bool = False) -> tuple[LoRA, LoRAReport]:
    """Read `src` (any format), refuse unusable or partial files unless allowed, write `dst` in `fmt`.

    An output that is (or contains, or lies inside) the input is refused before anything is read;
    so is a missing output folder unless `create_parent` (hosts writing into their own folders)."""
    from ..safe_io import check_output_path

    check_output_path(dst, [src], folder=normalize_format(fmt) == "peft", create_parent=create_parent)
    lora = read_lora(src, arch=arch)
    lora.require_clean(allow_partial=allow_partial, what=str(src))
    save_lora(lora, dst, fmt=fmt, dtype=dtype, overwrite=overwrite, title=title)
    return lora, report(lora, src)


__all__ = [
    "CheckpointReader", "DiffModule", "ExtractReport", "FORMATS", "ALL_ARCHS", "KNOWN_ARCHS", "LoRA", "LoRAModule", "LoRAReport",
    "ModuleInfo", "ModuleTable", "StateDictSource", "convert_lora", "detect_arch", "extract_lora", "load_table",
    "merge_into_checkpoint", "merge_into_modules", "read_lora", "report", "resize_lora", "save_lora",
    "table_for_pipeline", "table_from_models", "to_diffusers", "to_peft", "to_webui",
]
