"""The KV cache (dgemma/model/cache.py) on its own: the sliding layers' ring buffer, the write plan, commits and
lengths, row copies and resets, the version and the attention spans, and the views (masks, in-place slots) a pass
reads it through. Keys are written by hand, each holding 1 + 100 * row + position (values the negative), so the buffer
says which slot each entry holds; expected contents and masks are written out or derived from the definitions here.
"""

from __future__ import annotations

import pytest
import torch

from dgemma import DiffusionGemma
from dgemma.model.cache import KVCache
from dgemma.model.config import tiny_config

# Layer 0 slides (2 KV heads of 8), layer 1 is full (1 KV head of 16); with no slack the ring holds window - 1 = 4.
TEXT = tiny_config(sliding_window=5).text
SLIDING, FULL = 0, 1


def _append(cache: KVCache, n_new: list[int], rows: list[int] | None = None, visible=None) -> None:
    """Append n_new[i] tokens to cache row rows[i] (default every row) as an encoder pass does: write plan, every
    layer written, commit. `visible` (R, T): tokens that take a slot but are invisible."""
    rows_l = list(range(cache.batch_size)) if rows is None else rows
    idx = None if rows is None else torch.tensor(rows)
    T, n = max(n_new), torch.tensor(n_new)
    positions = torch.tensor([[cache.host_lengths[r] + t for t in range(T)] for r in rows_l])
    keep = torch.arange(T)[None, :] < n[:, None]
    plan = cache.write_plan(positions, n, idx)
    for i, layer in enumerate(cache.layers):
        H, D = layer.k.shape[1], layer.k.shape[3]
        k = (1 + 100 * torch.tensor(rows_l)[:, None] + positions).float()[:, None, :, None].expand(-1, H, T, D)
        cache.write_layer(i, plan, k, -k, idx)
    cache.commit(plan, positions, keep if visible is None else keep & visible, n, idx)


def _ring(length: int, cap: int) -> list[int]:
    """The position each of `cap` ring entries holds after `length` tokens: the last `cap` positions, p at p % cap."""
    held = [-1] * cap
    for p in range(max(0, length - cap), length):
        held[p % cap] = p
    return held


def _held(cache: KVCache, row: int, layer: int) -> list[int]:
    """Which position each entry of a layer's buffer holds, read from the keys written by `_append` (-1: no key)."""
    L = cache.layers[layer]
    k, v = L.k[row, :, : L.cap], L.v[row, :, : L.cap]  # (Hkv, cap, D)
    assert torch.equal(v, -k) and bool((k == k[:1, :, :1]).all())  # one number per entry
    return [int(x) - 1 - 100 * row if x != 0 else -1 for x in k[0, :, 0].tolist()]


# -- layout -----------------------------------------------------------------------------------------------------------
def test_buffers_are_preallocated_per_layer_kind():
    cache = KVCache(TEXT, 2, 16)
    assert [tuple(L.k.shape) for L in cache.layers] == [(2, 2, 5, 8), (2, 1, 17, 16)]  # entries: cap + trash
    assert [L.sliding for L in cache.layers] == [True, False]
    assert cache.nbytes() == 4 * 2 * (2 * 2 * 5 * 8 + 2 * 17 * 16)
    assert KVCache(TEXT, 1, 16, slack=3).layers[SLIDING].cap == 7  # slack: entries beyond the window
    assert KVCache(TEXT, 1, 3, slack=3).layers[SLIDING].cap == 3  # never more than max_len
    assert cache.lengths.tolist() == [0, 0] and cache.host_lengths == [0, 0] and cache.version == 0
    assert all(bool((p == -1).all()) for p in cache.pos.values())
    with pytest.raises(ValueError, match="batch_size >= 1 and max_len >= 1"):
        KVCache(TEXT, 0, 16)
    with pytest.raises(ValueError, match="batch_size >= 1 and max_len >= 1"):
        KVCache(TEXT, 1, 0)


# -- the ring -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [[3, 5, 3], [1] * 11, [6, 5], [11]])
def test_ring_keeps_the_last_window_of_slots(chunks):
    """However the tokens arrive (one at a time, or a chunk longer than the ring, whose first entries would collide
    and go to trash), the sliding ring ends up holding the last cap positions, position p at entry p % cap, and the
    full layer every position at its own entry."""
    cache = KVCache(TEXT, 2, 16)
    for n in chunks:
        _append(cache, [n, max(n - 2, 0)])
    lengths = [sum(chunks), sum(max(n - 2, 0) for n in chunks)]
    assert cache.lengths.tolist() == lengths and cache.host_lengths == lengths
    for row, length in enumerate(lengths):
        ring = _ring(length, 4)
        assert _held(cache, row, SLIDING) == ring
        assert cache.pos[True][row].tolist() == ring + [-1]  # the trash entry never holds a slot
        full = list(range(length)) + [-1] * (16 - length)
        assert _held(cache, row, FULL) == full
        assert cache.pos[False][row].tolist() == full + [-1]
    assert _ring(11, 4) == [8, 9, 10, 7]  # (the helper: the last four positions, p at p % 4)


