"""The KV cache: an explicit, preallocated object the encoder writes and the decoder reads.

Layout. Every row of the batch has its own sequence of *slots*; a slot's index is also the token's RoPE position.
Rows may hold different lengths (`lengths[b]` is the next free slot of row b), so requests of different sizes share
one batch without left padding. Each layer stores keys/values in a buffer of `cap` entries plus one trash entry:

- full-attention layers: `cap = max_len`, slot p lives at entry p;
- sliding layers: a ring of `cap = sliding_window - 1` entries (all the decoder and the next encoder call can see),
  slot p lives at entry p % cap, so memory stays bounded however long the context grows.

`pos[b, e]` records which slot an entry holds (-1: empty or invisible, e.g. a padding token), which is all the
attention masks need: a key is visible iff `pos >= 0` and, on sliding layers, it lies in the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgemma.model.config import TextConfig


@dataclass
class CanvasView:
    """How a pass of n new tokens per row reads the cache (from `KVCache.view`): a canvas, or tokens to encode.

    `masks[sliding]`: the boolean mask (R, 1, n or 1, keys), "causal" (a plain causal pass) or None (every key
    visible). `slots` is None when the new keys/values are concatenated after the cached ones (keys = used + n);
    otherwise, per layer kind, the buffer entries (R, n) they are written to before attending over the first `span`
    entries of the buffer in place (no copy of the cache per layer and step; the entries belong to the slots the
    tokens will occupy once committed, and the commit overwrites them)."""

    masks: dict[bool, torch.Tensor | str | None]
    slots: dict[bool, torch.Tensor] | None = None
    span: dict[bool, int] | None = None


@dataclass
class LayerKV:
    k: torch.Tensor  # (B, Hkv, cap + 1, D); entry `cap` is a trash slot for writes that must not land
    v: torch.Tensor  # (B, Hkv, cap + 1, D)
    sliding: bool

    @property
    def cap(self) -> int:
        return self.k.shape[2] - 1


class KVCache:
    """Preallocated per-layer key/value buffers plus per-row lengths (see module docstring)."""

    def __init__(
        self,
        config: TextConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        slack: int = 0,
    ):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"cache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
        self.config = config
        self.max_len = max_len
        self.window = config.sliding_window
        # The ring keeps `slack` entries beyond the window (the engine: one canvas) for keys written ahead of a commit.
        ring = max(1, min(max_len, config.sliding_window - 1 + slack))
        self.layers: list[LayerKV] = []
        # Layers of the same kind share one `pos` table: they hold the same slots.
        self.pos = {
            True: torch.full((batch_size, ring + 1), -1, dtype=torch.long, device=device),
            False: torch.full((batch_size, max_len + 1), -1, dtype=torch.long, device=device),
        }
        for i in range(config.num_hidden_layers):
            sliding = config.is_sliding(i)
            cap = ring if sliding else max_len
            shape = (batch_size, config.layer_kv_heads(i), cap + 1, config.layer_head_dim(i))
            self.layers.append(
                LayerKV(
                    torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device),
                    sliding,
                )
            )
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.host_lengths = [0] * batch_size  # the same, on the host: spans are sized without a device sync
        self.version = 0  # bumped on every change of contents, so masks can be built once and reused

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def nbytes(self) -> int:
        return sum(layer.k.numel() * layer.k.element_size() * 2 for layer in self.layers)

    def reset_rows(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Empty the given rows (all rows if None) so new requests can reuse their slots."""
        idx = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.version += 1
        self.lengths[idx] = 0
        for r in range(self.batch_size) if rows is None else torch.as_tensor(rows).tolist():
            self.host_lengths[r] = 0
        for p in self.pos.values():
            p[idx] = -1

    def copy_rows(self, src: int, dst: list[int]) -> None:
        """Make rows `dst` hold exactly what row `src` holds (a prompt prefilled once, shared by several samples)."""
        idx = torch.as_tensor(dst, dtype=torch.long, device=self.device)
        self.version += 1
        for layer in self.layers:  # (a row indexed with an int is a view of the buffer: copy it first)
            layer.k[idx] = layer.k[src].clone()
            layer.v[idx] = layer.v[src].clone()
        for p in self.pos.values():
            p[idx] = p[src].clone()
        self.lengths[idx] = self.lengths[src].clone()
        for r in dst:
            self.host_lengths[r] = self.host_lengths[src]

    @staticmethod
    def rows_of(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Rows of a per-row tensor: a view for all rows, a gathered copy for a subset."""
        return t if rows is None else t[rows]

    def used(self, sliding: bool, rows: torch.Tensor | None = None) -> int:
        """How many buffer entries can hold visible keys (the attention span over the cache): the longest row's
        length, from the host copy (no device sync). For a subset of `rows` this may exceed what those rows hold;
        the masks hide the empty entries (pos -1)."""
        n = max(self.host_lengths)
        return min(self.pos[True].shape[1] - 1, n) if sliding else n

    def kv(
        self, layer: int, rows: torch.Tensor | None = None, span: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys/values (R, Hkv, used, D) of one layer for the given rows (the first `span` entries if given)."""
        L = self.layers[layer]
        used = self.used(L.sliding, rows) if span is None else span
        if rows is None:
            return L.k[:, :, :used], L.v[:, :, :used]
        return L.k[rows, :, :used], L.v[rows, :, :used]

    # -- views -------------------------------------------------------------------------------------------------
    def view(
        self,
        n: int,
        rows: torch.Tensor | None = None,
        *,
        causal: bool,
        in_place: bool = False,
        visible: torch.Tensor | None = None,
        round_span: int | None = None,
    ) -> CanvasView:
        """How a pass of `n` new tokens at each row's next n slots reads the cache (see `CanvasView`).

        Causal (an encoder pass): a token at position q sees the keys at positions <= q, on sliding layers those
        above q - window. Bidirectional (a canvas): every token sees the whole canvas and the cached keys, on sliding
        layers the last `window - 1` (as transformers' sliding cache keeps them, whatever the canvas length).
        `visible` (R, n): tokens that take a slot but are never attended to (padding); each still sees itself, so
        no row of the softmax is empty. With `in_place` (when `fits_in_place(n)`) the new keys/values go into their
        future slots, else after the cached ones. `round_span` (in place): spans rounded up to a multiple of it and
        masks always tensors, so the shapes repeat (graphs.py). Without it a mask is None when every key is visible,
        and "causal" for a plain causal pass (no cache, no padding, shorter than the window: the fused kernel).
        """
        positions = self.rows_of(self.lengths, rows)[:, None] + torch.arange(n, device=self.device)[None, :]  # (R, n)
        padded = visible is not None and not bool(visible.all())
        new = torch.where(visible, positions, torch.full_like(positions, -1)) if padded else positions
        slots = span = None
        if in_place and self.fits_in_place(n):
            slots, span = self._slots(positions, round_span)
        masks = {}
        for sliding in (True, False):
            kpos, used = self.rows_of(self.pos[sliding], rows), self.used(sliding, rows)
            if slots is None:  # (R, used + n): the new keys after the cached ones
                kpos, own = torch.cat([kpos[:, :used], new], dim=1), used + torch.arange(n, device=self.device)
            else:  # (R, span): the buffer, the new keys in their slots
                kpos, own = kpos[:, : span[sliding]].scatter(1, slots[sliding], new), slots[sliding]
            if not causal:
                m = kpos >= 0
                if sliding:
                    m &= kpos >= (self.rows_of(self.lengths, rows)[:, None] - (self.window - 1))
                masks[sliding] = None if not round_span and bool(m.all()) else m[:, None, None, :]
            elif slots is None and used == 0 and not padded and (not sliding or n < self.window):
                masks[sliding] = "causal"
            else:
                masks[sliding] = self._causal_mask(sliding, kpos, positions, own if padded else None)
        return CanvasView(masks, slots, span)

    def _causal_mask(
        self, sliding: bool, kpos: torch.Tensor, positions: torch.Tensor, own: torch.Tensor | None
    ) -> torch.Tensor:
        """(R, 1, n, K) for queries at `positions` (R, n) over keys at `kpos` (R, K) (-1: none or invisible). With
        `own`, the column of each query's own key ((R, n) or (n,)): invisible queries see it."""
        q, k = positions[:, None, :, None], kpos[:, None, None, :]
        m = (k >= 0) & (k <= q)
        if sliding:
            m &= k > q - self.window
        if own is not None:
            m.scatter_(3, own.expand_as(positions)[:, None, :, None], True)
        return m

    def decoder_masks(
        self,
        canvas_length: int,
        rows: torch.Tensor | None = None,
        in_place: bool = False,
        round_span: int | None = None,
    ) -> CanvasView:
        """The view of a bidirectional canvas pass (`view`): the canvas sees itself and the cache."""
        return self.view(canvas_length, rows, causal=False, in_place=in_place, round_span=round_span)

    def causal_view(self, T: int, rows: torch.Tensor | None = None, round_span: int | None = None) -> CanvasView:
        """The in-place view of a causal pass of T new tokens per row (`view`; requires `fits_in_place(T)`), for
        `DiffusionGemma.encode(..., view=)`."""
        return self.view(T, rows, causal=True, in_place=True, round_span=round_span)

    def fits_in_place(self, canvas_length: int) -> bool:
        """Whether a canvas at every row's next slots can be written into the buffers without overwriting a key it
        attends to: the full layers' buffers reach that far, and the sliding ring has a canvas of slack (or the
        canvas ends before the ring wraps)."""
        end = max(self.host_lengths) + canvas_length
        ring = self.pos[True].shape[1] - 1
        return end <= self.max_len and (ring >= self.window - 1 + canvas_length or end <= ring)

    def _slots(
        self, positions: torch.Tensor, round_span: int | None
    ) -> tuple[dict[bool, torch.Tensor], dict[bool, int]]:
        """Per layer kind, the buffer entries (R, n) the tokens at `positions` (R, n) go to, and the span of entries
        a pass over them reads (rounded up to `round_span` if given)."""
        top = max(self.host_lengths) + positions.shape[1]
        if round_span:
            top = -(-top // round_span) * round_span  # entries past the longest row hold no key (pos -1): masked
        slots, span = {}, {}
        for sliding in (True, False):
            cap = self.pos[sliding].shape[1] - 1
            slots[sliding] = positions % cap if sliding else positions
            span[sliding] = min(cap, top)
        return slots, span

    # -- writes ------------------------------------------------------------------------------------------------
    def write_plan(
        self, positions: torch.Tensor, n_new: torch.Tensor, rows: torch.Tensor | None = None
    ) -> dict[bool, torch.Tensor]:
        """Buffer entry index (R, T) for each new token per layer kind; tokens that must not land go to trash."""
        plan = {}
        end = self.rows_of(self.lengths, rows) + n_new  # (R,)
        keep = torch.arange(positions.shape[1], device=positions.device)[None, :] < n_new[:, None]
        for sliding in (True, False):
            cap = self.pos[sliding].shape[1] - 1
            if sliding:  # only the last cap slots survive in the ring; earlier ones would collide
                ok = keep & (positions >= (end[:, None] - cap))
            else:
                ok = keep & (positions < cap)
            plan[sliding] = torch.where(ok, positions % cap, torch.full_like(positions, cap))
        return plan

    def write_layer(
        self,
        layer: int,
        plan: dict[bool, torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Store new keys/values (R, Hkv, T, D) of one layer at the planned entries of the given rows."""
        L = self.layers[layer]
        idx = plan[L.sliding]  # (R, T)
        if rows is None:
            idx4 = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            L.k.scatter_(2, idx4, k.to(L.k.dtype))
            L.v.scatter_(2, idx4, v.to(L.v.dtype))
        else:  # advanced indexing: (R, T) row/entry pairs select (R, T, Hkv, D) slices
            r = rows[:, None].expand_as(idx)
            L.k[r, :, idx] = k.transpose(1, 2).to(L.k.dtype)
            L.v[r, :, idx] = v.transpose(1, 2).to(L.v.dtype)

    def commit(
        self,
        plan: dict[bool, torch.Tensor],
        positions: torch.Tensor,
        visible: torch.Tensor,
        n_new: torch.Tensor,
        rows: torch.Tensor | None = None,
        host: dict[int, int] | None = None,
    ) -> None:
        """After all layers are written: record which slot each entry holds and advance the lengths. `host`: {row:
        new tokens} as the host knows them (saves reading `rows` and `n_new` back from the device)."""
        for sliding, idx in plan.items():
            cap = self.pos[sliding].shape[1] - 1
            # Entries overwritten by an invisible token become invisible: they get -1 too.
            val = torch.where(visible, positions, torch.full_like(positions, -1))
            if rows is None:
                self.pos[sliding].scatter_(1, idx, val)
            else:
                self.pos[sliding][rows[:, None].expand_as(idx), idx] = val
            self.pos[sliding][:, cap] = -1
        if rows is None:
            self.lengths += n_new
        else:
            self.lengths[rows] += n_new
        if host is None:
            host = dict(zip(range(self.batch_size) if rows is None else rows.tolist(), n_new.tolist()))
        for r, n in host.items():
            self.host_lengths[r] += n
        self.version += 1
