"""Structured output for a uniform-state canvas: JSON Schema, regex, choice and Lark grammars through llguidance.

DiffusionGemma has no [MASK] token: every canvas position always holds some token, and nothing is frozen within a
canvas. A grammar matcher, though, reads left to right. The design (docs/structured.md) keeps both:

- Each constrained row has a *frontier* f in its canvas. Positions before f are validated by the matcher and
  frozen (they behave like template positions: always accepted, never redrawn, visible to every step).
- Each denoising step advances the frontier by a run of tokens: at position f the model's logits are masked to
  the tokens the matcher allows, a token is sampled from that distribution and consumed, and the run goes on to
  f+1 while the entropy-bound rule (the sampler's own acceptance rule, on masked distributions) holds. Forced
  tokens (llguidance's fast-forward: a required key, the rest of an enum value) are placed for free. At least one
  token is accepted per step, so a canvas needs at most C steps.
- Positions after the frontier are denoised as usual (sampled, accepted or re-noised), so the model keeps seeing a
  whole-canvas draft through self-conditioning; they only become output once the frontier validates them.
- The canvas is committed when the frontier reaches its end; the matcher state carries over to the next canvas.
  When the grammar is complete the rest of the canvas becomes EOS, which ends the request.
- Budget: a short completion is searched now and then (`Guide.closing_path`: forced runs, and breadth-first
  searches over single-character tokens to the next closing token that makes progress) and forced once it only
  just fits; near the end every sampled token is checked to leave a completion that fits. So even random weights
  close their JSON. If no completion fits, the request ends with finish_reason "length" and is never reported as
  complete.

`frontier.ConstraintState` is all of this for one request; the engine only calls it (see its docstring). Everything here
is CPU-side bookkeeping; the model is untouched.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from dgemma.structured.schemas import ascii_shorthands, prepare_schema

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "tool_calls"]

# Limits checked before llguidance sees a request, so that hostile inputs fail fast with a reason.
MAX_SPEC_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 24
MAX_ENUM = 1024
MAX_CHOICES = 1024
MAX_REGEX_CHARS = 2048
COMPILE_TIMEOUT_S = 5.0
MAX_FORCED_TOKENS = 32_768
MAX_CACHED_GRAMMARS = 256  # compiled constraints kept per model (clients often resend the same schema)
# Compact JSON (no free whitespace): fewer tokens, and random weights cannot wander through blanks. Lenient:
# unknown formats and keywords llguidance does not implement are warnings, not errors (formats are annotations in
# JSON Schema, which validators do not assert by default).
JSON_OPTIONS = {"whitespace_flexible": False, "lenient": True}
MAX_TOOL_GRAMMAR_BYTES = 1024 * 1024  # tool-call grammars are built here from checked declarations

# Single characters tried first when searching for a short way to finish, then the rest of printable ASCII.
CLOSING_ALPHABET = '"]})0,:1a-.[{tfne'
CLOSERS = '"]})'
CLOSING_BEAM = 16  # search nodes kept per level of the closing search
MAX_CLOSING_NODES = 1024  # search nodes expanded per closing segment before giving up


class ConstraintError(ValueError):
    """An unsupported, invalid or too-expensive constraint (a client error: HTTP 400)."""


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `value`: a JSON schema (dict), a regex (str), a list of strings, a Lark grammar
    (`grammar` from a client; `tool_calls` built by `tool_grammar`).

    `trigger`: a token id after which the constraint applies (a lazily triggered grammar: the output is free until
    the model writes it); None: from the first token. `closers`: extra token ids the budget-aware closing search may
    place (e.g. the special tokens that end a string or a tool call in a chat format)."""

    kind: Kind
    value: Any = None
    trigger: int | None = None
    closers: tuple[int, ...] = ()
    warnings: tuple[str, ...] = ()  # what the builder of `value` ignored (tool schemas' unenforced keywords)

    @staticmethod
    def from_fields(
        json_schema: Any = None,
        regex: str | None = None,
        choice: list[str] | None = None,
        grammar: str | None = None,
        json_object: bool = False,
    ) -> "Constraint | None":
        given = [
            (k, v)
            for k, v in (("json_schema", json_schema), ("regex", regex), ("choice", choice), ("grammar", grammar))
            if v is not None
        ]
        if json_object:
            given.append(("json_object", None))
        if len(given) > 1:
            raise ConstraintError(
                f"give at most one of json_schema, regex, choice, grammar (got {', '.join(k for k, _ in given)})"
            )
        return Constraint(*given[0]) if given else None


