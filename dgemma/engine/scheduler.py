"""The scheduler: which request holds which cache row.

A fixed pool of cache rows; waiting requests are admitted in order into free rows, each into the free row whose
cached tokens are the longest prefix of its prompt (multi-turn chat reuses its conversation's row). The n samples
of one prompt are a group: the leader prefills, its followers wait in rows of their own and get copies of its cache
row when the prefill is done. Tensors are the runner's business; the scheduler only moves requests and rows.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from dgemma.engine.request import Request
from dgemma.model.cache import KVCache


class Scheduler:
    """Requests waiting for a row, the request in each row, and the tokens each row's cache holds."""

    def __init__(self, cache: KVCache, max_batch: int):
        self.cache = cache
        self.waiting: deque[Request] = deque()
        self.rows: list[Request | None] = [None] * max_batch
        self.row_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # tokens held in each cache row

    def add(self, group: list[Request]) -> None:
        """Queue a group of samples of one prompt: the first leads, the others follow its prefill."""
        group[0].followers = group[1:]
        for f in group[1:]:
            f.leader = group[0]
        self.waiting.append(group[0])

    def running(self, state: str) -> list[Request]:
        """The requests in rows, in a given state, in row order."""
        return [r for r in self.rows if r is not None and r.state == state]

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    def admit(self) -> None:
        """Place waiting groups while their whole group fits the free rows."""
        while self.waiting and self.rows.count(None) > len(self.waiting[0].followers):
            req = self.waiting.popleft()
            free = [i for i, r in enumerate(self.rows) if r is None]
            best, best_len = free[0], 0
            for i in free:  # the free row whose cached tokens are the longest proper prefix of this prompt
                toks = self.row_tokens[i]
                n = len(toks)
                if 0 < n < len(req.prompt) and n > best_len and req.prompt[:n] == toks:
                    best, best_len = i, n
            self._place(req, best, best_len, "prefill")
            for f, row in zip(req.followers, [i for i in free if i != best]):
                self._place(f, row, 0, "follow")  # waits for the leader's prefill, then copies its row

    def share_prefill(self, r: Request) -> list[Request]:
        """A prompt is prefilled: its waiting siblings get copies of its cache row. Returns them all, `r` first."""
        group, r.followers = [r] + r.followers, []
        if len(group) > 1:
            self.cache.copy_rows(r.row, [f.row for f in group[1:]])
            for f in group[1:]:
                f.prefilled, f.leader = len(f.prompt), None
                self.row_tokens[f.row] = list(self.row_tokens[r.row])
        return group

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; its row is freed at once. False if it is unknown."""
        for k, r in enumerate(self.waiting):
            if r.id == request_id:  # a waiting leader: its next sibling takes its place
                del self.waiting[k]
                if r.followers:
                    self.waiting.insert(k, _promote(r))
                return True
            if any(f.id == request_id for f in r.followers):
                r.followers = [f for f in r.followers if f.id != request_id]
                return True
        r = self.find(request_id)
        if r is not None:
            self.release(r)
        return r is not None

    def find(self, request_id: str) -> Request | None:
        """The request in a row with this id."""
        return next((r for r in self.rows if r is not None and r.id == request_id), None)

    def release(self, req: Request) -> None:
        """The request leaves its row (finished or aborted)."""
        was = req.state
        req.state = "done"
        self.rows[req.row] = None
        if req.leader is not None and req in req.leader.followers:
            req.leader.followers.remove(req)
        if was == "prefill" and req.followers:  # a leader left before its prefill: the next sibling prefills
            new = _promote(req)
            self._place(new, new.row, 0, "prefill")

    def _place(self, req: Request, row: int, reused: int, state: Literal["prefill", "follow"]) -> None:
        req.row = row
        if reused == 0:
            self.cache.reset_rows([row])
            self.row_tokens[row] = []
        req.prefilled = reused
        req.state = state
        self.rows[row] = req


def _promote(leader: Request) -> Request:
    """The first follower becomes the leader of the others."""
    new, rest = leader.followers[0], leader.followers[1:]
    new.leader, new.followers, leader.followers = None, rest, []
    for f in rest:
        f.leader = new
    return new