def test_write_plan():
    """Entries per layer kind for each new token; tokens beyond n_new, positions past the full buffer, and ring
    entries a later token of the same chunk would overwrite go to the trash entry (cap)."""
    cache = KVCache(TEXT, 2, 10)
    _append(cache, [3, 0])
    positions = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5]])
    plan = cache.write_plan(positions, torch.tensor([6, 2]))
    assert plan[False].tolist() == [[3, 4, 5, 6, 7, 8], [0, 1, 10, 10, 10, 10]]
    assert plan[True].tolist() == [[4, 4, 1, 2, 3, 0], [0, 1, 4, 4, 4, 4]]
    sub = cache.write_plan(torch.tensor([[0, 1, 2]]), torch.tensor([3]), torch.tensor([1]))  # row 1 only
    assert sub[False].tolist() == [[0, 1, 2]] and sub[True].tolist() == [[0, 1, 2]]
    past = cache.write_plan(torch.tensor([[9, 10], [1, 2]]), torch.tensor([2, 2]))  # slot 10 is past max_len
    assert past[False].tolist() == [[9, 10], [1, 2]]


def test_commit_records_slots_and_advances_lengths():
    cache = KVCache(TEXT, 3, 16)
    visible = torch.tensor([[False, True, True], [True, True, True]])  # row 0: a left pad
    _append(cache, [3, 2], rows=[0, 2], visible=visible)
    assert cache.lengths.tolist() == [3, 0, 2] and cache.host_lengths == [3, 0, 2]
    assert cache.pos[False][:, :4].tolist() == [[-1, 1, 2, -1], [-1, -1, -1, -1], [0, 1, -1, -1]]
    assert cache.pos[True][:, :4].tolist() == [[-1, 1, 2, -1], [-1, -1, -1, -1], [0, 1, -1, -1]]
    assert _held(cache, 0, FULL)[:3] == [0, 1, 2]  # the pad's keys are written, only never visible
    # An invisible token overwriting a ring entry leaves the entry invisible.
    _append(cache, [4], rows=[0], visible=torch.tensor([[True, True, True, False]]))
    assert cache.pos[True][0].tolist() == [4, 5, -1, 3, -1]  # entry 2 held slot 2, now slot 6: invisible
    # `host`: the host's count of new tokens per row, used instead of reading n_new back
    plan = cache.write_plan(torch.tensor([[7]]), torch.tensor([1]), torch.tensor([0]))
    cache.commit(plan, torch.tensor([[7]]), torch.tensor([[True]]), torch.tensor([1]), torch.tensor([0]), host={0: 1})
    assert cache.lengths.tolist() == [8, 0, 2] and cache.host_lengths == [8, 0, 2]


def test_copy_rows_makes_independent_copies():
    cache = KVCache(TEXT, 3, 16)
    _append(cache, [6, 2, 0])
    before, v = [L.k[1].clone() for L in cache.layers], cache.version
    cache.copy_rows(0, [2])
    assert cache.version > v
    assert cache.lengths.tolist() == [6, 2, 6] and cache.host_lengths == [6, 2, 6]
    for s in (True, False):
        assert torch.equal(cache.pos[s][2], cache.pos[s][0])
    for L, b in zip(cache.layers, before):
        assert torch.equal(L.k[2], L.k[0]) and torch.equal(L.v[2], L.v[0])
        assert torch.equal(L.k[1], b)  # other rows untouched
    assert _held(cache, 2, FULL)[:6] == [100 * (0 - 2) + p for p in range(6)]  # row 0's keys, bit for bit
    _append(cache, [3], rows=[0])  # the source moves on; the copy keeps what it had
    assert cache.host_lengths == [9, 2, 6] and cache.pos[False][2].tolist()[:7] == [0, 1, 2, 3, 4, 5, -1]
    assert cache.pos[True][2].tolist() == _ring(6, 4) + [-1]
    cache.copy_rows(1, [0, 2])  # to several rows
    assert cache.host_lengths == [2, 2, 2] and all(torch.equal(cache.pos[True][r], cache.pos[True][1]) for r in (0, 2))


