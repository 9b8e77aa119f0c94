"""The collectives a tensor-parallel rank uses, over torch.distributed.

Two process groups: `data` (nccl on CUDA, gloo on the CPU) carries the tensors of a pass (all-reduces of partial
sums, the sampler's per-shard statistics, logits gathered to rank 0); `control` (always gloo, on the host) carries
rank 0's calls to the other ranks, with a long timeout, so that an idle worker may wait for its next call for as long
as the server stays idle.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# A collective on `data` that waits longer than this for a peer raises (a peer that died without closing its
# connections, e.g. a lost machine); environment variable DGEMMA_DIST_TIMEOUT, seconds.
DATA_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("DGEMMA_DIST_TIMEOUT", "600")))
CONTROL_TIMEOUT = datetime.timedelta(days=365)  # a worker waits for rank 0's next call as long as it takes
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (the name before torch 2.13)


@dataclass
class Comm:
    """One rank's view of the tensor-parallel group: its rank, the group size, its device, the two groups."""

    rank: int
    world: int
    device: torch.device
    data: Any  # ProcessGroup
    control: Any  # ProcessGroup (gloo)

    @property
    def backend(self) -> str:
        return dist.get_backend(self.data)

    def all_reduce(self, t: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        """`t` summed (or reduced by `op`) over the ranks, in place; returns it."""
        dist.all_reduce(t, op=op, group=self.data)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` stacked in rank order: (world, *t.shape)."""
        t = t.contiguous().view(1, *t.shape)
        out = t.new_empty(self.world, *t.shape[1:])  # the ranks' tensors joined along the first dimension
        _ALL_GATHER(out, t, group=self.data)
        return out

    def gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
        """Every rank's `t` (..., sizes[rank]) joined along the last dimension on rank 0 (..., sum(sizes)); None on the
        other ranks. Shards of unequal width travel padded to the widest."""
        width = max(sizes)
        if t.shape[-1] < width:
            t = torch.cat([t, t.new_zeros(*t.shape[:-1], width - t.shape[-1])], dim=-1)
        parts = [torch.empty_like(t) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(t.contiguous(), parts, dst=0, group=self.data)
        if parts is None:
            return None
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every rank (in place; every rank passes a tensor of the same shape and dtype)."""
        dist.broadcast(t, src=0, group=self.data)
        return t

    def send_call(self, call: Any) -> None:
        """Rank 0: hand a call (a picklable object; tensors on the host) to every other rank."""
        dist.broadcast_object_list([call], src=0, group=self.control)

    def receive_call(self) -> Any:
        """A rank other than 0: the next call rank 0 sends (blocks until it comes)."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


def connect(rank: int, world: int, device: torch.device, init_method: str) -> Comm:
    """Join the group (`init_method`: "tcp://host:port" or "env://") and make the control group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=DATA_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Comm(rank, world, device, dist.group.WORLD, control)


def disconnect() -> None:
    """Leave the group (no-op when not in one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
