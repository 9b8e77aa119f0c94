"""Training data: JSONL examples, collation into canvases, corruption, and the batch order.

All randomness of a step (corruption rates, corrupted positions and tokens, self-conditioning coins) is drawn for the
whole *global* batch from a generator seeded by (seed, step), so 1 process and N processes (or N accumulation
micro-batches) see the same batch, and a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from dgemma.training.config import TrainConfig, TrainError


@dataclass
class Example:
    """One supervised pair of token ids: the model sees `prompt` and learns `response` (EOS is appended)."""

    prompt: list[int]
    response: list[int]
    # Response positions a template will fix at inference (inpainting, e.g. Sudoku clues; index len(response) is
    # the EOS). With probability `template_prob` they are left uncorrupted, so training sees the canvases that
    # clamped inference shows the model.
    fixed: list[int] | None = None


@dataclass
class Batch:
    """Tensors for a (micro-)batch. Canvas tensors are (B, K, C) for K canvases of C tokens."""

    prompt: torch.Tensor  # (B, P) right-padded
    prompt_len: torch.Tensor  # (B,)
    canvases: torch.Tensor  # (B, K, C) clean targets, padded with pad tokens
    supervised: torch.Tensor  # (B, K, C) bool: positions in the loss (whole canvases up to the response's end)
    noisy: torch.Tensor | None = None  # (B, K, C) corrupted canvases
    self_cond: torch.Tensor | None = None  # (B,) bool
    t: torch.Tensor | None = None  # (B,) corruption rates
    fixed: torch.Tensor | None = None  # (B, K, C) bool: positions a template fixes at inference

    def to(self, device: torch.device) -> "Batch":
        """The same batch with every tensor on `device` (training on a GPU collates on the CPU)."""
        return Batch(**{f.name: None if (x := getattr(self, f.name)) is None else x.to(device) for f in fields(self)})


def load_examples(path: str | Path, tokenizer: Any | None) -> list[Example]:
    """Read a JSONL file of {"prompt", "completion"} texts, {"messages": [...]} chats (the last assistant turn is the
    response) or {"prompt_ids", "completion_ids"} token ids, each optionally with "fixed": response positions a
    template will fix at inference (see `TrainConfig.template_prob`). Errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such data file")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{path}:{n}: not JSON ({e.msg})") from None
            out.append(_example(rec, tokenizer, f"{path}:{n}"))
    if not out:
        raise TrainError(f"{path}: no examples")
    return out


def _example(rec: Any, tokenizer: Any | None, where: str) -> Example:
    if not isinstance(rec, dict):
        raise TrainError(f"{where}: expected a JSON object")
    ex = _pair(rec, tokenizer, where)
    fixed = rec.get("fixed")
    if fixed is not None:
        if not isinstance(fixed, list) or not all(isinstance(i, int) and 0 <= i <= len(ex.response) for i in fixed):
            raise TrainError(f"{where}: 'fixed' must list response positions (0..{len(ex.response)}, the last is EOS)")
        ex.fixed = fixed
    return ex


def _pair(rec: dict, tokenizer: Any | None, where: str) -> Example:
    if "prompt_ids" in rec or "completion_ids" in rec:
        p, c = rec.get("prompt_ids"), rec.get("completion_ids")
        if not (isinstance(p, list) and isinstance(c, list) and all(isinstance(t, int) for t in p + c)):
            raise TrainError(f"{where}: prompt_ids and completion_ids must both be lists of integers")
        return Example(p, c)
    if tokenizer is None:
        raise TrainError(f"{where}: text examples need a tokenizer.json next to the checkpoint")
    if "messages" in rec:
        msgs = rec["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not isinstance(msgs[-1], dict)
            or msgs[-1].get("role") != "assistant"
        ):
            raise TrainError(f"{where}: 'messages' must end with an assistant turn")
        prompt = tokenizer.encode(tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True))
        return Example(prompt, tokenizer.encode(str(msgs[-1].get("content", ""))))
    if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
        raise TrainError(f"{where}: needs string fields 'prompt' and 'completion' (or 'messages', or *_ids)")
    prompt = tokenizer.encode(rec["prompt"])
    if tokenizer.bos_token_id is not None and (not prompt or prompt[0] != tokenizer.bos_token_id):
        prompt = [tokenizer.bos_token_id] + prompt
    return Example(prompt, tokenizer.encode(rec["completion"]))


