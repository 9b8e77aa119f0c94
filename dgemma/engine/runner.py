"""The model runner: tensors in, tensors out, over one model and one preallocated KV cache.

Four kinds of pass: prefill (a prompt chunk per row into the cache), the denoising step (`step.denoise_step`), the
commit of converged canvases (encoded into the cache), and the AR baseline's one-token step. The denoising step
runs on exact shapes, or from static bucket-padded buffers when `graphs` is on (`graphs.StepGraphs`: CUDA graphs on
CUDA), calling the same step function either way. The runner owns the per-row self-conditioning buffer and the
reusable (rows, canvas, vocab) workspaces, whose size `sampler_memory` bounds: the engine hands it at most `tile`
rows per step call.
"""

from __future__ import annotations

from typing import Callable

import torch

from dgemma.engine.graphs import StepGraphs, bucket
from dgemma.engine.logprobs import TokenLogprob, prompt_logprobs
from dgemma.engine.sampler import StepOut
from dgemma.engine.step import Frontier, StepBuffers, StepInputs, denoise_step
from dgemma.model.cache import KVCache
from dgemma.model.experts import expert_kernel
from dgemma.model.modeling import DiffusionGemma
from dgemma.model.quant import FP8

SAMPLER_MEMORY = 1 << 30  # default byte budget of the sampler's (rows, canvas, vocab) buffers


