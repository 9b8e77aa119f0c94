"""A constrained request's frontier on its canvas: the validated, frozen positions that grow from each step's logits.

One `ConstraintState` per constrained request (the design is in constraints.py's docstring and docs/structured.md):
`start_canvas` gives a canvas's fixed positions, `advance` extends the frontier from a denoising step's logits (the
entropy-bound rule over the run from the frontier), `next_token` picks the AR baseline's token; the budget guards
keep a completion that fits in reach. CPU-side bookkeeping: the model is untouched.
"""

from __future__ import annotations

from typing import Iterable

import torch

from dgemma.structured.constraints import Guide

GUARD_MARGIN = 32  # see ConstraintState._guarded
CLOSING_SLACK = 8  # spare tokens kept when a closing path is forced: one token can lengthen it by several


class ConstraintState:
    """One request's constrained decoding, end to end: its matcher, the frontier in the current canvas, the budget.

    The engine's side is small (as vLLM's scheduler asks its structured-output manager for a token mask): per canvas
    `start_canvas` gives the canvas's fixed positions; per denoising step `advance` extends the frontier from the
    row's logits (before the sampler consumes them) and writes the validated tokens into those fixed positions, and
    `canvas_complete` says when the canvas may be committed; in AR mode `next_token` picks each token. `produced` is
    the number of tokens the request has already output. A resource limit tripping mid-way raises ConstraintError:
    the engine ends that request, the batch goes on.
    """

    def __init__(self, guide: Guide, max_new_tokens: int, eos: Iterable[int], generator: torch.Generator):
        self.guide = guide
        self.max_new_tokens = max_new_tokens
        self.eos = set(eos)
        self.generator = generator  # the request's own: constrained draws stay independent of the batch
        self.fixed: torch.Tensor | None = None  # (C,) validated tokens of this canvas before the frontier, -1 after
        self.frontier = 0  # canvas positions [0, frontier) are validated and frozen
        self.out_of_budget = False  # the request used its whole max_new_tokens
        self.pending: list[int] = []  # a forced closing path, placed before anything else
        # The shortest complete output: the closing margin is never below it, so the budget is watched early
        # enough to finish even a structure that starts from scratch (e.g. another tool call).
        path = guide.closing_path(max_new_tokens)
        self.shortest = len(path) if path is not None else 0
        self.closing_len: int | None = None if path is None else len(path)  # the last closing path's length

    @property
    def finished(self) -> bool:
        """The grammar is complete."""
        return self.guide.finished

    @property
    def canvas_complete(self) -> bool:
        """The frontier reached the canvas end, or the budget ran out: the canvas is ready to commit."""
        return self.out_of_budget or (self.fixed is not None and self.frontier >= len(self.fixed))

    def start_canvas(self, canvas_length: int, device: torch.device | str) -> torch.Tensor:
        """A new canvas: the frontier restarts at 0 (the matcher carries over). Returns its fixed positions (C,),
        which `advance` fills in place."""
        self.fixed = torch.full((canvas_length,), -1, dtype=torch.long, device=device)
        self.frontier = 0
        return self.fixed

    def advance(self, logits: torch.Tensor, temperature: float, bound: float, produced: int) -> None:
        """Extend the frontier by one entropy-bounded run of grammar-valid tokens (at least one) sampled from the
        canvas logits (C, V); forced tokens are placed for free."""
        C, g = len(self.fixed), self.guide
        taken, h_sum, h_max = 0, 0.0, 0.0
        while self.frontier < C and not self.out_of_budget:
            left = self.max_new_tokens - produced - self.frontier
            if left <= 0:
                self.out_of_budget = True
                break
            if g.finished:  # complete: the rest of the canvas is EOS, which ends the request
                self.fixed[self.frontier :] = min(self.eos)
                self.frontier = C
                break
            forced = self._next_forced(left)
            if forced:
                self._place_forced(forced[: C - self.frontier])
                continue
            tok, h = self._sample(logits[self.frontier], temperature)
            if taken and h_sum + h - max(h_max, h) > bound:
                break  # the entropy-bound rule, over the contiguous run from the frontier
            tok = self._within_budget(tok, left)
            g.consume(tok)
            taken, h_sum, h_max = taken + 1, h_sum + h, max(h_max, h)
            if not (g.finished and tok in self.eos):  # an EOS that completes the grammar is filled in above
                self._place(tok)

    def next_token(self, logits: torch.Tensor, temperature: float, produced: int) -> int:
        """The AR baseline under a constraint: the next token from next-token logits (V,), masked (greedy or
        sampled), or forced (closing when the budget runs short); consumed by the matcher."""
        left = self.max_new_tokens - produced
        forced = self._next_forced(left)
        # Only the first forced token: the rest of a forced run is forced again at the next step.
        tok = forced[0] if forced else self._within_budget(self._sample(logits, temperature)[0], left)
        self.guide.consume(tok)
        return tok

    def _place(self, token: int) -> None:
        self.fixed[self.frontier] = token
        self.frontier += 1

    def _place_forced(self, tokens: list[int]) -> None:
        for t in tokens:
            self.guide.consume(t)
            if self.guide.finished and t in self.eos:
                break
            self._place(t)

    def _closing_margin(self) -> int:
        """Tokens left below which the request watches for the point where it must close."""
        return max(8, min(64, self.max_new_tokens // 4), self.shortest + CLOSING_SLACK)

    def _next_forced(self, left: int) -> list[int]:
        """Tokens to place without sampling: a pending closing path, or what the grammar forces. A short completion
        is searched when `_should_search` says; once it only just fits, it is forced."""
        if not self.pending and left <= self._closing_margin() and self.guide.m.is_accepting():
            return [min(self.eos)]  # it may end here: do not start what the budget may not finish
        if not self.pending and self._should_search(left):
            path = self.guide.closing_path(left)
            if path is not None and len(path) + CLOSING_SLACK >= left:
                self.pending = path
            self.closing_len = None if path is None else len(path)
        if self.pending:
            return [self.pending.pop(0)]
        return self.guide.forced()

    def _should_search(self, left: int) -> bool:
        """When to look for a closing path, `left` tokens before the budget ends: at every token once the last
        path found comes within twice the slack; every 8 tokens within the closing margin or twice the last path's
        length, or after a search found nothing; else every 32 tokens from the start, so that a completion that
        grew long mid-way (a nested object with required fields) is seen in time."""
        known = self.closing_len
        if known is not None and left <= known + 2 * CLOSING_SLACK:
            return True
        if known is None or left <= max(self._closing_margin(), 2 * known + CLOSING_SLACK):
            return left % 8 == 0
        return left % 32 == 0

    def _within_budget(self, token: int, left: int) -> int:
        """`token`, unless the budget is close (`_guarded`) and no closing path fits after it: then the first token of
        a closing path from here, the rest of which is placed next. One token can lengthen the shortest completion
        by many (a `,` that opens another item with required fields, the name of a long tool), more than any fixed
        slack. A token after which the same tokens are allowed as before (string contents) is not searched: it
        changes the completion by a token at most, which the slack and the searches of `_next_forced` cover."""
        if token in self.eos or not self._guarded(left):
            return token
        m = self.guide.m
        before = m.compute_bitmask()
        if not m.consume_token(token):
            return token  # the matcher refuses it: consuming it reports the error
        try:
            same = m.compute_bitmask() == before
            after = None if same else self.guide.closing_path(left - 1)
        finally:
            m.rollback(1)
        if after is not None:
            self.closing_len = len(after) + 1
        if same or after is not None:
            return token
        path = self.guide.closing_path(left)
        if path is None:
            return token  # nothing fits either way: the request ends with "length"
        self.pending = path[1:]
        return path[0]

    def _guarded(self, left: int) -> bool:
        """Whether sampled tokens are checked against the budget: in the second half of the budget, and from twice
        the last closing path's length plus `GUARD_MARGIN` on. Not after a search found nothing (every check would
        fail too)."""
        known = self.closing_len
        return known is not None and left <= max(2 * known + GUARD_MARGIN, self.max_new_tokens // 2)

    def _sample(self, logits: torch.Tensor, temperature: float) -> tuple[int, float]:
        """A token from `logits` (V,) masked to what the grammar allows, and the masked distribution's entropy (the
        acceptance rule's input)."""
        x = logits.float() / max(temperature, 1e-6)
        x = x.masked_fill(~self.guide.allowed().to(x.device), float("-inf"))
        logp = torch.log_softmax(x, dim=-1)
        p = logp.exp()
        entropy = float(-(p * logp.masked_fill(p == 0, 0)).sum())
        if temperature <= 0:
            return int(x.argmax()), entropy
        return int(torch.multinomial(p, 1, generator=self.generator)), entropy