def collate(examples: Sequence[Example], canvas_length: int, pad_id: int, eos_id: int, vocab_size: int) -> Batch:
    """Pad prompts on the right and cut `response + [EOS]` into whole canvases (pad after EOS is supervised, as the
    model must learn to end; canvases wholly past the response are not)."""
    C = canvas_length
    for e in examples:
        if not e.prompt:
            raise TrainError("an example has an empty prompt (the encoder needs at least one token)")
        bad = [t for t in e.prompt + e.response if not 0 <= t < vocab_size]
        if bad:
            raise TrainError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")
    P = max(len(e.prompt) for e in examples)
    K = max(math.ceil((len(e.response) + 1) / C) for e in examples)
    B = len(examples)
    prompt = torch.full((B, P), pad_id, dtype=torch.long)
    canv = torch.full((B, K * C), pad_id, dtype=torch.long)
    sup = torch.zeros(B, K * C, dtype=torch.bool)
    fixed = torch.zeros(B, K * C, dtype=torch.bool)
    for b, e in enumerate(examples):
        prompt[b, : len(e.prompt)] = torch.tensor(e.prompt)
        r = e.response + [eos_id]
        canv[b, : len(r)] = torch.tensor(r)
        sup[b, : math.ceil(len(r) / C) * C] = True
        if e.fixed:
            if not all(0 <= i < len(r) for i in e.fixed):
                raise TrainError(f"fixed positions must index the response + EOS (0..{len(r) - 1})")
            fixed[b, e.fixed] = True
    return Batch(
        prompt,
        torch.tensor([len(e.prompt) for e in examples]),
        canv.view(B, K, C),
        sup.view(B, K, C),
        fixed=fixed.view(B, K, C) if bool(fixed.any()) else None,
    )


def corrupt(batch: Batch, vocab_size: int, cfg: TrainConfig, generator: torch.Generator) -> Batch:
    """Draw t ~ U(eps, 1) per example and replace each supervised canvas position by a uniform token with
    probability t; draw the self-conditioning coins. Draws are made for every row, in a fixed order."""
    B, K, C = batch.canvases.shape
    t = cfg.eps + (1 - cfg.eps) * torch.rand(B, generator=generator)
    u = torch.rand(B, K, C, generator=generator)
    rand_tok = torch.randint(0, vocab_size, (B, K, C), generator=generator)
    sc = torch.rand(B, generator=generator) < cfg.self_cond_prob
    replace = (u < t[:, None, None]) & batch.supervised
    if batch.fixed is not None and cfg.template_prob > 0:  # drawn last: the draws above do not change
        templated = torch.rand(B, generator=generator) < cfg.template_prob
        replace &= ~(batch.fixed & templated[:, None, None])
    batch.noisy = torch.where(replace, rand_tok, batch.canvases)
    batch.self_cond = sc
    batch.t = t
    return batch


def take(batch: Batch, idx: slice) -> Batch:
    """Rows `idx` of a batch (the prompt is trimmed to its longest row)."""
    P = int(batch.prompt_len[idx].max())

    def rows(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[idx]

    return Batch(
        batch.prompt[idx, :P],
        batch.prompt_len[idx],
        batch.canvases[idx],
        batch.supervised[idx],
        rows(batch.noisy),
        rows(batch.self_cond),
        rows(batch.t),
        rows(batch.fixed),
    )


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of global batch `step`: consecutive slices of a permutation per epoch (seeded by seed and
    epoch), a batch straddling two epochs taking the end of one and the start of the next."""
    idx: list[int] = []
    pos = step * batch_size
    while len(idx) < batch_size:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take_n = min(batch_size - len(idx), n - off)
        idx.extend(perm[off : off + take_n].tolist())
        pos += take_n
    return idx