class Runner:
    """Runs the passes of a batch of cache rows; counts them in `stats`."""

    def __init__(
        self,
        model: DiffusionGemma,
        cache: KVCache,
        max_batch: int,
        sampler_memory: int | None,
        graphs: bool | None,
        compile: bool,
        sampler: Callable | None = None,
    ):
        """`sampler`: the step's sampler where it is not `sample_step` (dgemma/parallel: a vocabulary shard's)."""
        self.model, self.cache, self.max_batch, self.sampler = model, cache, max_batch, sampler
        # V: the vocabulary rows this model holds (all of them, or a tensor-parallel rank's shard, dgemma/parallel)
        self.C, self.V = model.config.canvas_length, model.embed_tokens.weight.shape[0]
        lowp = 0 if model.dtype == torch.float32 else model.dtype.itemsize  # + a low-precision LM-head output
        self.sampler_row_bytes = self.C * self.V * (8 + lowp)  # float32 logits and probabilities per row
        if sampler_memory is None:
            sampler_memory = SAMPLER_MEMORY
            if model.device.type == "cuda":
                sampler_memory = max(sampler_memory, torch.cuda.mem_get_info(model.device)[0] // 8)
        self.tile = max(1, min(max_batch, sampler_memory // self.sampler_row_bytes))
        self.stats = {"decoder_passes": 0, "encoder_passes": 0, "steps": 0, "prefill_tokens": 0}
        self._workspace: dict[str, torch.Tensor] = {}
        self._masks: tuple[tuple, object] | None = None  # (rows, cache version) -> exact-shape canvas view
        use, capture = (model.device.type == "cuda" if graphs is None else graphs), model.device.type == "cuda"
        self.graphs = StepGraphs(model, cache, denoise_step, capture, compile, sampler) if use else None

    def describe(self) -> str:
        """Which kernels run the steps (the start-up report)."""
        w = self.model.layers[0].experts.gate_up_proj
        if w.dtype == FP8:
            kernel = "fp8 grouped" if w.device.type == "cuda" else "fp8 per-expert"
        else:
            k = self.model.config.text.top_k_experts
            with torch.no_grad():  # the choice may depend on how many canvas tokens a step carries
                one, full = (expert_kernel(w, tokens=n * self.C, top_k=k) for n in (1, self.max_batch))
            kernel = one if one == full else f"{one} (1 row), {full} ({self.max_batch} rows)"
        gib = self.tile * self.sampler_row_bytes / 2**30
        return (
            f"kernels: experts {kernel}; attention SDPA, canvas GQA folded into queries, canvas K/V in its cache "
            f"slots; sampler {self.tile} row(s) per tile ({gib:.2f} GiB of (rows, canvas, vocab) buffers); "
            f"{self.graphs.describe() if self.graphs is not None else 'steps eager on exact shapes'}"
        )

    def static(self, rows: int) -> bool:
        """Whether a step of `rows` rows runs from static buffers: graphs on, a bucket that holds the rows within
        the sampler's memory, and a canvas that fits its cache slots."""
        return self.graphs is not None and self.graphs.fits(rows) and bucket(rows) <= self.tile

    # -- passes ---------------------------------------------------------------------------------------------------
    def prefill(self, rows: list[int], chunks: list[list[int]], head: bool) -> torch.Tensor | None:
        """Encode one prompt chunk per row (right-padded); with `head`, each row's last-token logits (R, V)."""
        dev = self.model.device
        tokens = torch.zeros(len(rows), max(len(c) for c in chunks), dtype=torch.long, device=dev)
        for i, c in enumerate(chunks):
            tokens[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        n_new = torch.tensor([len(c) for c in chunks], dtype=torch.long, device=dev)
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        hidden = self.model.encode(tokens, self.cache, n_new=n_new, rows=idx, last_only=True)
        self.stats["encoder_passes"] += 1
        self.stats["prefill_tokens"] += sum(len(c) for c in chunks)
        return self.model.logits(hidden)[:, 0] if head else None

    def denoise(self, rows: list[int], x: StepInputs, frontier: Frontier | None) -> StepOut:
        """One denoising step of R <= tile rows at cache `rows`; `x.rows` and the masks are filled in here."""
        self.stats["decoder_passes"] += 1
        if self.static(len(rows)):
            return self.graphs.run(rows, x, frontier)
        R = len(rows)
        in_order = R == self.max_batch and rows == list(range(R))
        x.rows = None if in_order else torch.tensor(rows, dtype=torch.long, device=self.model.device)
        key = (tuple(rows), self.cache.version)
        if self._masks is None or self._masks[0] != key:  # masks change only when rows join/leave or the cache grows
            self._masks = key, self.cache.decoder_masks(self.C, x.rows, in_place=True)
        lowp = self.model.dtype != torch.float32
        buffers = StepBuffers(
            self._tile_buffer("logits", R, torch.float32),
            self._tile_buffer("logits_lowp", R, self.model.dtype) if lowp else None,
            self._tile_buffer("probs", R, torch.float32),
        )
        return denoise_step(self.model, self.cache, x, self._masks[1], buffers, frontier, self.sampler)

    def commit(self, rows: list[int], canvases: torch.Tensor, n_new: list[int]) -> None:
        """Encode converged canvases (R, C), the first `n_new[i]` tokens of row i, so later canvases see them."""
        if self.graphs is not None and self.graphs.fits(len(rows)):  # static shapes (graphs.py)
            self.graphs.commit(rows, canvases, n_new)
        else:
            dev = self.model.device
            idx = torch.tensor(rows, dtype=torch.long, device=dev)
            n = torch.tensor(n_new, dtype=torch.long, device=dev)
            self.model.encode(canvases, self.cache, n_new=n, rows=idx, last_only=True)
        self.stats["encoder_passes"] += 1

    def ar_step(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """Encode one token per row; next-token logits (R, V)."""
        t = torch.tensor([[tok] for tok in tokens], dtype=torch.long, device=self.model.device)
        self.stats["encoder_passes"] += 1
        if self.graphs is not None and self.graphs.fits(len(rows), tokens=1):  # static shapes (graphs.py)
            return self.graphs.decode(rows, t)
        idx = torch.tensor(rows, dtype=torch.long, device=self.model.device)
        return self.model.logits(self.model.encode(t, self.cache, rows=idx))[:, -1]

    def prompt_logprobs(self, prompt_ids: list[int], top_k: int) -> list[TokenLogprob | None]:
        """The prompt tokens' log-probabilities (`logprobs.prompt_logprobs`)."""
        return prompt_logprobs(self.model, prompt_ids, top_k)

    # -- self-conditioning --------------------------------------------------------------------------------------
    def soft_input(self, rows: list[int], has_sc: list[bool]) -> torch.Tensor | None:
        """This step's self-conditioning input (R, C, hidden): the previous step's soft embeddings, zero for rows on
        the first step of a canvas; None when no row has a previous step."""
        if not any(has_sc):
            return None
        soft = self._soft_buffer()
        for row, has in zip(rows, has_sc):
            if not has:  # a zero soft embedding is a zero signal
                soft[row].zero_()
        return soft[torch.tensor(rows, device=soft.device)]

    def condition(self, rows: list[int], probs: torch.Tensor) -> None:
        """The next step's self-conditioning input of `rows` from their probabilities (G, C, V), into the buffer.
        Only rows whose canvas goes on need one: a new canvas starts from zero."""
        if rows:
            self._soft_buffer()[torch.tensor(rows, device=probs.device)] = self.model.soft_embedding(probs)

    # -- workspaces ---------------------------------------------------------------------------------------------
    def _soft_buffer(self) -> torch.Tensor:
        """Each cache row's self-conditioning input for its next step (max_batch, C, hidden), zero at first."""
        shape = (self.max_batch, self.C, self.model.config.text.hidden_size)
        return self._buffer("soft", shape, self.model.dtype, zero=True)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
        """A persistent workspace tensor (allocated on first use)."""
        b = self._workspace.get(name)
        if b is None or b.shape != shape or b.dtype != dtype:
            b = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=self.model.device)
            self._workspace[name] = b
        return b

    def _tile_buffer(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """The first `rows` rows of a persistent (tile, C, V) workspace tensor."""
        return self._buffer(name, (self.tile, self.C, self.V), dtype)[:rows]
