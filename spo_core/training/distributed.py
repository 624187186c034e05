"""Multi-process training (`accelerate launch --multi_gpu` or `torchrun`): process group, gathers,
and the gradient all-reduce that DDP would do.

The LoRA lives in forward hooks, not in a module whose forward the UNet calls, so wrapping
it in DistributedDataParallel would see no forward; instead the trainer all-reduces the LoRA
gradients (one flat buffer) before each optimizer step, which is what DDP computes. Pairs
and rewards are gathered with `all_gather_object` (SPO gathers its pairs the same way).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)


class Distributed:
    """Rank, world size and the few collectives the trainer needs (no-ops in one process)."""

    def __init__(self, device: torch.device | None = None):
        import torch.distributed as dist

        self.dist = dist
        self.owns_group = False
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        if dist.is_available() and not dist.is_initialized() and world_env > 1:
            backend = "nccl" if device is not None and device.type == "cuda" and dist.is_nccl_available() else "gloo"
            dist.init_process_group(backend=backend)
            self.owns_group = True
        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank)) if self.enabled else 0
        self.device = device
        if self.enabled:
            log.info("distributed training: rank %d of %d (%s)", self.rank, self.world, dist.get_backend())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _collective_device(self) -> torch.device:
        if self.enabled and self.dist.get_backend() == "nccl":
            return self.device or torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients over processes (missing grads count as zero)."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dev = self._collective_device()
        flat = torch.cat([g.reshape(-1).float().to(dev) for g in grads])
        self.dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].reshape(g.shape).to(device=p.device, dtype=p.dtype)
            offset += n

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        self.dist.all_reduce(t)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        self.dist.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        if self.enabled:
            self.dist.barrier()

    def close(self) -> None:
        if self.owns_group and self.dist.is_initialized():
            self.dist.destroy_process_group()
            self.owns_group = False
