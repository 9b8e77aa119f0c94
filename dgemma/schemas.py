"""JSON Schema details that generation needs, shared by JSON output (`constraints`) and tool calls (`tool_grammar`).

**Patterns are narrowed.** A JSON Schema `pattern` matches anywhere in the string unless it says `^`/`$`, so
`[0-9a-f]{8}-...` accepts `"xx…uuid…yy"`. Generating such a string leaves the model free to write anything before
the required part, and a budget-aware closing search then has to find that part with no signal to guide it (every
character stays allowed until the whole pattern has appeared), which is how real-world schemas ran out of tokens.
We generate a subset instead: each top-level alternative must match at the start of the string (`X.*`, or `X`
when the alternative ends with `$`). Every such string still validates. Two cases keep the unanchored form, so the
subset never becomes empty: an alternative anchored only at its end (`.*X$`) when the schema has a `minLength`
(the prefix may be needed to reach it), and any pattern the splitter cannot read.

**Formats are annotations.** JSON Schema treats `format` as an annotation that validators do not assert by default;
a generator may ignore the formats it does not know. `FORMATS` gives the common ones a shape; others are ignored
with a warning.
"""

from __future__ import annotations

import copy
from typing import Any

ANY = "(?s:.)*"
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


def whole_string_regex(pattern: str, min_length: bool = False) -> str:
    """A JSON Schema pattern as a regex the *whole* string must match, narrowed as the module docstring says.

    `min_length`: the schema also bounds the length from below (keeps `.*X$` alternatives unanchored at the start).
    """
    out = []
    for branch in split_alternatives(pattern):
        head, tail = branch.startswith("^"), _ends_anchored(branch)
        core = branch[1 if head else 0 : len(branch) - 1 if tail else len(branch)]
        prefix = ANY if (tail and not head and min_length) else ""
        out.append(f"{prefix}(?:{core}){'' if tail else ANY}")
    return out[0] if len(out) == 1 else "|".join(f"(?:{b})" for b in out)


def narrow_patterns(schema: Any) -> Any:
    """A copy of `schema` with every string `pattern` replaced by its anchored, narrowed form (`^(?:...)$`)."""
    out = copy.deepcopy(schema)
    stack = [out]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                node["pattern"] = f"^(?:{whole_string_regex(node['pattern'], 'minLength' in node)})$"
            stack.extend(v for k, v in node.items() if k not in ("enum", "const", "examples", "default"))
        elif isinstance(node, list):
            stack.extend(node)
    return out


__all__ = ["FORMATS", "narrow_patterns", "split_alternatives", "whole_string_regex"]
