"""The processes of a training run: which strategy they follow, joining the process group (with a collective
timeout), the all-reduce of data parallelism, and turning a lost process into a clear error.

A run is launched by `torchrun` (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT); each
process reads its place from those variables. The backend is nccl on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Literal

import torch

from dgemma.model.device import training_device
from dgemma.training.config import TrainConfig, TrainError

Resolved = Literal["single", "ddp", "fsdp"]
LAUNCH_HINT = "torchrun --nproc-per-node N -m dgemma.entrypoints.cli train ..."


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    strategy: Resolved = "single"
    timeout_s: float = 600.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one rank of a run."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_strategy(requested: str) -> tuple[Resolved, int]:
    """The strategy this process follows and the number of processes; TrainError for a launch that cannot work."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1
    if requested == "fsdp" and not launched():
        raise TrainError(f"--strategy fsdp shards the model over processes that torchrun starts: {LAUNCH_HINT}")
    if requested == "single" and world > 1:
        raise TrainError(f"--strategy single trains in one process, but torchrun started {world}; use ddp or fsdp")
    if requested == "auto":
        return ("ddp" if world > 1 else "single"), world
    return requested, world  # type: ignore[return-value]


def check_batch(cfg: TrainConfig, world: int) -> None:
    """Every process takes the same number of examples in every micro-batch."""
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TrainError(
            f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum ({world} x {cfg.grad_accum})"
        )


def init_distributed(strategy: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the launcher's process group (nccl on CUDA, gloo on the CPU) with a collective timeout of `timeout_s`;
    one process when not launched. FSDP joins a group even of one process (its device mesh needs one)."""
    resolved, world = resolve_strategy(strategy)
    if world <= 1 and resolved != "fsdp":
        return DistInfo(strategy=resolved, timeout_s=timeout_s)
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), resolved, timeout_s)


@contextmanager
def process_group(strategy: str, timeout_s: float) -> Iterator[DistInfo]:
    """`init_distributed` for the length of a run: a process group this joins is left at the end (a clean exit,
    also after an error), one that the caller had joined is kept."""
    import torch.distributed as dist

    had = dist.is_available() and dist.is_initialized()
    try:
        yield init_distributed(strategy, timeout_s)
    finally:
        if not had and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def default_device() -> str:
    """The "auto" training device: this process's GPU when there is one (under torchrun: the LOCAL_RANK-th), else
    the CPU."""
    return str(training_device("auto"))


def all_reduce(tensors: list[torch.Tensor], info: DistInfo, device: torch.device | None = None) -> None:
    """Sum `tensors` over the processes, in place, as one flat float32 message on `device` (nccl needs CUDA
    tensors; default: the first tensor's device)."""
    if info.world <= 1 or not tensors:
        return
    import torch.distributed as dist

    dev = device if device is not None else tensors[0].device
    flat = torch.cat([t.reshape(-1).float().to(dev) for t in tensors])
    dist.all_reduce(flat)
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off : off + n].view_as(t))
        off += n


def barrier(info: DistInfo) -> None:
    if info.world > 1 or info.sharded:
        import torch.distributed as dist

        dist.barrier()


def is_collective_failure(e: BaseException) -> bool:
    """A collective that failed or timed out (a peer died, hung or closed its connection), not a bug of this rank."""
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e))


@contextmanager
def peers_watched(info: DistInfo, where: Callable[[], str]) -> Iterator[None]:
    """Turn a failed collective into a TrainError that says what probably happened, and leave the process group
    (so that this process exits instead of aborting on a broken connection)."""
    try:
        yield
    except Exception as e:
        if info.world <= 1 or not is_collective_failure(e):
            raise
        import torch.distributed as dist

        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if dist.is_initialized():
            dist.destroy_process_group()
        raise TrainError(
            f"rank {info.rank} of {info.world}: a collective operation failed {where()} ({first}). Another process "
            f"probably died or stopped answering (collectives wait at most --dist-timeout {info.timeout_s:g} s). "
            "Re-run the same command to resume from the newest checkpoint."
        ) from None
