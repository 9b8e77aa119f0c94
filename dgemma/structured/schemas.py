"""JSON Schema details that generation needs, shared by JSON output (`constraints`) and tool calls (`tool_grammar`).

**Patterns are narrowed.** A JSON Schema `pattern` matches anywhere in the string unless it says `^`/`$`, so
`[0-9a-f]{8}-...` accepts `"xx…uuid…yy"`. Generating such a string leaves the model free to write anything before
the required part, and a budget-aware closing search then has to find that part with no signal to guide it (every
character stays allowed until the whole pattern has appeared), which is how real-world schemas ran out of tokens.
We generate a subset instead: each top-level alternative must match at the start of the string (`X.*`, or `X`
when the alternative ends with `$`). Every such string still validates. Two cases keep the unanchored form, so the
subset never becomes empty: an alternative anchored only at its end (`.*X$`) when the schema has a `minLength`
(the prefix may be needed to reach it), and any pattern the splitter cannot read.

**`uniqueItems` over enumerable items is spelled out.** No context-free grammar can say "no two items equal" in
general, but when the items take a few known values (`enum`, `const`, `boolean`, `null`) the unique arrays are
finitely many: `unique_selections` lists them as an `anyOf` of fixed-length arrays (each value at most once),
up to `MAX_UNIQUE_SELECTIONS` of them. Other `uniqueItems` arrays keep the keyword, which the grammar does not
enforce and the caller is warned about.

**Formats are annotations.** JSON Schema treats `format` as an annotation that validators do not assert by default;
a generator may ignore the formats it does not know. `FORMATS` gives the common ones a shape; others are ignored
with a warning.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from typing import Any

ANY = "(?s:.)*"
MAX_UNIQUE_SELECTIONS = 512  # arrays of distinct enumerated values spelled out, at most (5 values: 326)
ENUMERABLE_TYPES = {"boolean": [False, True], "null": [None]}
SHORTHANDS = {"d": "0-9", "w": "A-Za-z0-9_", "s": " \\t\\n\\r", "S": "!-~"}  # their ASCII members (`ascii_shorthands`)
# Formats given a shape (loose but useful); others are annotations left unconstrained.
FORMATS = {
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?",
    "date-time": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+",
    "ipv4": r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
}


def split_alternatives(pattern: str) -> list[str]:
    """A regex split at its top-level '|' (outside groups, classes and escapes)."""
    parts, depth, in_class, start, i = [], 0, False, 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    return parts + [pattern[start:]]


def _ends_anchored(branch: str) -> bool:
    k = len(branch) - len(branch.rstrip("$"))  # a '$' preceded by an odd number of backslashes is a literal
    return k > 0 and (len(branch[:-1]) - len(branch[:-1].rstrip("\\"))) % 2 == 0


def ascii_shorthands(pattern: str) -> str:
    """`\\d`, `\\w`, `\\s`, `\\S` narrowed to their ASCII members (outside negated classes), and `\\s` in a negated
    class widened by the separators U+001C-U+001F. Regex engines disagree on these classes: Python's (which
    `jsonschema` uses) counts U+001C-U+001F as whitespace and no combining marks as word characters, llguidance's
    the other way round, so a generated `\\S` could hold a character a validator calls whitespace. The ASCII
    members are what every engine agrees on."""
    out, i, cls = [], 0, None  # cls: None outside a character class, else whether the class is negated
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            if cls is True:
                out.append("\\s\\x1c-\\x1f" if e == "s" else pattern[i : i + 2])
            elif e in SHORTHANDS:
                out.append(SHORTHANDS[e] if cls is False else f"[{SHORTHANDS[e]}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if cls is None and c == "[":
            cls = pattern.startswith("^", i + 1)
            out.append(pattern[i : i + 1 + cls])
            i += 1 + cls
            if pattern.startswith("]", i):  # a leading ']' is a literal
                out.append("\\]")
                i += 1
            continue
        if cls is not None and c == "]":
            cls = None
        out.append(c)
        i += 1
    return "".join(out)


def whole_string_regex(pattern: str, min_length: bool = False) -> str:
    """A JSON Schema pattern as a regex the *whole* string must match, narrowed as the module docstring says.

    `min_length`: the schema also bounds the length from below (keeps `.*X$` alternatives unanchored at the start).
    """
    out = []
    for branch in split_alternatives(ascii_shorthands(pattern)):
        head, tail = branch.startswith("^"), _ends_anchored(branch)
        core = branch[1 if head else 0 : len(branch) - 1 if tail else len(branch)]
        prefix = ANY if (tail and not head and min_length) else ""
        out.append(f"{prefix}(?:{core}){'' if tail else ANY}")
    return out[0] if len(out) == 1 else "|".join(f"(?:{b})" for b in out)


def _item_values(items: Any) -> list[Any] | None:
    """The values an array's `items` schema allows, when it is a plain enumeration (`enum` or `const`, with an
    optional `type` that filters them; or `type` `boolean` or `null`) and nothing else constrains them; else None."""
    if not isinstance(items, dict) or set(items) - {"enum", "const", "type", "title", "description"}:
        return None
    kind = items.get("type")
    if "const" in items:
        values = [items["const"]]
    elif isinstance(items.get("enum"), list):
        values = items["enum"]
    elif isinstance(kind, str) and kind in ENUMERABLE_TYPES:
        return ENUMERABLE_TYPES[kind]
    else:
        return None
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else None
    if kinds is not None:
        values = [v for v in values if any(_has_type(v, k) for k in kinds)]
    distinct: dict[str, Any] = {}
    for v in values:
        distinct.setdefault(_key(v), v)  # the first of values that jsonschema calls equal
    return list(distinct.values())


def _key(value: Any) -> str:
    """Equal keys for values `uniqueItems` calls equal (1 and 1.0; not 1 and true)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return repr(float(value)) if number else json.dumps(value, sort_keys=True)


