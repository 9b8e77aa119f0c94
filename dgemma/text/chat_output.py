"""The model's chat output split into content, reasoning and tool calls, incrementally (text deltas in, deltas out).

Input is the output text decoded with the format's marker tokens kept (`<|channel>`, `<|tool_call>`, ...; see
`chat.ChatFormat`). The parser is a small state machine over three modes:

- content: text is the answer, until a thinking channel or a tool call opens;
- reasoning: after `<|channel>` (its `thought\\n` label dropped) until `<channel|>`; a tool call opening inside an
  unclosed channel also ends it (as vLLM's and SGLang's Gemma 4 parsers do);
- call: after `<|tool_call>`, buffered until `<tool_call|>`, then parsed from Gemma 4's syntax
  (`call:NAME{key:value,...}`, strings between `<|"|>` delimiters) into a name and JSON arguments. A call that
  does not parse, or never closes, is returned as content, so no text is lost. While it is open, streaming sends
  it in pieces as vLLM does: its id and name once `call:NAME{` is written, then its JSON arguments up to each
  member that completes (members are converted whole, so the pieces add up to the final `arguments`). A call
  streamed that way and then cut by the budget or malformed (possible only without its grammar) has sent
  pieces before it is returned as content.

Text that could be the start of a marker is held back until the next delta decides it, so no marker is ever split
between a content delta and the next one. `push` deltas concatenated with `finish` equal the one-shot result.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from dgemma.text.chat import ChatFormat

Mode = Literal["content", "reasoning", "call"]
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_BARE = {"true": True, "false": False, "null": None, "None": None}  # the template writes Python's None as "None"


class NativeSyntaxError(ValueError):
    """Text that is not a well-formed value of the format's argument syntax."""


