"""One process of a run: its device and precision, its place in a torchrun job (DDP over NCCL on CUDA, gloo on
CPU), seeding.

Under ``torchrun`` (WORLD_SIZE > 1) `setup_distributed` starts the process group from the environment
(WORLD_SIZE, RANK, LOCAL_RANK); without it the run is one process and nothing is initialised.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    #: this process started the process group (and so destroys it in `cleanup_distributed`)
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, world_size: int, local_rank: int, cuda_available: bool) -> str:
    """The device string one process uses: "auto" -> cuda:LOCAL_RANK (or cpu), "cuda" -> cuda:LOCAL_RANK.

    Under torchrun (world_size > 1) an explicit index (``cuda:1``) would put every process on that one GPU,
    so it is refused; use "cuda" or "auto" and let LOCAL_RANK pick the GPU.
    """
    if device == "auto":
        return f"cuda:{local_rank}" if cuda_available else "cpu"
    if device == "cuda":
        return f"cuda:{local_rank}"
    d = torch.device(device)
    if world_size > 1 and d.type == "cuda" and d.index is not None:
        raise ValueError(f"train.device={device!r} names one GPU, but this is one of {world_size} processes "
                         "(WORLD_SIZE > 1): every process would use that GPU. Use train.device=cuda (or auto): "
                         "each process then takes cuda:LOCAL_RANK")
    return device


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment; start the process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device, world, local_rank, torch.cuda.is_available())
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={device!r} but CUDA is not available")
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, local_rank, dev)
    if world > 1:
        if dist.is_initialized():
            if dist.get_world_size() != world:
                raise RuntimeError("a process group of another size is already initialized")
        else:
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
            info.initialized_here = True
    return info


def barrier(info: DistInfo) -> None:
    """All processes wait here. On CUDA the device is named, so NCCL does not guess one per rank."""
    if info.device.type == "cuda":
        dist.barrier(device_ids=[info.device.index])
    else:
        dist.barrier()


def cleanup_distributed(info: DistInfo, ok: bool = True) -> None:
    """After a successful run: barrier (rank 0 may still be writing files), then destroy the process group.

    After a failure (`ok` False) nothing is done: the other processes may be waiting in a collective (DDP's
    all-reduce) that this one will never join, so a barrier here would hang the whole job, and destroying an
    NCCL group can block on their pending work. The exception propagates, the process exits non-zero and
    torchrun stops the other processes.
    """
    if ok and info.initialized_here and dist.is_initialized():
        barrier(info)
        dist.destroy_process_group()


def reduce_sum(info: DistInfo, value: float) -> float:
    """`value` summed over all processes (float64 all-reduce); `value` itself in a single process."""
    if not info.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item())


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process: for code that runs outside a `DistInfo` (commands that
    start several runs, the command line's messages)."""
    return int(os.environ.get("RANK", "0")) == 0


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when `amp` (``train.amp``), the training and evaluation precision; fp32 elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bool(amp and device.type == "cuda"))
