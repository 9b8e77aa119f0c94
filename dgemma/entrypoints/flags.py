"""Command-line flags derived from a config dataclass and a small table of what only the command line needs.

The dataclass gives each flag its type, its default and its choices (from a `Literal` annotation); a table
`{field name: {"help": ..., ...}}` gives its help text and, where needed, these keys:

- `flag`, `short`: the option strings (default: `--field-name`); `metavar`; `group`: an argparse group's title;
- `ge`: the least value of an integer, checked while parsing (1: "expected a positive integer");
- `choices`: the allowed values when the annotation is no `Literal`;
- `default`: the flag's default when it is not the field's (None: the command decides at run time).

A bool field is a `--name/--no-name` pair; a `tuple[str, ...]` field is one comma-separated value, whose items
`from_args` checks against the choices. " (default: ...)" ends each help text that does not say it already.
`add_flags` declares the options on a parser, `from_args` builds the dataclass back from the parsed arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Literal, Mapping, Sequence

FlagTable = Mapping[str, Mapping[str, Any]]
KEYS = frozenset({"help", "flag", "short", "metavar", "group", "ge", "choices", "default"})
METAVARS = {int: "N", float: "F", tuple: "LIST"}


class CLIError(ValueError):
    """A user error found by the command line itself; reported as `dgemma: error: <message>` with exit status 2."""


def int_at_least(least: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `least`, else a usage error that says so."""
    what = "a positive integer" if least == 1 else f"an integer >= {least}"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = least - 1
        if v < least:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


positive_int = int_at_least(1)


def comma_choices(value: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """A comma-separated flag value -> its items, each one of `allowed` (at least one), or a CLIError naming the
    first unknown `what` and the choices."""
    items = tuple(v for v in value.split(",") if v)
    bad = next((v for v in items if v not in allowed), None)
    if bad is not None or not items:
        raise CLIError(f"unknown {what} {bad or value!r}; choose from {', '.join(allowed)} (comma-separated)")
    return items


@dataclasses.dataclass(frozen=True)
class Flag:
    """One dataclass field as a command-line option."""

    field: str
    kind: type  # int, float, str, bool, or tuple (comma-separated strings)
    default: Any
    choices: tuple[Any, ...] | None
    meta: Mapping[str, Any]

    @property
    def options(self) -> list[str]:
        return [self.meta.get("flag", "--" + self.field.replace("_", "-"))] + (
            [self.meta["short"]] if "short" in self.meta else []
        )

    def help(self) -> str:
        text, d = self.meta["help"], self.default
        if self.kind is tuple and self.choices:
            text += f" (comma-separated: {', '.join(self.choices)})"
        if "(default" in text or d is None:
            return text
        return text + (f" (default: {'on' if d else 'off'})" if self.kind is bool else " (default: %(default)s)")

    def argparse_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"dest": self.field, "help": self.help()}
        if self.kind is bool:
            return kw | {"action": argparse.BooleanOptionalAction, "default": self.default}
        kw["default"] = ",".join(self.default) if self.kind is tuple and self.default is not None else self.default
        if self.choices and self.kind is not tuple:
            return kw | {"choices": list(self.choices)}
        kw["metavar"] = self.meta.get("metavar", METAVARS.get(self.kind, self.field.upper()))
        if self.kind is int and "ge" in self.meta:
            kw["type"] = int_at_least(self.meta["ge"])
        elif self.kind in (int, float):
            kw["type"] = self.kind
        return kw

    def value(self, v: Any) -> Any:
        """The field's value from the parsed option's."""
        if self.kind is not tuple or not isinstance(v, str):
            return v
        if self.choices:
            return comma_choices(v, self.choices, self.field.removesuffix("s").replace("_", " "))
        return tuple(x for x in v.split(",") if x)


def _kind(hint: Any) -> tuple[type, tuple[Any, ...] | None]:
    """(int, float, str, bool or tuple; the Literal's values or None) of a field annotation; `X | None` is X."""
    origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind(args[0])
    if origin is Literal:
        return type(args[0]), tuple(args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return tuple, _kind(args[0])[1]
    if hint in (int, float, str, bool):
        return hint, None
    raise TypeError(f"no command-line flag for a field of type {hint}")


def flags_of(cls: type, table: FlagTable) -> list[Flag]:
    """The flags of `cls`'s fields named in `table`, in field order. A table entry that names no field, has no help
    or an unknown key is a TypeError (a bug in the table, not a user error)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = [k for k, m in table.items() if k not in fields or "help" not in m or set(m) - KEYS]
    if bad:
        raise TypeError(f"{cls.__name__}: bad flag table entries: {', '.join(bad)}")
    hints = typing.get_type_hints(cls)
    out = []
    for name, f in fields.items():
        if name in table:
            meta = table[name]
            kind, choices = _kind(hints[name])
            default = meta.get("default", f.default if f.default is not dataclasses.MISSING else f.default_factory())
            out.append(Flag(name, kind, default, tuple(meta.get("choices", choices) or ()) or None, meta))
    return out


def add_flags(p: argparse.ArgumentParser, cls: type, table: FlagTable) -> dict[str, argparse._ArgumentGroup]:
    """Declare `table`'s fields of `cls` as options of `p`; returns the argparse groups made, by title (for the
    command's other options)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for fl in flags_of(cls, table):
        title = fl.meta.get("group")
        if title is not None and title not in groups:
            groups[title] = p.add_argument_group(title)
        (groups[title] if title is not None else p).add_argument(*fl.options, **fl.argparse_kwargs())
    return groups


def from_args(cls: type, args: argparse.Namespace, table: FlagTable, **overrides: Any) -> Any:
    """A `cls` from the options that `add_flags(p, cls, table)` declared, then `overrides`; a comma-separated value
    with an unknown item is a CLIError."""
    values = {fl.field: fl.value(getattr(args, fl.field)) for fl in flags_of(cls, table)}
    return cls(**(values | overrides))
