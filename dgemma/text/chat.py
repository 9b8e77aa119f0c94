"""Chat requests beyond plain turns: tool declarations, assistant tool calls, tool results and the thinking switch.

The prompt itself is always rendered by the checkpoint's own chat template (`Tokenizer.apply_chat_template`): that
is what the model was trained on, so nothing here writes turn markers. This module prepares what the template is
given, following vLLM's conventions, and checks it first so that a malformed request is a clear error naming the
field (`ChatRequestError.param`, e.g. `tools[1].function.name`):

- `tools`: OpenAI function declarations `{"type": "function", "function": {"name", "description", "parameters"}}`,
  handed to the template as the `tools` variable (Gemma 4 writes them into the system turn as `<|tool>` blocks);
- assistant `tool_calls`: their JSON `arguments` strings are parsed into objects, so a template can write them in
  its own syntax (Gemma 4: `<|tool_call>call:NAME{key:value,...}<tool_call|>`);
- `role: "tool"` results: `tool_call_id` is resolved to the called function's name (`name`), which Gemma 4's
  `<|tool_response>response:NAME{...}<tool_response|>` block needs;
- `chat_template_kwargs`: extra template variables, e.g. `{"enable_thinking": true}` (Gemma 4 then opens the system
  turn with `<|think|>`, and the model writes a `<|channel>thought\\n...<channel|>` section before its answer).

`ChatFormat` names the markers of a template's tool-call and thinking syntax; `detect_format` recognises Gemma 4's
in a template's source. Parsing the model's output with them is `chat_output`; constraining a call, `tool_grammar`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from dgemma.text.tokenizer import IncrementalDecoder

ToolChoiceMode = Literal["none", "auto", "required", "function"]

# OpenAI's rule for function names; Gemma 4's response schema reads a name as `\w+`, a subset of it.
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Variables the renderer sets itself: a client may not override them through chat_template_kwargs.
RESERVED_TEMPLATE_VARS = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "pad_token"}
)


class ChatRequestError(ValueError):
    """A malformed chat request; `param` names the offending field (an HTTP 400 in the server)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatFormat:
    """The markers of a chat format's tool calls and thinking channel; the defaults are Gemma 4's.

    A call is `tool_call_open + call_prefix + NAME + "{" + arguments + "}" + tool_call_close`, where arguments are
    `key:value` pairs, strings are wrapped in `string_delim` (never escaped) and numbers, booleans, lists and
    objects are written as in JSON but with bare keys. Thinking is `channel_open + thought_label + text +
    channel_close`. `tool_response_open` starts the turn the caller answers in: the model stops there.
    """

    tool_call_open: str = "<|tool_call>"
    tool_call_close: str = "<tool_call|>"
    call_prefix: str = "call:"
    string_delim: str = '<|"|>'
    channel_open: str = "<|channel>"
    channel_close: str = "<channel|>"
    thought_label: str = "thought\n"
    tool_response_open: str = "<|tool_response>"

    @property
    def markers(self) -> tuple[str, ...]:
        """Every marker string, for deciding which special tokens to keep when decoding output."""
        return (
            self.tool_call_open,
            self.tool_call_close,
            self.string_delim,
            self.channel_open,
            self.channel_close,
            self.tool_response_open,
        )


GEMMA4 = ChatFormat()


def detect_format(template: str | None) -> ChatFormat | None:
    """The tool-call/thinking format a chat template writes, or None when it has none we can parse."""
    if template and GEMMA4.tool_call_open in template and GEMMA4.tool_call_close in template:
        return GEMMA4
    return None


