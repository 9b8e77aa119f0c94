"""Tool calls on a chat template with no tool-call syntax: the output is JSON, constrained by the tools' schemas.

A named function (`tool_choice: {"type": "function", ...}`) constrains the output to that function's argument
schema: the whole output is the arguments object. `required` constrains it to a JSON array of at least one
`{"name": NAME, "arguments": {...}}` object (at most one when `parallel_tool_calls` is false), each an `anyOf`
branch per declared function, so a call's arguments match the schema of the function it names. The answer is
returned as OpenAI tool calls either way. `auto` needs the template's own call syntax (the model chooses between
text and a call), so it is not offered here.

`JsonCallParser` reads the output as it streams, with the interface of `chat_output.ChatOutputParser`: a named
call's arguments are streamed as they come; under `required` each call is sent once its object is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from dgemma.text.chat import Tool, ToolChoice
from dgemma.text.chat_output import CallPiece, ChatDelta, ChatMessage, ToolCall, new_call_id

DEFS_KEYS = ("$defs", "definitions")


def _rebase(node: Any, prefix: str) -> Any:
    """`node` with its local `$ref`s ("#...") pointing below `prefix` (where the schema now lives)."""
    if isinstance(node, dict):
        out = {k: _rebase(v, prefix) for k, v in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out["$ref"] = prefix + ref[1:]
        return out
    if isinstance(node, list):
        return [_rebase(v, prefix) for v in node]
    return node


def call_schema(tools: list[Tool], choice: ToolChoice, parallel: bool = True) -> dict[str, Any]:
    """The JSON schema of the whole output for a named function or `required`."""
    if choice.mode == "function":
        return next(t.parameters for t in tools if t.name == choice.name)
    defs = {f"tool{i}": _rebase(t.parameters, f"#/$defs/tool{i}") for i, t in enumerate(tools)}
    branches = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": {"$ref": f"#/$defs/tool{i}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for i, t in enumerate(tools)
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": branches}, "minItems": 1, "$defs": defs}
    if not parallel:
        schema["maxItems"] = 1
    return schema


@dataclass
class JsonCallSchema:
    """The constraint of a JSON tool call, shaped like `tool_grammar.ToolGrammar` for `LLM.chat_params`."""

    schema: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    trigger: int | None = None

    def constraint(self) -> Any:
        from dgemma.structured.constraints import Constraint

        return Constraint("json_schema", self.schema)


def _object_end(text: str, start: int) -> int:
    """The offset just past the JSON object opening at `text[start]`, or -1 while it is incomplete."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


class JsonCallParser:
    """Streamed JSON output -> tool calls (see the module docstring). `name`: the named function (None: `required`,
    whose output names its functions)."""

    def __init__(self, name: str | None = None, new_id: Callable[[], str] = new_call_id) -> None:
        self.name, self.new_id = name, new_id
        self.text = ""
        self.scanned = 0  # `required`: where the next call object may start
        self.calls: list[ToolCall] = []
        self.open_call: ToolCall | None = None  # a named call being streamed
        self.content = ""

    def push(self, text: str) -> ChatDelta:
        self.text += text
        out = ChatDelta()
        if self.name is not None:
            self._stream_named(text, out)
        else:
            self._read_calls(out)
        return out

    def _stream_named(self, text: str, out: ChatDelta) -> None:
        if not text:
            return
        if self.open_call is None:
            self.open_call = ToolCall(self.new_id(), self.name or "", "", 0)
            out.add(CallPiece(0, text, self.open_call.id, self.open_call.name))
        else:
            out.add(CallPiece(0, text))
        self.open_call.arguments += text

    def _read_calls(self, out: ChatDelta) -> None:
        while True:
            start = self.text.find("{", self.scanned)
            end = _object_end(self.text, start) if start >= 0 else -1
            if end < 0:
                return
            self.scanned = end
            try:
                obj = json.loads(self.text[start:end])
                name, args = obj["name"], obj["arguments"]
            except (ValueError, KeyError, TypeError):  # not a call object: left to the content
                continue
            call = ToolCall(self.new_id(), str(name), json.dumps(args, ensure_ascii=False), len(self.calls))
            self.calls.append(call)
            out.add(CallPiece(call.index, call.arguments, call.id, call.name))

    def finish(self) -> ChatDelta:
        """End of output: a named call is complete; output that held no call is returned as content."""
        out = ChatDelta()
        if self.open_call is not None:
            self.calls, self.open_call = [self.open_call], None
        if not self.calls and self.text:
            self.content = out.content = self.text
        return out

    def message(self) -> ChatMessage:
        return ChatMessage(self.content or None, None, list(self.calls))


def parse_json_calls(text: str, name: str | None = None) -> ChatMessage:
    """One-shot parse of a complete JSON tool-call output."""
    p = JsonCallParser(name)
    p.push(text)
    p.finish()
    return p.message()


__all__ = ["JsonCallParser", "JsonCallSchema", "call_schema", "parse_json_calls"]
