"""Joining the `torchrun` process group, the training device, and the gradient all-reduce of data parallelism."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dgemma.model.device import training_device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the `torchrun` process group when launched by it (gloo on CPU, nccl on CUDA); 1 process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def default_device() -> str:
    """The "auto" training device: this process's GPU when there is one (under torchrun: the LOCAL_RANK-th), else
    the CPU."""
    return str(training_device("auto"))


def all_reduce(tensors: list[torch.Tensor], info: DistInfo) -> None:
    if info.world <= 1 or not tensors:
        return
    import torch.distributed as dist

    dev = tensors[0].device  # gradients live on the model's device (nccl needs CUDA tensors); others follow
    flat = torch.cat([t.reshape(-1).float().to(dev) for t in tensors])
    dist.all_reduce(flat)
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off : off + n].view_as(t))
        off += n