@dataclass(frozen=True)
class Tool:
    """One declared function; `parameters` is the JSON Schema of its arguments (an object schema)."""

    name: str
    parameters: dict[str, Any]
    description: str | None = None

    def declaration(self) -> dict[str, Any]:
        """The OpenAI-shaped declaration handed to the chat template."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolChoice:
    """`none`: answer in text; `auto`: text or calls; `required`: at least one call; `function`: call `name`."""

    mode: ToolChoiceMode
    name: str | None = None


def _check_parameters(params: Any, where: str) -> dict[str, Any]:
    if params is None:
        return {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise ChatRequestError(f"{where} must be a JSON Schema object, got {type(params).__name__}", where)
    kind = params.get("type", "object")
    if kind != "object":
        raise ChatRequestError(
            f'{where}.type must be "object" (a function takes named arguments), got {kind!r}', f"{where}.type"
        )
    props = params.get("properties", {})
    if not isinstance(props, dict):
        raise ChatRequestError(f"{where}.properties must be an object", f"{where}.properties")
    for key, sub in props.items():
        if not isinstance(sub, (dict, bool)):
            raise ChatRequestError(
                f"{where}.properties.{key} must be a JSON Schema (an object or a boolean)", f"{where}.properties.{key}"
            )
    required = params.get("required", [])
    if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise ChatRequestError(f"{where}.required must be a list of property names", f"{where}.required")
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ChatRequestError(f"{where} is not plain JSON: {e}", where) from None
    return params


def _check_tool(i: int, tool: Any) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise ChatRequestError(f"{where} must be an object", where)
    if tool.get("type", "function") != "function":
        raise ChatRequestError(f'{where}.type must be "function", got {tool.get("type")!r}', f"{where}.type")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise ChatRequestError(f"{where}.function must be an object", f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ChatRequestError(
            f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}", f"{where}.function.name"
        )
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise ChatRequestError(f"{where}.function.description must be a string", f"{where}.function.description")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ChatRequestError(f"{where}.function.strict must be a boolean", f"{where}.function.strict")
    return Tool(name, _check_parameters(fn.get("parameters"), f"{where}.function.parameters"), desc)


def check_tools(tools: Any) -> list[Tool]:
    """Validate OpenAI `tools`; raises ChatRequestError naming the field. None or [] means no tools."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ChatRequestError(f"tools must be a list, got {type(tools).__name__}", "tools")
    out = [_check_tool(i, t) for i, t in enumerate(tools)]
    seen: set[str] = set()
    for i, t in enumerate(out):
        if t.name in seen:
            raise ChatRequestError(
                f"tools[{i}].function.name {t.name!r} is declared twice", f"tools[{i}].function.name"
            )
        seen.add(t.name)
    return out


def check_tool_choice(choice: Any, tools: list[Tool]) -> ToolChoice:
    """OpenAI `tool_choice` (a mode string or `{"type": "function", "function": {"name": ...}}`) against `tools`.

    Unset means `auto` with tools and `none` without, as in OpenAI's API."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ChatRequestError(
                f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}", "tool_choice"
            )
        if choice == "required" and not tools:
            raise ChatRequestError("tool_choice 'required' needs tools", "tool_choice")
        return ToolChoice(choice if tools else "none")  # type: ignore[arg-type]
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or choice.get("type", "function") != "function":
        raise ChatRequestError(
            "tool_choice must be a string or {'type': 'function', 'function': {'name': ...}}", "tool_choice"
        )
    if name not in {t.name for t in tools}:
        raise ChatRequestError(
            f"tool_choice names function {name!r}, which is not among the declared tools", "tool_choice.function.name"
        )
    return ToolChoice("function", name)


def _arguments(value: Any, where: str) -> Any:
    """An assistant tool call's arguments as an object (OpenAI sends a JSON string), for the template to write."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise ChatRequestError(f"{where} is not valid JSON: {e.msg}", where) from None
        if isinstance(parsed, dict):
            return parsed
    raise ChatRequestError(f"{where} must be a JSON object (or a string holding one)", where)