def _check_schema(schema: Any) -> None:
    """Depth, size and enum limits, checked iteratively (a deeply nested schema must not blow the stack)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ConstraintError("json_schema must be a JSON object (or a boolean)")
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ConstraintError(f"json_schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            for key in ("enum",):
                if isinstance(node.get(key), list) and len(node[key]) > MAX_ENUM:
                    raise ConstraintError(
                        f"json_schema has an enum of {len(node[key])} values; the limit is {MAX_ENUM}"
                    )
            pattern = node.get("pattern")
            if isinstance(pattern, str) and len(pattern) > MAX_REGEX_CHARS:
                raise ConstraintError(f"a pattern has {len(pattern)} characters; the limit is {MAX_REGEX_CHARS}")
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth) for v in node if isinstance(v, (dict, list)))
    text = json.dumps(schema)  # safe now: the depth is bounded
    if len(text) > MAX_SPEC_BYTES:
        raise ConstraintError(f"json_schema is {len(text)} bytes; the limit is {MAX_SPEC_BYTES}")


def _lark_string(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lark string literal


def _json_schema_grammar(schema: Any) -> str:
    import llguidance

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"json_schema is not valid JSON: {e.msg}") from None
    _check_schema(schema)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(prepare_schema(schema), overrides=JSON_OPTIONS)
    except ValueError as e:
        raise ConstraintError(f"json_schema: {e}") from None


def _json_object_grammar(_: Any) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)


def _regex_grammar(regex: Any) -> str:
    import llguidance

    if not isinstance(regex, str) or not regex:
        raise ConstraintError("regex must be a non-empty string")
    if len(regex) > MAX_REGEX_CHARS:
        raise ConstraintError(f"regex has {len(regex)} characters; the limit is {MAX_REGEX_CHARS}")
    # \d, \w, \s, \S as their ASCII members, as in JSON Schema patterns (engines disagree on the rest)
    return llguidance.LLMatcher.grammar_from_regex(ascii_shorthands(regex))


def _choice_grammar(choice: Any) -> str:
    import llguidance

    if not isinstance(choice, list) or not choice or not all(isinstance(s, str) and s for s in choice):
        raise ConstraintError("choice must be a non-empty list of non-empty strings")
    if len(choice) > MAX_CHOICES or sum(len(s) for s in choice) > MAX_SPEC_BYTES:
        raise ConstraintError(f"choice is too large (at most {MAX_CHOICES} options, {MAX_SPEC_BYTES} bytes)")
    return llguidance.LLMatcher.grammar_from_lark(
        "start: " + " | ".join(_lark_string(s) for s in dict.fromkeys(choice)) + "\n"
    )


def _lark_grammar(text: Any) -> str:
    import llguidance

    if not isinstance(text, str) or not text.strip():
        raise ConstraintError("grammar must be a non-empty string")
    if len(text) > MAX_SPEC_BYTES:
        raise ConstraintError(f"grammar is {len(text)} bytes; the limit is {MAX_SPEC_BYTES}")
    if "::=" in text:  # GBNF / EBNF (llama.cpp style): convert to Lark
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except Exception as e:  # the converter raises plain exceptions on malformed input
            raise ConstraintError(f"grammar: cannot convert EBNF: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(text)


def _tool_calls_grammar(text: Any) -> str:
    import llguidance

    if not isinstance(text, str) or len(text) > MAX_TOOL_GRAMMAR_BYTES:
        raise ConstraintError(
            f"the tools' grammar is larger than {MAX_TOOL_GRAMMAR_BYTES} bytes: declare fewer or smaller tools"
        )
    return llguidance.LLMatcher.grammar_from_lark(text)


# Each kind's grammar builder: the constraint's value -> the llguidance grammar, ConstraintError when malformed.
GRAMMARS: dict[str, Callable[[Any], str]] = {
    "json_schema": _json_schema_grammar,
    "json_object": _json_object_grammar,
    "regex": _regex_grammar,
    "choice": _choice_grammar,
    "grammar": _lark_grammar,
    "tool_calls": _tool_calls_grammar,
}


def to_grammar(c: Constraint) -> str:
    """The llguidance grammar (serialised) for a constraint; raises ConstraintError for malformed input."""
    if c.kind not in GRAMMARS:
        raise ConstraintError(f"unknown constraint kind {c.kind!r}")
    return GRAMMARS[c.kind](c.value)


class GuideFactory:
    """Compiles constraints for one tokenizer and vocabulary; `guide(constraint)` returns a fresh matcher state."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        self.vocab_size = vocab_size
        self.eos = sorted(set(eos_token_ids))
        self._json = tokenizer_json
        self._tok: Any = None
        self.single_chars: list[int] = []  # single-token characters, closing alphabet first
        self.closers: set[int] = set()
        self._cache: dict[str, tuple[str, list[str]]] = {}  # key -> (grammar, warnings)
        self._lock = threading.Lock()

    @property
    def tok(self) -> Any:
        """The llguidance tokenizer, built on first use (about a second for a 262k vocabulary)."""
        if self._tok is None:
            try:
                import llguidance
            except ImportError:
                raise ConstraintError(
                    "structured output needs the llguidance package (pip install llguidance)"
                ) from None
            if not self.eos:
                raise ConstraintError("structured output needs an EOS token")
            try:
                tok = llguidance.LLTokenizer(self._json, n_vocab=self.vocab_size, eos_token=self.eos)
            except (ValueError, RuntimeError) as e:  # e.g. a word-level tokenizer: no byte-level decoding
                raise ConstraintError(f"this model's tokenizer does not support structured output ({e})") from None
            self.limits = llguidance.LLParserLimits(
                max_items_in_row=2000,
                initial_lexer_fuel=1_000_000,
                step_lexer_fuel=200_000,
                step_max_items=50_000,
                max_lexer_states=100_000,
                max_grammar_size=200_000,
                verbose_errors=False,
            )
            # Single-token ids of printable ASCII characters, the closing alphabet first.
            chars = CLOSING_ALPHABET + "".join(chr(b) for b in range(32, 127) if chr(b) not in CLOSING_ALPHABET)
            for ch in chars:
                ids = tok.tokenize_str(ch)
                if len(ids) == 1 and ids[0] not in self.single_chars and ids[0] not in self.eos:
                    self.single_chars.append(ids[0])
                    if ch in CLOSERS:
                        self.closers.add(ids[0])
            self._tok = tok
        return self._tok

    def compile(self, c: Constraint) -> str:
        """Validate a constraint within `COMPILE_TIMEOUT_S`; returns the grammar. Raises ConstraintError."""
        return self._compile(c)[0]

    def warnings(self, c: Constraint) -> list[str]:
        """What `c` cannot enforce (unknown formats, unimplemented keywords), for the client."""
        return list(c.warnings) + self._compile(c)[1]

    def _compile(self, c: Constraint) -> tuple[str, list[str]]:
        import llguidance

        if c.kind == "json_schema" and not isinstance(c.value, str):
            _check_schema(c.value)  # before anything recurses into it
        key = json.dumps([c.kind, c.value], sort_keys=True, default=str)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        tok = self.tok
        grammar = to_grammar(c)

        def validate() -> tuple[bool, list[str]]:
            try:
                return llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok, limits=self.limits)
            except Exception as e:  # noqa: BLE001 - reported to the client as a reason
                return True, [str(e)]

        is_error, messages = _bounded(validate, c.kind)
        if is_error:
            raise ConstraintError(f"invalid {c.kind}: {_short(messages[0] if messages else 'rejected')}")

        def build() -> tuple[Any, int]:
            # Some limits only trip when the lexer runs: build a matcher and compute its first forced run.
            m = llguidance.LLMatcher(tok, grammar, limits=self.limits, log_level=0)
            return m, (0 if m.is_error() else len(m.compute_ff_tokens()))

        m, n_forced = _bounded(build, c.kind)
        if m.is_error():
            raise ConstraintError(f"invalid {c.kind}: {_short(m.get_error())}")
        if n_forced > MAX_FORCED_TOKENS:
            raise ConstraintError(f"{c.kind} forces {n_forced} tokens, more than any request can generate")
        with self._lock:
            self._cache[key] = (grammar, [_short(w) for w in messages])
            while len(self._cache) > MAX_CACHED_GRAMMARS:  # oldest first: dicts keep insertion order
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]

    def guide(self, c: Constraint) -> "Guide":
        import llguidance

        grammar = self.compile(c)
        return Guide(llguidance.LLMatcher(self.tok, grammar, limits=self.limits, log_level=0), self, c.closers)


