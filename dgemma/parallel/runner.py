"""The runners of a tensor-parallel group: rank 0's engine makes every call once, and every rank runs it on its shard.

- `ShardRunner` is the `Runner` of one rank over its shard of the model and its KV cache (its KV heads). It differs
  from the single-device runner only where the vocabulary is split: next-token logits (prefill, the AR step) are
  gathered on rank 0; the self-conditioning input is each rank's probabilities shard times its embedding shard,
  all-reduced into the (rows, canvas, hidden) soft embedding every rank keeps; a step with constrained rows gathers
  only those rows' logits, on rank 0, for the frontier hook (llguidance runs on the host), and hands the fixed
  positions it returns to every rank.
- `LeadRunner` is the runner rank 0's engine holds: each call goes to the other ranks first (its name and its small
  host tensors: canvases, uniforms, per-row knobs), then runs on rank 0's own shard. The cache rows the scheduler
  resets or copies are reset and copied on every rank (`SharedRows`).
- `serve_calls` is the loop of every other rank: receive a call, run it, until rank 0 says stop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from dgemma.engine.logprobs import PROMPT_CHUNK, TokenLogprob, from_logits
from dgemma.engine.runner import Runner
from dgemma.engine.sampler import StepOut
from dgemma.engine.step import Frontier, StepInputs
from dgemma.model.cache import KVCache
from dgemma.model.modeling import DiffusionGemma
from dgemma.parallel.comm import Comm
from dgemma.parallel.sampler import ShardSampler


class ShardRunner(Runner):
    """One rank's runner (see the module docstring). Every rank builds it with the same arguments, in step."""

    def __init__(self, model: DiffusionGemma, cache: KVCache, comm: Comm, sizes: list[int], **runner: Any):
        sampler = ShardSampler(comm, sum(sizes[: comm.rank]), sizes)  # sizes: every rank's vocabulary rows, in order
        super().__init__(model, cache, sampler=sampler, **runner)
        self.comm, self.sizes = comm, sizes
        agreed = torch.tensor([self.tile], device=comm.device)  # tiles must agree: every rank runs the same steps
        self.tile = int(comm.all_reduce(agreed, dist.ReduceOp.MIN))
        self.last: StepOut | None = None  # the latest step's output (its probabilities: this rank's shard)
        self.pending_soft: torch.Tensor | None = None  # a worker's self-conditioning input for its next step

    def prefill(self, rows: list[int], chunks: list[list[int]], head: bool) -> torch.Tensor | None:
        """As `Runner.prefill`; the last-token logits (R, V) on rank 0 only."""
        logits = super().prefill(rows, chunks, head)
        return None if logits is None else self.comm.gather(logits, self.sizes)

    def ar_step(self, rows: list[int], tokens: list[int]) -> torch.Tensor | None:
        """As `Runner.ar_step`; the next-token logits (R, V) on rank 0 only."""
        return self.comm.gather(super().ar_step(rows, tokens), self.sizes)

    def condition(self, rows: list[int], probs: torch.Tensor) -> None:
        """As `Runner.condition`, from this rank's probabilities shard (G, C, V_r): the partial soft embeddings of
        the ranks summed (vLLM's fix for its tensor-parallel DiffusionGemma, without ever gathering probabilities)."""
        if rows:
            soft = self.comm.all_reduce(self.model.soft_embedding(probs))
            self._soft_buffer()[torch.tensor(rows, device=soft.device)] = soft

    def denoise(
        self, rows: list[int], x: StepInputs, frontier: Frontier | None = None, constrained: list[int] | None = None
    ) -> StepOut:
        """As `Runner.denoise`. `constrained`: the positions in `rows` whose logits the frontier hook reads (None:
        no hook); `frontier` is the engine's hook, on rank 0 only."""
        hook = None if constrained is None else self._frontier(frontier, constrained)
        self.last = super().denoise(rows, x, hook)
        return self.last

    def _frontier(self, frontier: Frontier | None, constrained: list[int]) -> Frontier:
        """The step's hook on this rank: the constrained rows' logits gathered on rank 0, which runs the engine's
        hook over them; its fixed positions (R, C) broadcast to every rank."""

        def hook(logits: torch.Tensor) -> torch.Tensor:  # (R, C, V_r)
            full = self.comm.gather(logits[constrained], self.sizes)  # rank 0: (len(constrained), C, V)
            fixed = torch.empty(logits.shape[:2], dtype=torch.long, device=logits.device)
            if full is not None:
                fixed.copy_(frontier(RowsOf(full, constrained)))
            return self.comm.broadcast(fixed)

        return hook

    def probs_rows(self, pos: int, n: int) -> torch.Tensor | None:
        """The first `n` positions' probabilities (n, V) of row `pos` of the latest step, gathered on rank 0."""
        return self.comm.gather(self.last.probs[pos, :n].contiguous(), self.sizes)

    @torch.no_grad()
    def prompt_logprobs(self, token_ids: list[int], top_k: int) -> list[TokenLogprob | None] | None:
        """`logprobs.prompt_logprobs` over the shards: one causal pass in a fresh cache, the LM head `PROMPT_CHUNK`
        positions at a time, each chunk's logits gathered on rank 0 (which returns the result; None elsewhere)."""
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.model.device)
        n = ids.shape[1]
        if n == 0:
            return []
        hidden = self.model.encode(ids, self.model.new_cache(1, n))  # (1, T, hidden)
        out: list[TokenLogprob | None] = [None]
        for a in range(0, n - 1, PROMPT_CHUNK):
            b = min(a + PROMPT_CHUNK, n - 1)
            full = self.comm.gather(self.model.logits(hidden[0, a:b]), self.sizes)
            if full is not None:
                out.extend(from_logits(full, ids[0, a + 1 : b + 1], top_k))
        return out if self.comm.rank == 0 else None