def _assistant_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise ChatRequestError(f"{where} must be a list", where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatRequestError(
                f"{where}[{j}] must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}",
                f"{where}[{j}]",
            )
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise ChatRequestError(f"{where}[{j}].id must be a string", f"{where}[{j}].id")
        args = _arguments(fn.get("arguments", {}), f"{where}[{j}].function.arguments")
        out.append({**call, "type": "function", "function": {**fn, "arguments": args}})
    return out


def prepare_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as chat templates expect them (vLLM's conventions); raises ChatRequestError naming the field.

    Assistant `tool_calls` get object arguments, a missing/null assistant content becomes "", and a tool result
    gets the `name` of the call its `tool_call_id` answers. Everything else is left to the tokenizer's checks.
    """
    if not isinstance(messages, list):
        raise ChatRequestError("messages must be a list", "messages")
    names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant turns
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            out.append(msg)  # the tokenizer reports it
            continue
        msg = dict(msg)
        if msg.get("role") == "assistant":
            if msg.get("tool_calls") is not None:
                msg["tool_calls"] = _assistant_calls(i, msg["tool_calls"])
                names.update({c["id"]: c["function"]["name"] for c in msg["tool_calls"] if c.get("id")})
            elif "tool_calls" in msg:
                del msg["tool_calls"]
            if msg.get("content") is None:
                msg["content"] = ""
            for key in ("reasoning_content", "reasoning"):
                if msg.get(key) is not None and not isinstance(msg[key], str):
                    raise ChatRequestError(f"messages[{i}].{key} must be a string", f"messages[{i}].{key}")
        elif msg.get("role") == "tool":
            call_id = msg.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise ChatRequestError(f"messages[{i}].tool_call_id must be a string", f"messages[{i}].tool_call_id")
            if msg.get("name") is None and call_id in names:
                msg["name"] = names[call_id]
        out.append(msg)
    return out


def check_template_kwargs(kwargs: Any) -> dict[str, Any]:
    """`chat_template_kwargs`: an object of extra template variables, none of them one the renderer sets."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ChatRequestError("chat_template_kwargs must be an object", "chat_template_kwargs")
    bad = sorted(set(kwargs) & RESERVED_TEMPLATE_VARS)
    if bad:
        raise ChatRequestError(
            f"chat_template_kwargs may not set {bad[0]!r} (it is given by the request itself)", "chat_template_kwargs"
        )
    return dict(kwargs)


@dataclass
class ChatPrompt:
    """A rendered chat request: the prompt text and what the output is parsed and constrained with."""

    text: str
    tools: list[Tool]
    choice: ToolChoice
    parallel: bool
    format: ChatFormat | None
    thinking: bool  # the template was asked to let the model think (`enable_thinking`)
    in_reasoning: bool  # the prompt ends inside an open thinking channel, so the output starts in it

    @property
    def parses_tools(self) -> bool:
        """The output is read for tool calls (tools declared and not switched off with `none`)."""
        return bool(self.tools) and self.choice.mode != "none" and (self.format is not None or self.json_tools)

    @property
    def json_tools(self) -> bool:
        """Calls are written as JSON constrained by the tools' schemas (`json_tools`): the template has no call
        syntax, and the request names a function or requires a call."""
        return self.format is None and bool(self.tools) and self.choice.mode in ("required", "function")


class _KeepMarkers:
    """The tokenizer as chat output decoding sees it: the format's marker tokens are kept (the output parser reads
    them), every other special token is dropped, as `skip_special_tokens` would."""

    def __init__(self, tokenizer: Any, fmt: ChatFormat) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.backend.get_added_tokens_decoder()
        self.drop = {i for i, t in added.items() if t.special and t.content not in fmt.markers}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.drop], skip_special_tokens=False)


def output_decoder(tokenizer: Any, fmt: ChatFormat) -> IncrementalDecoder:
    """An incremental detokeniser for chat output in format `fmt` (markers kept, other special tokens dropped)."""
    return IncrementalDecoder(_KeepMarkers(tokenizer, fmt))


def _ends_in_channel(text: str, fmt: ChatFormat | None) -> bool:
    return fmt is not None and text.rfind(fmt.channel_open) > text.rfind(fmt.channel_close)


def render_chat(
    tokenizer: Any,
    messages: Any,
    tools: Any = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    chat_template_kwargs: Any = None,
    add_generation_prompt: bool = True,
) -> ChatPrompt:
    """Check a chat request and render its prompt with `tokenizer`'s chat template.

    Raises ChatRequestError (naming the field) for bad tools, tool_choice, tool-call messages or template kwargs,
    and for `auto` tool choice on a template whose tool-call syntax dgemma cannot parse (a named function or
    `required` is then answered in JSON: `json_tools`). Template failures are
    the tokenizer's TokenizerError (also a ValueError).
    """
    decls = check_tools(tools)
    choice = check_tool_choice(tool_choice, decls)
    kwargs = check_template_kwargs(chat_template_kwargs)
    fmt = detect_format(getattr(tokenizer, "chat_template", None))
    if decls and choice.mode == "auto" and fmt is None:
        raise ChatRequestError(
            "this model's chat template has no tool-call syntax dgemma can parse (Gemma 4's "
            "<|tool_call> format), so tool_choice 'auto' is unavailable: name a function or use 'required' "
            "(the output is then JSON constrained by the function's parameters)",
            "tools",
        )
    template_tools = [t.declaration() for t in decls] or None
    text = tokenizer.apply_chat_template(
        prepare_messages(messages), add_generation_prompt=add_generation_prompt, tools=template_tools, **kwargs
    )
    return ChatPrompt(
        text,
        decls,
        choice,
        parallel_tool_calls is not False,
        fmt,
        bool(kwargs.get("enable_thinking")),
        _ends_in_channel(text, fmt),
    )


__all__ = [
    "ChatFormat",
    "ChatPrompt",
    "ChatRequestError",
    "GEMMA4",
    "Tool",
    "ToolChoice",
    "check_template_kwargs",
    "check_tool_choice",
    "check_tools",
    "detect_format",
    "output_decoder",
    "prepare_messages",
    "render_chat",
]
