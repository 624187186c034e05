"""comfy.model_management stand-in: CPU device, interrupt flag, load calls recorded."""

import torch

LOADED: list = []
_interrupted = False


class InterruptProcessingException(Exception):
    pass


def interrupt_current_processing(value=True):
    global _interrupted
    _interrupted = value


def processing_interrupted():
    return _interrupted


def throw_exception_if_processing_interrupted():
    global _interrupted
    if _interrupted:
        _interrupted = False
        raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False):
    LOADED.append(list(models))
    for m in models:
        m.model_load(get_torch_device())


def soft_empty_cache(force=False):
    pass


OOM_EXCEPTION = torch.cuda.OutOfMemoryError
