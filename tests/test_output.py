"""The output processor (dgemma/output.py): incremental text, stop strings, the cut reported to the engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgemma.engine.core import Event
from dgemma.entrypoints.output import OutputProcessor, StopText
from dgemma.text.tokenizer import IncrementalDecoder, Tokenizer

from bpe import build_bpe_tokenizer


class _Chunks:
    """A tokenizer whose token i is the byte string chunks[i]; counts the work its decode calls do."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.calls, self.ids_decoded = chunks, 0, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.calls += 1
        self.ids_decoded += len(ids)
        return b"".join(self.chunks[i] for i in ids).decode("utf-8", "replace")


def test_holds_back_partial_characters_and_stops():
    chunks = [b"ab\xc3", b"\xa9 x", b"y", b"Z"]
    asm = StopText(IncrementalDecoder(_Chunks(chunks)), stops=["xyZ"])
    got = [asm.push([0]), asm.push([1]), asm.push([2])]
    assert got == ["ab", "é ", ""]  # "\xc3" waits for its second byte; "xy" may start the stop string
    assert asm.push([3]) == "" and asm.finish() == "" and asm.text == "abé "
    assert asm.stopped and asm.tokens == [0, 1, 2, 3]
    asm = StopText(IncrementalDecoder(_Chunks(chunks)))
    assert asm.push([0]) + asm.finish() == "ab\ufffd" == asm.text


def test_stop_cuts_at_the_token_completing_it():
    chunks = [b"a", b"bS", b"TOPc", b"d"]
    asm = StopText(IncrementalDecoder(_Chunks(chunks)), stops=["STOP"])
    assert asm.push([0, 1, 2, 3]) + asm.finish() == "ab"
    assert asm.tokens == [0, 1, 2]  # the shortest prefix whose text reaches "STOP"


def test_linear_in_output_length():
    """Decoding work per token is bounded: the total ids decoded grows linearly, not quadratically (each step
    decodes its window twice; a window holds the last emitted tokens and those still held)."""
    work = {}
    for n in (200, 800):
        tok = _Chunks([b"w ", b"x", b"\xc3", b"\xa9"])
        asm = StopText(IncrementalDecoder(tok), stops=["never", "zz"])
        ids = [(0, 1, 2, 3)[i % 4] for i in range(n)]
        for k in range(0, n, 7):  # pushes of a few tokens, as the engine commits them
            asm.push(ids[k : k + 7])
        asm.finish()
        work[n], calls = tok.ids_decoded, tok.calls
        assert calls <= 2 * n + 2 and asm.text == tok.decode(ids)
    assert work[800] <= 4 * work[200] * 1.1  # 4x the tokens, ~4x the work (quadratic would be 16x)


def test_garbage_bytes_do_not_grow_the_window():
    tok = _Chunks([b"\x80"])  # a lone continuation byte: U+FFFD forever
    dec = IncrementalDecoder(tok)
    text = "".join(dec.push([0]) for _ in range(400)) + dec.flush()
    assert text == "\ufffd" * 400 and tok.ids_decoded <= 400 * 4 * (IncrementalDecoder.MAX_HELD + 1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    t = Tokenizer.from_dir(build_bpe_tokenizer(Path(tmp_path_factory.mktemp("tok"))))
    assert t is not None
    return t


def test_processor_reports_the_cut(tok: Tokenizer):
    ids = tok.encode("hello world. STOP here")
    cuts: list[int] = []
    proc = OutputProcessor(tok.incremental_decoder(), ["STOP"], lambda n: cuts.append(n) or None)
    assert proc.on_event(Event("r", "draft", [5, 6])).draft_token_ids == [5, 6]
    d = proc.on_event(Event("r", "tokens", ids))
    assert cuts == [len(proc.tokens)] and d.token_ids == proc.tokens and not d.finished
    assert tok.decode(proc.tokens).endswith("STOP") and not tok.decode(proc.tokens[:-1]).endswith("STOP")
    assert proc.on_event(Event("r", "tokens", [7])) is None  # waiting for the engine's word
    last = proc.on_event(Event("r", "finished", finish_reason="length", metrics={"x": 1}))
    assert last.finish_reason == "stop" and last.metrics == {"x": 1}
    assert d.text + last.text == "hello world. " and proc.on_event(Event("r", "tokens", [7])) is None


def test_processor_finishes_at_once_when_the_engine_can(tok: Tokenizer):
    ids = tok.encode("abc STOP")
    proc = OutputProcessor(tok.incremental_decoder(), ["STOP"], lambda n: Event("r", "finished", metrics={"n": n}))
    d = proc.on_event(Event("r", "tokens", ids))
    assert d.finished and d.finish_reason == "stop" and d.text == "abc " and d.metrics == {"n": len(proc.tokens)}
    assert proc.done


def test_processor_without_tokenizer():
    proc = OutputProcessor(None, ["x"], lambda n: None)
    d = proc.on_event(Event("r", "tokens", [1, 2]))
    assert d.text == "" and d.token_ids == [1, 2]
    assert proc.on_event(Event("r", "finished", finish_reason="length")).finish_reason == "length"