class RowsOf:
    """Full-vocabulary logits (G, C, V) of some rows of a step, read as `logits[i]` by the row's position i in the
    step (what the engine's frontier hook reads: its constrained rows)."""

    def __init__(self, full: torch.Tensor, positions: list[int]):
        self.full, self.device = full, full.device
        self._at = {p: k for k, p in enumerate(positions)}

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.full[self._at[i]]


class ShardedProbs:
    """A step's probabilities (R, C, V) as rank 0's engine holds them: rank 0's shard of them, and which of the
    step's rows they stand for. A row's full distribution is gathered only where it is read (`log()`: the
    log-probabilities of a committed canvas); the self-conditioning input needs only the shards."""

    def __init__(self, lead: "LeadRunner", local: torch.Tensor, rows: list[int], n: int | None = None):
        self.lead, self.local, self.rows, self.n = lead, local, rows, n

    def __getitem__(self, key: Any) -> "ShardedProbs":
        if isinstance(key, int):  # one row (C, V)
            return ShardedProbs(self.lead, self.local, [self.rows[key]])
        if isinstance(key, slice):  # the first positions of one row
            if len(self.rows) != 1 or key.start not in (None, 0) or key.step not in (None, 1):
                raise IndexError("sharded probabilities: only [:n] of one row")
            return ShardedProbs(self.lead, self.local, self.rows, key.stop)
        return ShardedProbs(self.lead, self.local, [self.rows[int(i)] for i in key])

    def log(self) -> torch.Tensor:
        """The natural log of one row's full distribution (n, V), gathered from every rank."""
        (row,) = self.rows
        n = self.local.shape[1] if self.n is None else self.n
        return self.lead.probs_rows(row, n).log()


class SharedRows:
    """The cache-row operations of the scheduler, done on every rank's cache."""

    def __init__(self, lead: "LeadRunner", cache: KVCache):
        self.lead, self.cache = lead, cache

    def reset_rows(self, rows: list[int] | None = None) -> None:
        self.lead.send("reset_rows", rows)
        self.cache.reset_rows(rows)

    def copy_rows(self, src: int, dst: list[int]) -> None:
        self.lead.send("copy_rows", src, dst)
        self.cache.copy_rows(src, dst)