def _has_type(value: Any, kind: str) -> bool:
    """Whether a JSON value has a JSON Schema type (an integer-valued float counts as an integer)."""
    if isinstance(value, bool) or value is None:
        return kind == ("boolean" if isinstance(value, bool) else "null")
    if isinstance(value, (int, float)):
        return kind == "number" or (kind == "integer" and float(value).is_integer())
    return {str: "string", list: "array", dict: "object"}.get(type(value)) == kind


def unique_selections(schema: dict[str, Any]) -> dict[str, Any] | None:
    """An array schema with `uniqueItems: true` over enumerable items, rewritten as the `anyOf` of its unique
    arrays (each a fixed length, one `const` per position); None when the items are not enumerable, the array
    has other item keywords, or there would be more than `MAX_UNIQUE_SELECTIONS` arrays."""
    if schema.get("uniqueItems") is not True or {"prefixItems", "contains"} & set(schema):
        return None
    values = _item_values(schema.get("items"))
    if values is None:
        return None
    lo, hi = schema.get("minItems", 0), min(schema.get("maxItems", len(values)), len(values))
    if not isinstance(lo, int) or not isinstance(hi, int) or lo > hi:
        return None
    sizes = range(lo, hi + 1)
    if sum(math.perm(len(values), k) for k in sizes) > MAX_UNIQUE_SELECTIONS:
        return None
    rest = {k: v for k, v in schema.items() if k not in ("items", "uniqueItems", "minItems", "maxItems")}
    arrays = [
        {"type": "array", "prefixItems": [{"const": v} for v in pick], "items": False, "minItems": k}
        for k in sizes
        for pick in itertools.permutations(values, k)
    ]
    return {**rest, "anyOf": arrays}


def prepare_schema(schema: Any) -> Any:
    """A copy of `schema` ready for generation: every string `pattern` replaced by its anchored, narrowed form
    (`^(?:...)$`), every enumerable `uniqueItems` array spelled out (`unique_selections`), and `uniqueItems:
    false` (the default) dropped."""
    out = copy.deepcopy(schema)
    stack = [out]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                node["pattern"] = f"^(?:{whole_string_regex(node['pattern'], 'minLength' in node)})$"
            if node.get("uniqueItems") is False:
                del node["uniqueItems"]
            spelled = unique_selections(node)
            if spelled is not None:
                node.clear()
                node.update(spelled)
            stack.extend(v for k, v in node.items() if k not in ("enum", "const", "examples", "default"))
        elif isinstance(node, list):
            stack.extend(node)
    return out


__all__ = ["FORMATS", "prepare_schema", "split_alternatives", "unique_selections", "whole_string_regex"]
