"""Running on several processes under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.inference import resolve_device


@dataclass
class Dist:
    """Process-group facts (single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Joins the process group torchrun describes in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_arg)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    base = resolve_device(device_arg)
    if base.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Share the cores between the local processes unless the user decided.
        if "OMP_NUM_THREADS" not in os.environ:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device


def gather(obj: list[Any], info: Dist) -> list[Any]:
    """The concatenation of every rank's ``obj`` list, in rank order (``obj`` itself on one process)."""
    if not info.enabled:
        return obj
    parts: list[list[Any] | None] = [None] * info.world
    dist.all_gather_object(parts, obj)
    return [x for part in parts for x in (part or [])]


def sync_buffers(model: nn.Module, info: Dist) -> None:
    """BatchNorm running statistics are updated locally on every rank; make rank 0's the common ones."""
    if info.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
