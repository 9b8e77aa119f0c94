"""Starting, watching and stopping the ranks of a tensor-parallel group.

On one machine (the default) `launch` starts N-1 worker processes itself (torch.multiprocessing, spawn), on a free
local port: gloo on the CPU, nccl on CUDA (rank r on cuda:r); no torchrun is needed. On the CPU the ranks share the
cores: each runs torch.get_num_threads() // N threads (rank 0's own thread count is set so too). Each rank loads
only its shard of the checkpoint (`load.load_shard`); rank 0 returns a `Group`, whose `runner` is the engine's
runner, and the workers run its calls (`runner.serve_calls`) until `Group.stop`.

On several machines, start the same command on every machine with the standard torch.distributed environment
(`torchrun --nnodes M --nproc-per-node K --rdzv-endpoint HOST:PORT ...`, or RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set by hand), with `tensor_parallel_size` = WORLD_SIZE: rank 0 serves, every other rank
runs rank 0's calls and exits when rank 0 stops (`launch` then never returns on those ranks).

Failure: a thread on rank 0 watches the worker processes it started; once one has died, the next call raises
`WorkerFailure` instead of waiting in a collective, `Group.failure` says which and how, and the `on_failure`
callbacks run (the server answers 503 on /health and exits non-zero). A rank that dies inside a collective closes
its connections, which makes the other ranks' gloo collectives raise; a lost machine is caught by the collective
timeout (`comm.DATA_TIMEOUT`).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dgemma.model.checkpoint import load_config
from dgemma.parallel import comm as comm_mod
from dgemma.parallel.plan import Plan, check

logger = logging.getLogger(__name__)
POLL_S = 0.2  # how often rank 0 looks at its workers


class WorkerFailure(RuntimeError):
    """A rank of the tensor-parallel group has died; the group cannot run any more."""


@dataclass(frozen=True)
class Spec:
    """What every rank needs to load its shard."""

    path: str
    world: int
    dtype: torch.dtype
    device_type: str
    quantization: str | None
    threads: int


def _device(spec: Spec, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if spec.device_type == "cuda" else torch.device(spec.device_type)


def _load(spec: Spec, rank: int, comm: comm_mod.Comm):
    from dgemma.parallel.load import load_shard

    model = load_shard(spec.path, rank, spec.world, comm, spec.dtype, comm.device, spec.quantization)
    comm.all_reduce(torch.zeros(1, device=comm.device))  # every rank has loaded (a failed load ends its process)
    return model


def _worker(rank: int, spec: Spec, init_method: str, local_rank: int) -> None:
    """A worker process: join the group, load this rank's shard, run rank 0's calls until it stops."""
    from dgemma.parallel.runner import serve_calls

    torch.set_num_threads(spec.threads)
    comm = comm_mod.connect(rank, spec.world, _device(spec, local_rank), init_method)
    try:
        model = _load(spec, rank, comm)
        serve_calls(comm, model, Plan(model.config.text, rank, spec.world).vocab_sizes)
    finally:
        comm_mod.disconnect()


def _spawned(rank: int, spec: Spec, init_method: str) -> None:
    """Entry point of a spawned worker (rank r on local device r)."""
    try:
        _worker(rank, spec, init_method, rank)
    except BaseException:
        logger.exception("dgemma: tensor-parallel worker %d failed", rank)
        sys.exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Group:
    """Rank 0's handle on the group: its shard of the model, the communicator, the worker processes it started."""

    def __init__(self, model: Any, comm: comm_mod.Comm, procs: list, sizes: list[int]):
        self.model, self.comm, self.procs, self.sizes = model, comm, procs, sizes
        self.failure: str | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._runners = 0  # runners made so far; the latest is the one the workers serve
        if procs:
            threading.Thread(target=self._watch, name="dgemma-tp-watch", daemon=True).start()
        atexit.register(self.stop)

    def runner(self, model: Any, cache: Any, max_batch: int, sampler_memory: int | None, graphs: Any, compile: bool):
        """The engine's runner (`engine.core.Engine(parallel=group)` calls this). The workers serve one runner: a
        newer one (another engine on this group) replaces it, and the older one refuses to run from then on."""
        from dgemma.parallel.runner import LeadRunner

        self._runners += 1
        mine = self._runners

        def send(name: str, *args: Any) -> None:
            if mine != self._runners:
                raise RuntimeError("a newer engine runs on this tensor-parallel group; this one cannot run any more")
            self.send(name, *args)

        kwargs = dict(max_batch=max_batch, sampler_memory=sampler_memory, graphs=graphs, compile=compile)
        return LeadRunner(send, model, cache, self.comm, self.sizes, **kwargs)

    def send(self, name: str, *args: Any) -> None:
        """Hand call `name` to every worker; WorkerFailure if one has died."""
        if self.failure is not None:
            raise WorkerFailure(self.failure)
        if self._stopped.is_set():
            raise WorkerFailure("the tensor-parallel group has been stopped")
        self.comm.send_call((name, args))

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Run `callback(reason)` (on the watching thread) once a worker has died."""
        self._callbacks.append(callback)
        if self.failure is not None:
            callback(self.failure)

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_S):
            dead = [(r, p.exitcode) for r, p in enumerate(self.procs, start=1) if p.exitcode is not None]
            if dead and not self._stopped.is_set():
                rank, code = dead[0]
                self.failure = f"tensor-parallel worker {rank} exited with code {code}"
                logger.error("dgemma: %s", self.failure)
                for cb in self._callbacks:
                    cb(self.failure)
                return

    def stop(self) -> None:
        """Stop the workers (each leaves its loop and exits) and leave the group; safe to call twice."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        if self.failure is None:
            try:
                self.comm.send_call(("stop", ()))
            except Exception:  # a worker already gone: nothing left to tell
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        try:
            comm_mod.disconnect()
        except Exception:  # a group with a dead member may not close cleanly; it is gone all the same
            pass


def launch(
    path: str | Path,
    world: int,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str | None = None,
) -> Group:
    """Start a group of `world` ranks over the checkpoint at `path` (see the module docstring); rank 0's `Group`.
    ShardError (one line) when the model cannot split `world` ways, before any process starts."""
    check(load_config(path).text, world)
    if dist.is_initialized():
        raise ValueError(
            "this process already belongs to a torch.distributed group (one tensor-parallel LLM per "
            "process: close() the other first)"
        )
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    threads = max(1, torch.get_num_threads() // world)  # on the CPU the ranks share the cores
    if device.type == "cpu":
        torch.set_num_threads(threads)
    spec = Spec(str(path), world, dtype, device.type, quantization, threads)
    if env_world > 1:  # started by torchrun (or by hand) on each machine
        return _launch_env(spec, env_world)
    init = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spawned, args=(r, spec, init), daemon=True) for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        comm = comm_mod.connect(0, world, device if device.type != "cuda" else _device(spec, 0), init)
        model = _load(spec, 0, comm)
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    return Group(model, comm, procs, Plan(model.config.text, 0, world).vocab_sizes)


def _launch_env(spec: Spec, env_world: int) -> Group:
    """Join a group described by the torch.distributed environment variables; ranks other than 0 never return."""
    if env_world != spec.world:
        raise ValueError(f"tensor_parallel_size {spec.world} differs from WORLD_SIZE {env_world}")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if rank != 0:
        _worker(rank, spec, "env://", local)
        raise SystemExit(0)
    comm = comm_mod.connect(0, spec.world, _device(spec, local), "env://")
    model = _load(spec, 0, comm)
    return Group(model, comm, [], Plan(model.config.text, 0, spec.world).vocab_sizes)
