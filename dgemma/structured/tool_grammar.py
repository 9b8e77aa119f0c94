"""Constrained tool calls: the Lark grammar (llguidance) of a call in the chat format's own syntax.

Gemma 4 writes a call as `<|tool_call>call:NAME{key:value,...}<tool_call|>`: bare keys in sorted order (its chat
template sorts them), strings between `<|"|>` delimiters with no escaping, numbers, booleans, lists and objects as
in JSON. A JSON-Schema constraint compiled by llguidance would force JSON syntax, which the model was not trained
to write, so this module translates each tool's parameter schema into a grammar of that syntax instead:

- the function name is one of the declared tools (or the named one), followed by its argument object;
- objects: declared properties in sorted order, required ones always present, optional ones optional, no others
  (a subset of what `additionalProperties` may allow, so every output still validates); a schema with only
  `additionalProperties` is a map with word keys;
- strings: the length bounds, the `pattern` (narrowed to match from the start: see `schemas`) and a few common
  formats, intersected (llguidance's `&` on terminals); a string never contains the delimiter text;
- numbers and integers: llguidance's own JSON-number grammar with the bounds (`%json {...}` inline);
- `enum`/`const` as literals, `anyOf`/`oneOf` as alternatives (`oneOf` with a warning unless its branches are
  exclusive by type or value: a value matching two branches is not excluded), `allOf` merged, local `$ref`s
  (recursion allowed), `nullable`, `type` lists, `minItems`/`maxItems`, `prefixItems`, `minProperties`/`maxProperties`.

`uniqueItems` over enumerable items (`enum`, `const`, booleans) is spelled out as the list of unique arrays
(`schemas.unique_selections`). Keywords that cannot be honoured by a context-free grammar (`not`, `if`, other
`uniqueItems`, `contains`, dependencies) and unknown formats are ignored with a warning returned to the caller
(formats are annotations in JSON Schema, so ignoring them is what validators do by default). The markers must be
single tokens of the tokenizer (they are special tokens in Gemma 4's): the grammar names them by id (`<[id]>`).

`tool_call_grammar` returns the grammar of the whole output for `required` and a named function; for `auto` it
returns the grammar of what follows the opening marker, to be activated when the model writes that marker (a
lazily triggered constraint), so a text answer is never constrained.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from dgemma.text.chat import ChatFormat, ChatPrompt, Tool, ToolChoice
from dgemma.structured.constraints import Constraint, ConstraintError
from dgemma.structured.schemas import FORMATS, unique_selections, whole_string_regex
from dgemma.text.json_tools import JsonCallSchema, call_schema

# Keywords whose meaning a context-free grammar cannot enforce: ignored with a warning.
UNENFORCED = (
    "not",
    "if",
    "then",
    "else",
    "uniqueItems",
    "contains",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "unevaluatedItems",
)
NUMBER_KEYS = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
STRING_KEYS = ("pattern", "minLength", "maxLength", "format")
OBJECT_KEYS = ("properties", "required", "additionalProperties", "minProperties", "maxProperties")
ARRAY_KEYS = ("items", "prefixItems", "minItems", "maxItems")
ANY_CHARS = "(?s:.)"
SAFE_KEY = re.compile(r"^[^\s:,{}\[\]<>]([^:,{}\[\]<>]*[^\s:,{}\[\]<>])?$")


@dataclass
class ToolGrammar:
    """A compiled-to-text constraint: `lark` for llguidance; `trigger` the token id after which it applies (None:
    from the first output token); `warnings` for the client (ignored keywords, unknown formats)."""

    lark: str
    trigger: int | None = None
    warnings: list[str] = field(default_factory=list)
    closers: tuple[int, ...] = ()  # marker tokens that end a string or a call: the closing search may place them

    def constraint(self) -> Constraint:
        return Constraint("tool_calls", self.lark, self.trigger, self.closers, tuple(self.warnings))


def _exclusive(branches: Any) -> bool:
    """Whether no value can match two `oneOf` branches, as far as their `type`s or literal values tell: each
    branch states one type, all different (integer counts as a number); or each is a `const`/`enum`, no value
    shared."""
    if not isinstance(branches, list) or not all(isinstance(b, dict) for b in branches):
        return False
    types = [b.get("type") for b in branches]
    if all(isinstance(t, str) for t in types):
        kinds = ["number" if t == "integer" else t for t in types]
        return len(set(kinds)) == len(kinds)
    values = [[b["const"]] if "const" in b else b.get("enum") for b in branches]
    if not all(isinstance(v, list) for v in values):
        return False
    flat = [json.dumps(x, sort_keys=True) for v in values for x in v]
    return len(set(flat)) == len(flat)


def _lit(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a Lark string literal


def _regex(pattern: str) -> str:
    return "/" + pattern.replace("/", "\\/") + "/"


def _count(low: int, high: int | None) -> str:
    """A Lark repetition suffix for low..high times (high None: unbounded)."""
    if high is not None and high < low:
        raise ConstraintError(f"an array allows at most {high} but at least {low} items")
    if high is None:
        return "*" if low == 0 else "+" if low == 1 else f"{{{low},}}"
    return f"{{{low},{high}}}"


def _reps(rule: str, low: int, high: int | None) -> str:
    """`rule` repeated low..high times, comma-separated, as Lark ("" when high is 0)."""
    if high == 0:
        return ""
    more = f'("," {rule})' + _count(max(0, low - 1), None if high is None else high - 1)
    return f"({rule} {more})?" if low == 0 else f"{rule} {more}"


class SchemaGrammar:
    """Builds Lark rules for JSON Schemas in a chat format's argument syntax (see the module docstring)."""

    def __init__(self, fmt: ChatFormat, token_id: Callable[[str], int | None]) -> None:
        self.fmt = fmt
        self.token_id = token_id
        self.delim = self.marker(fmt.string_delim)
        self.rules: dict[str, str] = {}
        self._memo: dict[str, str] = {}
        self.warnings: list[str] = []
        self.root: Any = {}
        self.root_index = 0

    def marker(self, text: str) -> str:
        tid = self.token_id(text)
        if tid is None:
            raise ConstraintError(f"constrained tool calls need {text!r} to be one token of the tokenizer")
        return f"<[{tid}]>"

    def _new(self, body: str, prefix: str = "v") -> str:
        name = f"{prefix}_{len(self.rules)}"
        self.rules[name] = body
        return name

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    # -- literals -------------------------------------------------------------------------------------------------
    def key(self, key: str) -> str:
        if SAFE_KEY.match(key) and self.fmt.string_delim not in key:
            return _lit(key)
        return f"{self.delim} {_lit(key)} {self.delim}" if key else f"{self.delim} {self.delim}"

    def literal(self, value: Any) -> str:
        """A JSON value as a Lark sequence of the format's syntax (the template's spelling)."""
        if isinstance(value, str):
            return f"{self.delim} {_lit(value)} {self.delim}" if value else f"{self.delim} {self.delim}"
        if isinstance(value, dict):
            items = [f'{self.key(k)} ":" {self.literal(v)}' for k, v in sorted(value.items())]
            return '"{" ' + ' "," '.join(items) + ' "}"' if items else '"{}"'
        if isinstance(value, list):
            return '"[" ' + ' "," '.join(self.literal(v) for v in value) + ' "]"' if value else '"[]"'
        return _lit(json.dumps(value))

    # -- schemas --------------------------------------------------------------------------------------------------
    def value(self, schema: Any, path: str) -> str:
        """The rule name for values of `schema` (memoised, so `$ref` recursion terminates)."""
        if schema is True or schema == {}:
            return self.any_value()
        if schema is False:
            raise ConstraintError(f"{path}: the schema `false` allows no value")
        if not isinstance(schema, dict):
            raise ConstraintError(f"{path}: a schema must be an object or a boolean")
        key = json.dumps([self.root_index, schema], sort_keys=True)  # $refs resolve against the tool's root
        if key not in self._memo:
            name = self._memo[key] = f"v_{len(self.rules)}"
            self.rules[name] = ""  # reserved; filled below (a recursive $ref sees the name)
            self.rules[name] = self._body(schema, path)
        return self._memo[key]

    def _resolve(self, ref: str, path: str) -> Any:
        if not ref.startswith("#"):
            raise ConstraintError(f"{path}: only local $refs ('#/...') are supported, got {ref!r}")
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ConstraintError(f"{path}: $ref {ref!r} points nowhere")
        return node

    def _merge(self, schemas: list[Any], path: str) -> dict[str, Any]:
        """allOf, approximated by merging: properties and required unite, other keys: the last one wins."""
        out: dict[str, Any] = {}
        for s in schemas:
            if isinstance(s, dict) and "$ref" in s:
                s = {**self._resolve(s["$ref"], path), **{k: v for k, v in s.items() if k != "$ref"}}
            if s is True or s == {}:
                continue
            if not isinstance(s, dict):
                raise ConstraintError(f"{path}: allOf holds a schema that allows no value")
            if "allOf" in s:
                s = {**self._merge(s["allOf"], path), **{k: v for k, v in s.items() if k != "allOf"}}
            props = {**out.get("properties", {}), **s.get("properties", {})}
            required = list(dict.fromkeys(out.get("required", []) + s.get("required", [])))
            out.update(s)
            if props:
                out["properties"] = props
            if required:
                out["required"] = required
        return out

    def _body(self, schema: dict[str, Any], path: str) -> str:
        spelled = unique_selections(schema)  # uniqueItems over enumerable items: the unique arrays, listed
        if spelled is not None:
            return self.value(spelled, path)
        for k in UNENFORCED:
            if k in schema and schema[k] not in (False, None):
                self.warn(f"{path}: '{k}' is not enforced")
        if "$ref" in schema:
            rest = {k: v for k, v in schema.items() if k not in ("$ref", "$defs", "definitions")}
            target = self._resolve(schema["$ref"], path)
            return self.value(self._merge([target, rest], path) if rest else target, path)
        if "allOf" in schema:
            merged = self._merge([{k: v for k, v in schema.items() if k != "allOf"}] + schema["allOf"], path)
            return self.value(merged, path)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                if key == "oneOf" and not _exclusive(schema[key]):
                    self.warn(f"{path}: 'oneOf' is enforced as 'anyOf' (a value may match several branches)")
                rest = {k: v for k, v in schema.items() if k != key}
                alts = [
                    self.value(self._merge([rest, s], path) if rest else s, f"{path}.{key}[{i}]")
                    for i, s in enumerate(schema[key])
                ]
                return " | ".join(alts)
        if "const" in schema:
            return self.literal(schema["const"])
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise ConstraintError(f"{path}.enum must be a non-empty list")
            return " | ".join(self.literal(v) for v in schema["enum"])
        return " | ".join(self._typed(t, schema, path) for t in self._types(schema, path))

    def _types(self, schema: dict[str, Any], path: str) -> list[str]:
        kinds = schema.get("type")
        if kinds is None:
            inferred = [
                t
                for t, keys in (
                    ("object", OBJECT_KEYS),
                    ("array", ARRAY_KEYS),
                    ("string", STRING_KEYS),
                    ("number", NUMBER_KEYS[1:]),
                )
                if any(k in schema for k in keys)
            ]
            kinds = inferred or ["string", "number", "boolean", "null", "object", "array"]
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if schema.get("nullable") is True and "null" not in kinds:
            kinds.append("null")
        if "number" in kinds and "integer" in kinds:
            kinds.remove("integer")
        for t in kinds:
            if t not in ("object", "array", "string", "number", "integer", "boolean", "null"):
                raise ConstraintError(f"{path}.type: unknown type {t!r}")
        return kinds

    def _typed(self, kind: str, schema: dict[str, Any], path: str) -> str:
        if kind == "object":
            return self._object(schema, path)
        if kind == "array":
            return self._array(schema, path)
        if kind == "string":
            return self._string(schema, path)
        if kind in ("number", "integer"):
            num = {k: schema[k] for k in NUMBER_KEYS if k in schema}
            num["type"] = kind
            return self._new("%json " + json.dumps({**num, "x-guidance": {"whitespace_flexible": False}}), "num")
        return '"true" | "false"' if kind == "boolean" else '"null"'

    def _string(self, schema: dict[str, Any], path: str) -> str:
        parts = [_regex(f"{ANY_CHARS}*")]
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if lo or hi is not None:
            parts.append(_regex(f"{ANY_CHARS}{{{lo},{'' if hi is None else hi}}}"))
        if isinstance(schema.get("pattern"), str):
            parts.append(_regex(whole_string_regex(schema["pattern"], lo > 0)))
        fmt = schema.get("format")
        if fmt in FORMATS:
            parts.append(_regex(FORMATS[fmt]))
        elif fmt is not None:
            self.warn(f"{path}: format {fmt!r} is not enforced")
        parts.append("~" + _regex(f"{ANY_CHARS}*" + re.escape(self.fmt.string_delim) + f"{ANY_CHARS}*"))
        return f"{self.delim} {self._new(' & '.join(parts), 'STR')} {self.delim}"

    def _array(self, schema: dict[str, Any], path: str) -> str:
        items, prefix = schema.get("items", True), schema.get("prefixItems", [])
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        fixed = [self.value(s, f"{path}.prefixItems[{i}]") for i, s in enumerate(prefix)][:hi]
        rest_hi = 0 if items is False else None if hi is None else hi - len(fixed)
        rest_lo = max(0, lo - len(fixed))
        item = self.value(items, f"{path}.items") if rest_hi != 0 else ""
        if not fixed:
            return f'"[" {_reps(item, rest_lo, rest_hi)} "]"'
        tail = "" if rest_hi == 0 else f'("," {item})' + _count(rest_lo, rest_hi)
        return '"[" ' + ' "," '.join(fixed) + f' {tail} "]"'

    def _object(self, schema: dict[str, Any], path: str) -> str:
        props = dict(schema.get("properties", {}))
        required = [r for r in schema.get("required", []) if isinstance(r, str)]
        extra = schema.get("additionalProperties", True)
        for r in required:
            props.setdefault(r, extra if isinstance(extra, dict) else {})
        names = sorted(k for k, v in props.items() if v is not False)
        missing = [r for r in required if props[r] is False]
        if missing:
            raise ConstraintError(f"{path}: required property {missing[0]!r} allows no value")
        if not names and isinstance(extra, dict) and extra:
            return self._map(extra, schema.get("minProperties", 0), path)
        must = self._must(names, set(required), schema)
        optional = [k for k in names if k not in must]
        if "maxProperties" in schema:
            optional = optional[: max(0, schema["maxProperties"] - len(must))]
        return self._members(
            [
                (f'{self.key(k)} ":" {self.value(props[k], f"{path}.properties.{k}")}', k in must)
                for k in names
                if k in must or k in optional
            ]
        )

    @staticmethod
    def _must(names: list[str], required: set[str], schema: dict[str, Any]) -> set[str]:
        """Required properties, plus the first optional ones when minProperties asks for more."""
        must = set(required)
        for k in names:
            if len(must) >= schema.get("minProperties", 0):
                break
            must.add(k)
        return must

    def _members(self, members: list[tuple[str, bool]]) -> str:
        """'{' members '}' with optional ones omissible and commas only between present ones."""
        first, after = "", ""  # rules for: members from i on, none written yet / some written before
        for text, req in reversed(members):
            f_body = f"{text} {after}".strip()
            a_body = f'"," {text} {after}'.strip()
            if not req:
                f_body = f"({f_body})" + (f" | {first}" if first else "?")
                a_body = f"({a_body})?" if not after else f"({a_body}) | {after}"
            first, after = self._new(f_body, "m"), self._new(a_body, "m")
        return f'"{{" {first} "}}"' if first else '"{}"'

    def _map(self, values: Any, min_props: int, path: str) -> str:
        pair = self._new(f'KEY ":" {self.value(values, f"{path}.additionalProperties")}', "m")
        self.rules["KEY"] = _regex("[A-Za-z_][A-Za-z0-9_]{0,63}")
        return f'"{{" {_reps(pair, min(min_props, 1), None)} "}}"'

    def any_value(self) -> str:
        if "any" not in self.rules:
            self.rules["any"] = ""
            str_ = self._string({}, "any")
            num = self._typed("number", {}, "any")
            pair = self._new('KEY ":" any', "m")
            self.rules["KEY"] = _regex("[A-Za-z_][A-Za-z0-9_]{0,63}")
            self.rules["any"] = (
                f'{str_} | {num} | "true" | "false" | "null" | "{{" {_reps(pair, 0, None)} "}}" | '
                f'"[" {_reps("any", 0, None)} "]"'
            )
        return "any"

    def render(self, start: str) -> str:
        return "\n".join([f"start: {start}"] + [f"{k}: {v}" for k, v in self.rules.items()]) + "\n"


