"""Output processing: one request's engine events -> text deltas, shared by `LLM` and the server.

Committed token ids are detokenised incrementally (`tokenizer.IncrementalDecoder`: a small sliding window, so the
work is linear in the output length), text that may still become a stop string is held back, and at the first stop
string the tokens are cut to the shortest prefix whose text reaches it. The cut is reported back to the engine
through a `finish_request(n_tokens)` callable, so the request ends with exactly the tokens the text came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Union

from dgemma.text.chat import ChatPrompt, output_decoder
from dgemma.text.chat_output import ChatMessage, ChatOutputParser

if TYPE_CHECKING:
    from dgemma.engine.core import Event
    from dgemma.text.json_tools import JsonCallParser
    from dgemma.text.tokenizer import IncrementalDecoder, Tokenizer

ChatParser = Union[ChatOutputParser, "JsonCallParser"]


@dataclass
class Delta:
    """What one event adds: committed text and tokens, or a draft canvas; `finish_reason` on the last delta."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    draft_token_ids: list[int] | None = None
    finish_reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    logprobs: list[Any] | None = None  # one `logprobs.TokenLogprob` per token, when the request asked for them

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopText:
    """Committed token ids -> text safe to emit now, cut at the first stop string.

    Holds back a trailing incomplete character (the decoder does) and a trailing partial match of a stop string.
    Once a stop string appears, `tokens` ends with the token that completed it, the text ends before it, and
    `stopped` is set. Without a decoder (a checkpoint without a tokenizer) there is no text and no stop string.
    """

    def __init__(self, decoder: IncrementalDecoder | None, stops: Iterable[str] = ()) -> None:
        self.decoder = decoder
        self.stops = [s for s in stops if s] if decoder is not None else []
        self.tokens: list[int] = []
        self.pending = ""  # decoded, not yet emitted: at most a stop string's length plus the last piece
        self.emitted: list[str] = []
        self.stopped = False
        self.finished = False

    @property
    def text(self) -> str:
        """Everything emitted so far (all of the text once `finish` has run)."""
        return "".join(self.emitted)

    def push(self, ids: Iterable[int]) -> str:
        """Append committed ids; return the new text safe to emit (ids after a stop string are dropped)."""
        for t in ids:  # token by token, so that a stop string is cut after the token completing it
            if self.stopped:
                break
            self.tokens.append(t)
            self._add(self.decoder.push([t]) if self.decoder is not None else "")
        return self._emit(hold=self._held())

    def finish(self) -> str:
        """The rest of the text (a trailing incomplete character comes out as U+FFFD)."""
        if not self.finished and not self.stopped and self.decoder is not None:
            self._add(self.decoder.flush())
        self.finished = True
        return self._emit(hold=0)

    def _add(self, piece: str) -> None:
        start = len(self.pending)
        self.pending += piece
        # A match ending in `piece`: earlier text held none (pending begins after every possible match, see _held)
        hits = [i for i in (self.pending.find(s, max(0, start - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            self.pending = self.pending[: min(hits)]
            self.stopped = True

    def _held(self) -> int:
        """Length of the longest end of `pending` that begins a stop string."""
        if self.stopped:
            return 0
        for k in range(min(max(map(len, self.stops), default=1) - 1, len(self.pending)), 0, -1):
            if any(s.startswith(self.pending[-k:]) for s in self.stops):
                return k
        return 0

    def _emit(self, hold: int) -> str:
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        if out:
            self.emitted.append(out)
        return out


class OutputProcessor:
    """One request's engine events -> `Delta`s.

    `finish_request(n)` ends the request in the engine keeping its first `n` tokens (a stop string matched). It
    returns the request's 'finished' event when the request ended at once (the engine runs in the caller's
    thread), or None when that event will come later through `on_event` (the engine runs elsewhere); meanwhile
    further tokens and drafts are ignored.
    """

    def __init__(
        self, decoder: IncrementalDecoder | None, stops: Iterable[str], finish_request: Callable[[int], Event | None]
    ) -> None:
        self.out = StopText(decoder, stops)
        self.finish_request = finish_request
        self.stopping = False  # a stop string matched; waiting for the engine's word
        self.done = False  # the last delta was returned
        self.logprobs: list[Any] = []  # of every token the engine emitted (the text may keep fewer)

    @property
    def tokens(self) -> list[int]:
        return self.out.tokens

    def on_event(self, ev: Event) -> Delta | None:
        """The delta for one engine event (None: nothing to report)."""
        if self.done:
            return None
        if ev.kind == "finished":
            return self.finish(ev.finish_reason, ev.metrics)
        if self.stopping:
            return None
        if ev.kind == "draft":
            return Delta(draft_token_ids=ev.token_ids)
        before = len(self.out.tokens)
        text = self.out.push(ev.token_ids)
        kept = self.out.tokens[before:]
        if ev.logprobs is not None:
            self.logprobs.extend(ev.logprobs)
        delta = Delta(text, kept, logprobs=self.logprobs[before : before + len(kept)] if ev.logprobs else None)
        if not self.out.stopped:
            return delta
        self.stopping = True
        ended = self.finish_request(len(self.out.tokens))
        if ended is None:
            return delta
        last = self.finish("stop", ended.metrics)
        return Delta(
            delta.text + last.text, delta.token_ids, finish_reason="stop", metrics=last.metrics, logprobs=delta.logprobs
        )

    def finish(self, reason: str | None, metrics: dict[str, Any]) -> Delta:
        """The last delta: the rest of the text; the reason is 'stop' whenever a stop string matched."""
        self.done = True
        reason = "stop" if self.out.stopped else (reason or "stop")
        return Delta(self.out.finish(), finish_reason=reason, metrics=metrics)


# -- chat answers ---------------------------------------------------------------------------------------------------
def chat_decoder(tokenizer: Tokenizer | None, chat: ChatPrompt | None = None) -> IncrementalDecoder | None:
    """A fresh detokeniser for an answer (None without a tokenizer: no text); a chat format's markers are kept for
    its parser (text.chat.output_decoder)."""
    if tokenizer is None:
        return None
    if chat is not None and chat.format is not None:
        return output_decoder(tokenizer, chat.format)
    return tokenizer.incremental_decoder()


def chat_parser(chat: ChatPrompt | None) -> ChatParser | None:
    """How a chat answer's text splits into content, reasoning and tool calls: the template's format, or JSON calls
    when the template has no call syntax (text.json_tools); None: the text is all content."""
    if chat is not None and chat.json_tools:
        from dgemma.text.json_tools import JsonCallParser

        return JsonCallParser(chat.choice.name)
    if chat is None or chat.format is None:
        return None
    return ChatOutputParser(chat.format, chat.parses_tools, chat.in_reasoning)


def chat_finish_reason(reason: str | None, parser: ChatParser | None) -> str | None:
    """An answer that ended by itself ("stop") on tool calls finishes with "tool_calls", as OpenAI's API says."""
    return "tool_calls" if parser is not None and parser.calls and reason == "stop" else reason


def parse_answer(chat: ChatPrompt, text: str, reason: str | None) -> tuple[ChatMessage, str | None]:
    """A whole chat answer split into content, reasoning and tool calls, and its finish reason."""
    parser = chat_parser(chat)
    if parser is None:
        return ChatMessage(text, None, []), reason
    parser.push(text)
    parser.finish()
    return parser.message(), chat_finish_reason(reason, parser)