class LeadRunner:
    """Rank 0's runner: the engine's calls, sent to every rank and run on rank 0's shard (see the module docstring).
    `send(name, *args)` is the group's (`worker.Group.send`): it raises if a worker has died."""

    def __init__(self, send: Any, model: DiffusionGemma, cache: KVCache, comm: Comm, sizes: list[int], **runner: Any):
        self.send = send
        slack = model.config.canvas_length
        send("start", cache.batch_size, cache.max_len, slack, runner)
        self.shard = ShardRunner(model, cache, comm, sizes, **runner)
        self.cache = SharedRows(self, cache)
        self.stats, self.comm = self.shard.stats, comm
        self._rows: list[int] = []

    graphs = property(lambda self: self.shard.graphs)
    tile = property(lambda self: self.shard.tile)

    def describe(self) -> str:
        return f"tensor parallel over {self.comm.world} ranks ({self.comm.backend}); " + self.shard.describe()

    def static(self, rows: int) -> bool:
        return self.shard.static(rows)

    def prefill(self, rows: list[int], chunks: list[list[int]], head: bool) -> torch.Tensor | None:
        self.send("prefill", rows, chunks, head)
        return self.shard.prefill(rows, chunks, head)

    def soft_input(self, rows: list[int], has_sc: list[bool]) -> torch.Tensor | None:
        self.send("soft_input", rows, has_sc)
        return self.shard.soft_input(rows, has_sc)

    def denoise(self, rows: list[int], x: StepInputs, frontier: Frontier | None) -> StepOut:
        """One step on every rank; the probabilities of the result are `ShardedProbs`."""
        constrained = None if frontier is None else list(getattr(frontier, "rows", range(len(rows))))
        self.send("denoise", rows, _moved(dataclasses.replace(x, soft=None), "cpu"), constrained)
        out = self.shard.denoise(rows, x, frontier, constrained)
        return dataclasses.replace(out, probs=ShardedProbs(self, out.probs, list(range(len(rows)))))

    def condition(self, rows: list[int], probs: ShardedProbs) -> None:
        self.send("condition", rows, probs.rows)
        self.shard.condition(rows, _rows_of(self.shard.last.probs, probs.rows))

    def commit(self, rows: list[int], canvases: torch.Tensor, n_new: list[int]) -> None:
        self.send("commit", rows, canvases.cpu(), n_new)
        self.shard.commit(rows, canvases, n_new)

    def ar_step(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        self.send("ar_step", rows, tokens)
        return self.shard.ar_step(rows, tokens)

    def probs_rows(self, pos: int, n: int) -> torch.Tensor:
        self.send("probs_rows", pos, n)
        return self.shard.probs_rows(pos, n)

    def prompt_logprobs(self, token_ids: list[int], top_k: int) -> list[TokenLogprob | None]:
        self.send("prompt_logprobs", list(token_ids), top_k)
        return self.shard.prompt_logprobs(token_ids, top_k)


def _rows_of(probs: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """probs (R, C, V_r) at step positions `rows`: the tensor itself when that is every row in order."""
    return (
        probs
        if rows == list(range(probs.shape[0]))
        else probs[torch.tensor(rows, dtype=torch.long, device=probs.device)]
    )


def _moved(x: StepInputs, device: torch.device | str) -> StepInputs:
    """The step's inputs with their tensors on `device` (the host, to travel to the other ranks, and back)."""
    tensors = {f.name: getattr(x, f.name) for f in dataclasses.fields(x) if torch.is_tensor(getattr(x, f.name))}
    return dataclasses.replace(x, **{name: t.to(device) for name, t in tensors.items()})


def serve_calls(comm: Comm, model: DiffusionGemma, sizes: list[int]) -> None:
    """A worker's loop (ranks other than 0): run rank 0's calls on this rank's shard until it sends "stop"."""
    runner: ShardRunner | None = None
    while True:
        name, args = comm.receive_call()
        if name == "stop":
            return
        if name == "start":
            batch, max_len, slack, kwargs = args
            runner = ShardRunner(model, model.new_cache(batch, max_len, slack=slack), comm, sizes, **kwargs)
            continue
        with torch.inference_mode():  # as rank 0's engine steps
            _run(runner, name, args, comm.device)


def _run(runner: ShardRunner, name: str, args: tuple, dev: torch.device) -> None:
    """A worker runs one call of rank 0's (see `LeadRunner`); what it returns lives on rank 0."""
    if name in ("reset_rows", "copy_rows"):
        getattr(runner.cache, name)(*args)
    elif name == "soft_input":
        runner.pending_soft = runner.soft_input(*args)
    elif name == "denoise":
        rows, x, constrained = args
        runner.denoise(rows, dataclasses.replace(_moved(x, dev), soft=runner.pending_soft), None, constrained)
    elif name == "condition":
        rows, positions = args
        runner.condition(rows, _rows_of(runner.last.probs, positions))
    elif name == "commit":
        rows, canvases, n_new = args
        runner.commit(rows, canvases.to(dev), n_new)
    else:  # prefill, ar_step, probs_rows, prompt_logprobs
        getattr(runner, name)(*args)