def tool_call_grammar(
    tools: list[Tool],
    choice: ToolChoice,
    fmt: ChatFormat,
    token_id: Callable[[str], int | None],
    parallel: bool = True,
    reasoning: bool = False,
) -> ToolGrammar:
    """The constraint for `choice` ('required', 'function' or 'auto'); raises ConstraintError naming the tool.

    `reasoning`: the model may write a thinking channel before a required call (thinking was switched on).
    """
    if choice.mode == "none" or not tools:
        raise ConstraintError("no tool call to constrain")
    g = SchemaGrammar(fmt, token_id)
    chosen = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    fns = []
    for t in chosen:
        g.root, g.root_index = t.parameters, tools.index(t)
        where = f"tools[{tools.index(t)}].function.parameters"
        fns.append(g._new(f"{_lit(t.name)} {g.value(t.parameters, where)}", "fn"))
    open_, close = g.marker(fmt.tool_call_open), g.marker(fmt.tool_call_close)
    closers = (token_id(fmt.string_delim), token_id(fmt.tool_call_close))
    body = g._new(f"{_lit(fmt.call_prefix)} ({' | '.join(fns)}) {close}", "call")
    many = parallel and choice.mode != "function"
    if choice.mode == "auto":  # what follows the opening marker the model wrote
        return ToolGrammar(
            g.render(f"{body} ({open_} {body})*" if many else body), g.token_id(fmt.tool_call_open), g.warnings, closers
        )
    start = f"({open_} {body})+" if many else f"{open_} {body}"
    if reasoning:
        think = f"{g.marker(fmt.channel_open)} /(?s:.)*/ {g.marker(fmt.channel_close)}"
        start = f"({think})? {start}"
        closers += (token_id(fmt.channel_close),)
    return ToolGrammar(g.render(start), None, g.warnings, closers)


def prompt_grammar(prompt: ChatPrompt, token_id: Callable[[str], int | None]) -> ToolGrammar | JsonCallSchema | None:
    """The tool-call constraint a rendered chat request asks for, or None (no tools, or `none`); a JSON schema
    when the template has no call syntax (`json_tools`)."""
    if not prompt.parses_tools:
        return None
    if prompt.json_tools:
        return JsonCallSchema(call_schema(prompt.tools, prompt.choice, prompt.parallel))
    assert prompt.format is not None
    return tool_call_grammar(prompt.tools, prompt.choice, prompt.format, token_id, prompt.parallel, prompt.thinking)


__all__ = ["SchemaGrammar", "ToolGrammar", "prompt_grammar", "tool_call_grammar"]