def test_reset_rows_empties_them():
    cache = KVCache(TEXT, 3, 16)
    _append(cache, [6, 2, 5])
    v = cache.version
    cache.reset_rows([1])
    assert cache.version > v
    assert cache.lengths.tolist() == [6, 0, 5] and cache.host_lengths == [6, 0, 5]
    assert all(bool((p[1] == -1).all()) for p in cache.pos.values())
    assert cache.pos[False][0].tolist()[:7] == [0, 1, 2, 3, 4, 5, -1]  # other rows keep theirs
    # The old keys stay in the buffer but nothing sees them: a canvas of the reset row sees only itself.
    view = cache.decoder_masks(2)
    assert view.masks[False][1, 0, 0].tolist() == [False] * 6 + [True, True]
    _append(cache, [1], rows=[1])  # and the row fills from slot 0 again
    assert cache.pos[False][1].tolist()[:2] == [0, -1]
    cache.reset_rows()
    assert cache.lengths.tolist() == [0, 0, 0] and cache.host_lengths == [0, 0, 0]
    assert all(bool((p == -1).all()) for p in cache.pos.values())


def test_version_changes_with_the_contents_only():
    """Views built for one version stay valid until a commit, copy or reset (the engine keys its masks on it)."""
    cache = KVCache(TEXT, 2, 16, slack=4)
    versions = [cache.version]
    _append(cache, [3, 1])
    versions.append(cache.version)
    for read in (cache.kv, cache.used, cache.fits_in_place, cache.causal_view, cache.decoder_masks):
        read(1)
    cache.decoder_masks(2, in_place=True)
    cache.write_plan(torch.tensor([[3], [1]]), torch.tensor([1, 1]))
    versions.append(cache.version)
    cache.copy_rows(0, [1])
    versions.append(cache.version)
    cache.reset_rows([0])
    versions.append(cache.version)
    assert versions[1] > versions[0] and versions[2] == versions[1] and versions[4] > versions[3] > versions[2]


def test_spans_grow_with_the_longest_row():
    """The span a pass reads: the longest row's length on full layers, at most the ring on sliding ones."""
    cache = KVCache(TEXT, 2, 16)
    assert cache.used(True) == cache.used(False) == 0
    _append(cache, [3, 1])
    assert (cache.used(True), cache.used(False)) == (3, 3)
    _append(cache, [5, 1])
    assert (cache.used(True), cache.used(False)) == (4, 8)
    k, v = cache.kv(FULL)
    assert k.shape == (2, 1, 8, 16) and v.shape == k.shape
    k, _ = cache.kv(SLIDING, torch.tensor([1]), span=2)
    assert k.shape == (1, 2, 2, 8) and k[0, 0, :, 0].tolist() == [101.0, 102.0]  # row 1, slots 0 and 1


# -- views ------------------------------------------------------------------------------------------------------------
def _causal_expected(keys: list[int], queries: list[int], window: int | None, visible=None) -> list[list[bool]]:
    """Query at q sees key at p when p >= 0, p <= q and (sliding) p > q - window; an invisible query sees its own
    key (given as its column in `visible`, {query index: column})."""
    rows = []
    for t, q in enumerate(queries):
        row = [p >= 0 and p <= q and (window is None or p > q - window) for p in keys]
        if visible and t in visible:
            row[visible[t]] = True
        rows.append(row)
    return rows


def test_causal_view_with_padding_and_the_plain_case():
    cache = KVCache(TEXT, 2, 16)
    plain = cache.view(3, causal=True)  # no cache, no padding, shorter than the window: the fused causal kernel
    assert plain.masks == {True: "causal", False: "causal"} and plain.slots is None
    assert cache.view(5, causal=True).masks[True].shape == (2, 1, 5, 5)  # as long as the window: a real mask
    visible = torch.tensor([[True] * 4, [False, False, True, True]])  # row 1: two left pads
    view = cache.view(4, causal=True, visible=visible)
    for s, window in ((True, 5), (False, None)):
        assert view.masks[s][0, 0].tolist() == _causal_expected([0, 1, 2, 3], [0, 1, 2, 3], window)
        assert view.masks[s][1, 0].tolist() == _causal_expected([-1, -1, 2, 3], [0, 1, 2, 3], window, {0: 0, 1: 1})
    _append(cache, [6, 2])  # then after the cache: keys are the cached entries, then the new tokens
    view = cache.view(2, causal=True)
    ring0, ring1 = _ring(6, 4), _ring(2, 4)
    assert view.masks[True][0, 0].tolist() == _causal_expected(ring0 + [6, 7], [6, 7], 5)
    assert view.masks[True][1, 0].tolist() == _causal_expected(ring1 + [2, 3], [2, 3], 5)
    assert view.masks[False][0, 0].tolist() == _causal_expected(list(range(6)) + [6, 7], [6, 7], None)
    assert view.masks[False][1, 0].tolist() == _causal_expected([0, 1, -1, -1, -1, -1, 2, 3], [2, 3], None)