class _Reader:
    """Recursive descent over Gemma 4's argument syntax (JSON with bare keys and delimited, unescaped strings),
    writing JSON text as it goes: numbers are copied as written, so no precision is lost on the way."""

    def __init__(self, text: str, delim: str) -> None:
        self.s, self.i, self.delim = text, 0, delim

    def _skip(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def _at(self, ch: str) -> bool:
        self._skip()
        if self.s.startswith(ch, self.i):
            self.i += len(ch)
            return True
        return False

    def _expect(self, ch: str) -> None:
        if not self._at(ch):
            raise NativeSyntaxError(f"expected {ch!r} at offset {self.i} of {self.s!r}")

    def _string(self) -> str:
        start = self.i + len(self.delim)
        end = self.s.find(self.delim, start)
        if end < 0:
            raise NativeSyntaxError(f"unterminated string at offset {self.i}")
        self.i = end + len(self.delim)
        return self.s[start:end]

    def value(self) -> str:
        self._skip()
        if self.s.startswith(self.delim, self.i):
            return json.dumps(self._string(), ensure_ascii=False)
        if self.s.startswith("{", self.i):
            return self.obj()
        if self.s.startswith("[", self.i):
            return self._items("[", "]", self.value)
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in ",}]":
            self.i += 1
        word = self.s[start : self.i].strip()
        if not word:
            raise NativeSyntaxError(f"missing value at offset {start}")
        if word in _BARE:
            return json.dumps(_BARE[word])
        if _NUMBER.fullmatch(word):
            return word
        return json.dumps(word, ensure_ascii=False)  # a bare word: read as a string, as vLLM's parser does

    def _member(self) -> str:
        self._skip()
        if self.s.startswith(self.delim, self.i):
            key = self._string()
        else:
            end = self.s.find(":", self.i)
            if end < 0:
                raise NativeSyntaxError(f"missing ':' after a key at offset {self.i} of {self.s!r}")
            key, self.i = self.s[self.i : end].strip(), end
            if not key or any(c in key for c in ",{}[]"):
                raise NativeSyntaxError(f"bad key {key!r}")
        self._expect(":")
        return json.dumps(key, ensure_ascii=False) + ": " + self.value()

    def _items(self, open_: str, close: str, item) -> str:
        self._expect(open_)
        out: list[str] = []
        if not self._at(close):
            out.append(item())
            while not self._at(close):
                self._expect(",")
                out.append(item())
        return open_ + ", ".join(out) + close

    def obj(self) -> str:
        return self._items("{", "}", self._member)

    def end(self) -> None:
        self._skip()
        if self.i != len(self.s):
            raise NativeSyntaxError(f"unexpected text after the value: {self.s[self.i :]!r}")


def parse_native(text: str, fmt: ChatFormat) -> Any:
    """One value written in the format's argument syntax, as a Python (JSON) value."""
    r = _Reader(text, fmt.string_delim)
    value = r.value()
    r.end()
    return json.loads(value)


def to_native(value: Any, fmt: ChatFormat) -> str:
    """A JSON value written in the format's argument syntax (keys sorted, as Gemma 4's template writes them)."""
    if isinstance(value, str):
        return fmt.string_delim + value + fmt.string_delim
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{to_native(v, fmt)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_native(v, fmt) for v in value) + "]"
    return json.dumps(value)


@dataclass
class ToolCall:
    """A parsed call: `arguments` is JSON text, as OpenAI's API carries it."""

    id: str
    name: str
    arguments: str
    index: int = 0

    def to_openai(self, with_index: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return {"index": self.index, **out} if with_index else out


def parse_call(body: str, fmt: ChatFormat) -> tuple[str, str]:
    """The text between a call's markers (`call:NAME{...}`) -> (name, arguments as JSON text); raises
    NativeSyntaxError."""
    if not body.startswith(fmt.call_prefix):
        raise NativeSyntaxError(f"a call must start with {fmt.call_prefix!r}")
    brace = body.find("{")
    name = body[len(fmt.call_prefix) : brace].strip() if brace >= 0 else ""
    if not name:
        raise NativeSyntaxError("a call needs a function name followed by '{'")
    r = _Reader(body[brace:], fmt.string_delim)
    args = r.obj()
    r.end()
    return name, args


def _last_member_end(obj: str, delim: str) -> int:
    """The offset of the last ',' between members of the object that `obj` opens (outside strings and nested
    values); -1 if none yet."""
    depth, i, last = 0, 0, -1
    while i < len(obj):
        if obj.startswith(delim, i):
            end = obj.find(delim, i + len(delim))
            if end < 0:
                break
            i = end + len(delim)
            continue
        c = obj[i]
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        elif c == "," and depth == 1:
            last = i
        i += 1
    return last


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class CallPiece:
    """A piece of a streamed tool call: the first of a call has its `id` and `name`, the rest add to `arguments`."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


@dataclass
class ChatDelta:
    """What one push (or finish) adds: answer text, reasoning text, completed tool calls, and the pieces of tool
    calls that streaming sends (a call's name as soon as it is written, then its arguments as members complete)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    pieces: list[CallPiece] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls or self.pieces)

    def extend(self, other: ChatDelta) -> ChatDelta:
        """This delta followed by `other`, as one."""
        out = ChatDelta(
            self.content + other.content, self.reasoning + other.reasoning, self.tool_calls + other.tool_calls
        )
        for piece in self.pieces + other.pieces:
            out.add(piece)
        return out

    def add(self, piece: CallPiece) -> None:
        """Append a piece, merged into the last one when it continues the same call."""
        last = self.pieces[-1] if self.pieces else None
        if last is not None and last.index == piece.index and piece.id is None:
            last.arguments += piece.arguments
        else:
            self.pieces.append(CallPiece(piece.index, piece.arguments, piece.id, piece.name))

    def to_openai(self) -> dict[str, Any]:
        """A streaming `delta`: only the fields this piece has (tool calls as pieces with their index)."""
        out: dict[str, Any] = {}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.content:
            out["content"] = self.content
        if self.pieces:
            out["tool_calls"] = [p.to_openai() for p in self.pieces]
        return out


class ChatOutputParser:
    """Splits streamed output text into content, reasoning and tool calls (see the module docstring).

    `parse_tools`: read tool-call markers as calls (off when the request declared no tools or chose `none`: then
    they stay in the content). `in_reasoning`: the prompt ended inside an open thinking channel.
    """

    def __init__(
        self,
        fmt: ChatFormat,
        parse_tools: bool = True,
        in_reasoning: bool = False,
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        self.fmt = fmt
        self.parse_tools = parse_tools
        self.mode: Mode = "reasoning" if in_reasoning else "content"
        self.new_id = new_id
        self.buf = ""
        self.label_pending = in_reasoning  # the channel's "thought\n" label is not yet stripped
        self.content = ""
        self.reasoning = ""
        self.calls: list[ToolCall] = []
        self.open_call: ToolCall | None = None  # the call being streamed: its arguments as sent so far
        self.saw_reasoning = in_reasoning

    def _markers(self) -> list[str]:
        f = self.fmt
        if self.mode == "content":
            marks = [f.channel_open, f.channel_close, f.tool_response_open]
        elif self.mode == "reasoning":
            marks = ["\n" + f.channel_close, f.channel_close]  # the template writes "\n" before the close
        else:
            return [f.tool_call_close]
        return marks + [f.tool_call_open] if self.parse_tools or self.mode == "reasoning" else marks

    def _find(self) -> tuple[int, str] | None:
        hits = [(self.buf.find(m), -len(m), m) for m in self._markers() if m in self.buf]
        return (min(hits)[0], min(hits)[2]) if hits else None

    def _held(self) -> int:
        """Length of the longest tail of the buffer that could still grow into a marker."""
        for k in range(min(len(self.buf), max(len(m) for m in self._markers()) - 1), 0, -1):
            tail = self.buf[-k:]
            if any(m.startswith(tail) for m in self._markers()):
                return k
        return 0

    def _emit(self, text: str, out: ChatDelta) -> None:
        if not text:
            return
        if self.mode == "reasoning":
            out.reasoning += text
            self.reasoning += text
        else:
            out.content += text
            self.content += text

    def _strip_label(self) -> bool:
        """Drop the channel's label once enough text has arrived to tell; False while undecided."""
        label = self.fmt.thought_label
        if self.buf.startswith(label):
            self.buf = self.buf[len(label) :]
        elif label.startswith(self.buf) and self._find() is None:
            return False
        self.label_pending = False
        return True

    def _enter(self, marker: str, out: ChatDelta) -> None:
        f = self.fmt
        if marker == f.channel_open:
            self.mode, self.label_pending, self.saw_reasoning = "reasoning", True, True
        elif marker == f.tool_call_open:
            self.mode = "call" if self.parse_tools else "content"
            if not self.parse_tools:
                self._emit(marker, out)
        elif marker.endswith(f.channel_close) and self.mode == "reasoning":
            self.mode = "content"
        # a stray close or tool-response marker in content is dropped

    def _close_call(self, body: str, out: ChatDelta) -> None:
        try:
            name, args = parse_call(body, self.fmt)
        except NativeSyntaxError:
            self.mode, self.open_call = "content", None
            self._emit(self.fmt.tool_call_open + body + self.fmt.tool_call_close, out)
            return
        call = self._open(name, out)
        self._send(args, out)
        self.calls.append(call)
        out.tool_calls.append(call)
        self.mode, self.open_call = "content", None

    def _open(self, name: str, out: ChatDelta) -> ToolCall:
        """The call being streamed; its first piece (id and name) is sent when it starts."""
        if self.open_call is None:
            self.open_call = ToolCall(self.new_id(), name, "", len(self.calls))
            out.add(CallPiece(self.open_call.index, "", self.open_call.id, name))
        return self.open_call

    def _send(self, args: str, out: ChatDelta) -> None:
        """Send what `args` (JSON text) adds to the open call's arguments."""
        call = self.open_call
        if call is not None and args.startswith(call.arguments) and len(args) > len(call.arguments):
            out.add(CallPiece(call.index, args[len(call.arguments) :]))
            call.arguments = args

    def _stream_call(self, out: ChatDelta) -> None:
        """An open call's name once it is written, then its arguments up to the last complete member (members are
        converted whole, so the pieces add up to the final `arguments` text)."""
        f, body = self.fmt, self.buf
        brace = body.find("{")
        name = body[len(f.call_prefix) : brace].strip() if brace >= 0 else ""
        if not body.startswith(f.call_prefix) or not name:
            return
        self._open(name, out)
        cut = _last_member_end(body[brace:], f.string_delim)
        if cut < 0:
            return
        try:
            done = _Reader(body[brace : brace + cut] + "}", f.string_delim).obj()
        except NativeSyntaxError:
            return  # not a call after all: it is returned as content when it closes
        self._send(done[:-1] + ", ", out)

    def _step(self, out: ChatDelta, final: bool) -> bool:
        """Consume what the buffer decides; False when it must wait for more text."""
        if self.mode == "reasoning" and self.label_pending and not self._strip_label():
            return False
        hit = self._find()
        if hit is None:
            if self.mode == "call":
                self._stream_call(out)
                return False
            keep = 0 if final else self._held()
            self._emit(self.buf[: len(self.buf) - keep], out)
            self.buf = self.buf[len(self.buf) - keep :]
            return False
        at, marker = hit
        before, self.buf = self.buf[:at], self.buf[at + len(marker) :]
        if self.mode == "call":
            self._close_call(before, out)
        else:
            self._emit(before, out)
            self._enter(marker, out)
        return True

    def push(self, text: str) -> ChatDelta:
        """Feed the next piece of output text; returns what it decides."""
        out = ChatDelta()
        self.buf += text
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> ChatDelta:
        """End of output: emit what was held back; an unclosed call is returned as content."""
        out = ChatDelta()
        if self.mode == "reasoning" and self.label_pending:
            self._strip_label()
            self.label_pending = False
        while self._step(out, final=True):
            pass
        if self.mode == "call":
            self.mode, self.open_call = "content", None
            self._emit(self.fmt.tool_call_open + self.buf, out)
            self.buf = ""
        return out

    def message(self) -> ChatMessage:
        """Everything parsed so far as one message (call after `finish` for the whole answer)."""
        return ChatMessage(self.content or None, self.reasoning if self.saw_reasoning else None, list(self.calls))


@dataclass
class ChatMessage:
    """A whole parsed answer: `content` None when empty (OpenAI's shape when only tools were called)."""

    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall]

    def to_openai(self) -> dict[str, Any]:
        """The assistant `message` of a chat completion (`reasoning_content` as vLLM names it)."""
        out: dict[str, Any] = {"role": "assistant", "content": self.content, "reasoning_content": self.reasoning}
        if self.tool_calls:
            out["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return out


def parse_chat_output(
    text: str,
    fmt: ChatFormat,
    parse_tools: bool = True,
    in_reasoning: bool = False,
    new_id: Callable[[], str] = new_call_id,
) -> ChatMessage:
    """One-shot parse of a complete output (the same result as streaming it through ChatOutputParser)."""
    p = ChatOutputParser(fmt, parse_tools, in_reasoning, new_id)
    p.push(text)
    p.finish()
    return p.message()


__all__ = [
    "CallPiece",
    "ChatDelta",
    "ChatMessage",
    "ChatOutputParser",
    "NativeSyntaxError",
    "ToolCall",
    "parse_call",
    "parse_chat_output",
    "parse_native",
    "to_native",
]