def _bounded(fn: Any, what: str) -> Any:
    """fn() on a helper thread, given up after COMPILE_TIMEOUT_S (the thread is left to finish on its own)."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(COMPILE_TIMEOUT_S)
    if not out:
        raise ConstraintError(f"{what} took longer than {COMPILE_TIMEOUT_S:.0f} s to compile")
    return out[0]


def _short(msg: str, n: int = 300) -> str:
    msg = re.sub(r"\s+", " ", str(msg)).strip()
    return msg if len(msg) <= n else msg[:n] + "..."


class Guide:
    """One request's matcher state at its committed frontier (everything consumed is output or frozen canvas)."""

    def __init__(self, matcher: Any, factory: GuideFactory, closers: tuple[int, ...] = ()):
        self.m = matcher
        self.f = factory
        self.closers = list(closers)  # the constraint's own closing tokens, tried first
        self.finished = False  # the grammar is complete (EOS chosen, or nothing but EOS is allowed)

    def allowed(self) -> torch.Tensor:
        """Tokens the matcher allows next, as a bool mask (V,)."""
        words = torch.frombuffer(bytearray(self.m.compute_bitmask()), dtype=torch.int32)
        bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.reshape(-1)[: self.f.vocab_size].bool()

    def forced(self) -> list[int]:
        """Tokens the grammar forces next (may be empty)."""
        return [] if self.finished else list(self.m.compute_ff_tokens())

    def consume(self, token: int) -> None:
        if token in self.f.eos:
            self.finished = True
            return
        if not self.m.consume_token(token):  # a resource limit tripped mid-way (the mask never allows a bad token)
            raise ConstraintError(f"the constraint failed during generation: {_short(self.m.get_error())}")
        if self.m.is_stopped():
            self.finished = True

    def closing_path(self, max_len: int) -> list[int] | None:
        """A short token sequence that completes the grammar, ending with EOS; None if none is found within
        `max_len` tokens. Forced tokens are taken as they come; otherwise the path grows by segments
        (`_closing_segment`), each the shortest way found to the next closing token. The matcher is left as it
        was."""
        f = self.f
        f.tok  # noqa: B018 - builds the single-character table
        path: list[int] = []
        try:
            while len(path) < max_len:
                if self.m.is_accepting():
                    return path + [f.eos[0]]
                step = list(self.m.compute_ff_tokens()) or self._closing_segment(max_len - len(path))
                if not step:
                    return None
                for t in step[: max_len - len(path)]:
                    if not self.m.consume_token(t):
                        return None
                    path.append(t)
            return None
        finally:
            if path:
                self.m.rollback(len(path))

    def _closing_segment(self, budget: int) -> list[int] | None:
        """The next piece of a closing path: a breadth-first search over single-character tokens for the nearest
        state where the grammar may end or a closing token (quote, bracket, the constraint's own closers) makes
        progress (`_expand`). A node's children that lead to the same allowed-token mask are kept once (the
        search cannot tell them apart: `a`, `b`, `c` in a name), and each level keeps its first `CLOSING_BEAM`
        nodes in the order they were found (closing tokens and the closing alphabet first). So a format or a
        pattern (`x@y.z`, a UUID, `^[^@]+@[^@]+$`) is walked to its shortest end instead of looping on
        characters that change nothing. Returns the tokens up to and including that closer (or the token after
        which the grammar may end); None if none is found within `budget` levels. The matcher is left as it
        was."""
        level: list[list[int]] = [[]]
        expanded = 0
        for _ in range(budget):
            children: list[list[int]] = []
            for node in level:
                found = self._expand(node, children)
                if found is not None:
                    return found if len(found) <= budget else None
            expanded += len(level)
            if not children or expanded >= MAX_CLOSING_NODES:
                return None
            level = children[:CLOSING_BEAM]
        return None

    def _expand(self, node: list[int], children: list[list[int]]) -> list[int] | None:
        """One search node (a path from the current state): returns a finishing path (node + tokens) if one of
        its candidate tokens ends the grammar or is a closer that makes progress (the one leaving the fewest
        allowed tokens); else appends its children to `children`, one per distinct allowed-token mask.

        A closer makes progress when it leads somewhere no other character leads (inside an e-mail address's local
        part `}` leads where `a` leads: there it is just a character). Children that change the allowed tokens
        come first (they move on: a space in `^(\\S+ ){4}\\S+$`), then the rest."""
        m = self.m
        consumed = m.try_consume_tokens(node)
        try:
            if consumed != len(node):
                return None
            mask = m.compute_bitmask()
            closers, others = self._candidates(mask)
            tried = [(t in closers, self._try(t)) for t in closers + others]
            tried = [(is_closer, r) for is_closer, r in tried if r is not None]
            for _, (tokens, done, _) in tried:
                if done:
                    return node + tokens
            plain = {after for is_closer, (_, _, after) in tried if not is_closer}
            progress = [(_popcount(a), tokens) for c, (tokens, _, a) in tried if c and a not in plain]
            if progress:
                return node + min(progress, key=lambda p: p[0])[1]
            distinct: dict[bytes, list[int]] = {}
            for _, (tokens, _, after) in sorted(tried, key=lambda r: r[1][2] == mask):  # stable: changers first
                distinct.setdefault(after, tokens)  # the first token per mask
            children.extend(node + tokens for tokens in distinct.values())
            return None
        finally:
            if consumed:
                m.rollback(consumed)

    def _candidates(self, mask: bytes) -> tuple[list[int], list[int]]:
        """The allowed closing tokens (the constraint's own first) and the other allowed single-character tokens;
        if none is allowed (e.g. a multi-byte character is due), the first allowed token."""
        f = self.f
        allowed = [t for t in dict.fromkeys(self.closers + f.single_chars) if _bit(mask, t)]
        closers = [t for t in allowed if t in f.closers or t in self.closers]
        others = [t for t in allowed if t not in closers]
        if not allowed:
            first = next((t for t in range(f.vocab_size) if _bit(mask, t) and t not in f.eos), None)
            others = [] if first is None else [first]
        return closers, others

    def _try(self, token: int) -> tuple[list[int], bool, bytes] | None:
        """Consume `token` and the run it forces, note whether the grammar may end and the allowed-token mask, and
        roll back: (tokens, done, mask); None if the token is refused."""
        m = self.m
        if not m.consume_token(token):
            return None
        forced = list(m.compute_ff_tokens())
        n = 1 + m.try_consume_tokens(forced)
        try:
            done = m.is_accepting() or m.is_stopped()
            return [token] + forced[: n - 1], done, (b"" if done else m.compute_bitmask())
        finally:
            m.rollback(n)


def _bit(mask: bytes, token: int) -> bool:
    """Whether `token` is set in an llguidance bitmask (little-endian 32-bit words, so bit t is byte t//8)."""
    return token // 8 < len(mask) and bool(mask[token // 8] >> (token % 8) & 1)


def _popcount(mask: bytes) -> int:
    return int.from_bytes(mask, "little").bit_count()