def _ragged(slack: int) -> KVCache:
    """Rows of 7 and 2 tokens; with slack 2 the ring has 6 entries: row 0's holds 6, 1, 2, 3, 4, 5 (7 tokens)."""
    cache = KVCache(TEXT, 2, 16, slack=slack)
    _append(cache, [7, 2])
    return cache


def test_decoder_view_sees_the_last_window_and_the_canvas():
    cache = _ragged(slack=2)
    assert cache.pos[True][:, :6].tolist() == [[6, 1, 2, 3, 4, 5], [0, 1, -1, -1, -1, -1]]
    view = cache.decoder_masks(3)  # concatenated: the cached entries (ring: 6, full: 7), then the canvas
    assert view.slots is None
    assert view.masks[True][:, 0, 0].tolist() == [
        [True, False, False, True, True, True] + [True] * 3,  # slots 1 and 2 are older than the last 4
        [True, True, False, False, False, False] + [True] * 3,
    ]
    assert view.masks[False][:, 0, 0].tolist() == [[True] * 10, [True, True] + [False] * 5 + [True] * 3]
    full = KVCache(TEXT, 1, 16)
    _append(full, [3])
    assert full.decoder_masks(4).masks == {True: None, False: None}  # every key visible: no mask


def test_in_place_views_put_the_new_tokens_in_their_slots():
    """In place: the canvas's (or tokens') future entries, positions % ring on sliding layers, read over the buffer's
    first span entries; the same visibility as concatenation, in buffer order."""
    cache = _ragged(slack=2)
    assert cache.fits_in_place(2) and not cache.fits_in_place(3)  # the ring has 2 entries of slack
    view = cache.decoder_masks(2, in_place=True)
    assert view.slots[True].tolist() == [[1, 2], [2, 3]] and view.slots[False].tolist() == [[7, 8], [2, 3]]
    assert view.span == {True: 6, False: 9}  # the ring, and the longest row plus the canvas
    assert view.masks[True][:, 0, 0].tolist() == [[True] * 6, [True, True, True, True, False, False]]
    assert view.masks[False][:, 0, 0].tolist() == [[True] * 9, [True] * 4 + [False] * 5]
    causal = cache.causal_view(2)
    ring = {0: [6, 7, 8, 3, 4, 5], 1: [0, 1, 2, 3, -1, -1]}  # the new tokens' positions in their slots
    assert causal.masks[True][0, 0].tolist() == _causal_expected(ring[0], [7, 8], 5)
    assert causal.masks[True][1, 0].tolist() == _causal_expected(ring[1], [2, 3], 5)
    assert causal.masks[False][1, 0].tolist() == _causal_expected([0, 1, 2, 3] + [-1] * 5, [2, 3], None)
    rounded = cache.decoder_masks(2, torch.tensor([1, 0, 1]), in_place=True, round_span=8)
    assert rounded.span == {True: 6, False: 16} and rounded.slots[False].tolist() == [[2, 3], [7, 8], [2, 3]]
    assert all(m.shape == (3, 1, 1, rounded.span[s]) for s, m in rounded.masks.items())  # always tensors
    assert rounded.masks[True][1].all() and not rounded.masks[False][1, 0, 0, 9:].any()  # padding entries masked


def test_in_place_needs_room():
    """Without a canvas of slack in the sliding ring (or room in the full layers' buffers), the view falls back to
    concatenation instead of overwriting keys the canvas attends to."""
    text = tiny_config(sliding_window=8).text
    C = 16
    cache = KVCache(text, 2, 96)
    _append(cache, [21, 13])
    assert not cache.fits_in_place(C) and cache.decoder_masks(C, in_place=True).slots is None
    full = KVCache(text, 1, 20, slack=C)
    _append(full, [8])
    assert not full.fits_in_place(C)  # 8 + 16 slots > 20


# -- through the model ----------------------------------------------------------------------------------------------
def test_wrapped_ring_attends_like_an_unbounded_buffer():
    """A model over a ring that has wrapped several times gives what it gives over a sliding buffer as long as the
    context (slack): the window masks hide every entry the ring dropped."""
    torch.manual_seed(0)
    m = DiffusionGemma(tiny_config(sliding_window=5))
    m.reset_parameters(0.2)
    m.eval()
    ring, wide = m.new_cache(2, 48), m.new_cache(2, 48, slack=48)
    assert (ring.layers[SLIDING].cap, wide.layers[SLIDING].cap) == (4, 48)
    tokens, canvas = torch.randint(0, 128, (2, 23)), torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        for chunk in (tokens[:, :9], tokens[:, 9:16], tokens[:, 16:]):
            a, b = (m.encode(chunk, c) for c in (ring, wide))
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        a, b = (m.denoise(canvas, c, masks=c.decoder_masks(16)) for c in (ring, wide))
    assert ring.host_lengths == [23, 23] and a.abs().max() > 0.1
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
