"""Python fill-in-the-middle data for the code experiment: sources, split, tokenizer, spans, formats, metrics.

Pure Python (plus HF `tokenizers` for the tokenizer); no model or training code lives here.

Sources
    The running CPython's standard library (`sysconfig`'s stdlib directory; the results in docs/code.md used
    CPython 3.11.7, `PINNED_PYTHON`): every `.py` file outside site-packages, test directories and `encodings/`
    (charmap tables) that is UTF-8, at most `MAX_FILE_BYTES` and parses. Licence: the PSF License Agreement
    (CPython's LICENSE), which allows distributing derived works such as a model trained on it. Nothing is
    downloaded.
    source_files(root) -> sorted relative paths; split_of(path) -> "train" or "test", from a hash of the relative
    path alone: a file is in the same split on every machine and Python version, so no version's test file was
    ever trained on by a model built from another version.

Spans (character offsets into one file; `SPAN_KINDS`)
    line     one non-blank line, indentation and newline included
    lines    2-4 consecutive lines (at least two non-blank)
    body     a function's body: the lines after its `def ...:` header, to the function's last line
    bracket  a bracketed expression: a call's argument list `(...)`, a subscript `[...]`, or a list, dict, set,
             comprehension, parenthesised tuple or generator, from its opening bracket to its closer
    sample_items(files, n, seed, count_tokens) draws `n` spans, the kinds in equal shares, each small enough for
    the canvas (at most `MAX_MIDDLE_TOKENS`).

Formats (token ids; the prefix is cut to its last `PREFIX_TOKENS`, the suffix to its first `SUFFIX_TOKENS`)
    diffusion  prompt  <bos> prefix
               canvas  [middle <eos> <pad>... | suffix <pad>... <eos>]: the middle's room is `ROOM` positions,
                       then the suffix region, fixed (never noised), as `SamplingParams(suffix_token_ids=
                       suffix_ids(suffix))` lays it out at inference; the collator's EOS is the canvas's last slot.
    fim        <bos> <fim_prefix> prefix <fim_suffix> suffix <fim_middle> -> middle <eos>   (AR, standard FIM)
    ar         <bos> prefix -> middle <eos>                                                 (AR, prefix only)
A `Layout` holds these sizes and special ids; the defaults (`CODE`) are the code tokenizer's and canvas's, and any
other checkpoint gets its own (`code_model.layout_of`: its ids, its canvas, the room half of it).

Tokenizer: byte-level BPE (`VOCAB_SIZE` tokens by default) trained on the training files only, with the special
tokens `SPECIAL_TOKENS` at ids 0-5.

Metrics: exact match (whitespace-stripped; multi-line spans keep their indentation), whether the file with the
infill parses (`ast.parse`), bracket consistency (the infill leaves the same brackets unclosed, and closes the same
outer ones, as the original) and indentation consistency (the infilled file tokenizes without an indentation error).
"""

from __future__ import annotations

import ast
import hashlib
import io
import random
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

from dgemma.tasks.sudoku import load_jsonl, save_jsonl
from dgemma.text.build import byte_bpe, save_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "PAD_ID",
    "EOS_ID",
    "BOS_ID",
    "FIM_PREFIX_ID",
    "FIM_SUFFIX_ID",
    "FIM_MIDDLE_ID",
    "CANVAS",
    "ROOM",
    "PREFIX_TOKENS",
    "SUFFIX_TOKENS",
    "MAX_MIDDLE_TOKENS",
    "SPAN_KINDS",
    "Layout",
    "CODE",
    "find_fim_ids",
    "Item",
    "stdlib_dir",
    "source_files",
    "split_of",
    "read_source",
    "build_tokenizer",
    "candidate_spans",
    "sample_items",
    "diffusion_example",
    "suffix_ids",
    "fim_prompt",
    "ar_prompt",
    "exact_match",
    "parses",
    "brackets_ok",
    "indent_ok",
    "binary_reason",
    "save_jsonl",
    "load_jsonl",
]

PINNED_PYTHON = "3.11.7"  # the CPython whose standard library the models in docs/code.md were trained on
MAX_FILE_BYTES = 200_000
HELDOUT_PERCENT = 10
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>")
PAD_ID, EOS_ID, BOS_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID, FIM_MIDDLE_ID = range(6)
VOCAB_SIZE = 2048

CANVAS = 64  # one canvas holds the middle's room and the visible suffix
ROOM = 32  # canvas positions for the middle (and its EOS)
MAX_MIDDLE_TOKENS = ROOM - 1
SUFFIX_TOKENS = CANVAS - ROOM - 1  # the canvas's last slot holds the collator's EOS
PREFIX_TOKENS = 96
PREFIX_CHARS, SUFFIX_CHARS = 1200, 400  # text windows cut before tokenizing (ample for the token windows)
MAX_SPAN_CHARS = 240

FIM_SPELLINGS = (SPECIAL_TOKENS[3:], ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))


@dataclass(frozen=True)
class Layout:
    """Where an infill's parts go for one checkpoint: its canvas, the middle's room at the canvas's start (the suffix
    fills the rest), the special ids and the prefix window. The defaults are the code task's (`CODE`)."""

    canvas: int = CANVAS
    room: int = ROOM
    bos: int | None = BOS_ID  # None: the tokenizer has no BOS; a prompt starts with the prefix
    eos: int = EOS_ID
    pad: int = PAD_ID
    fim: tuple[int, int, int] | None = (FIM_PREFIX_ID, FIM_SUFFIX_ID, FIM_MIDDLE_ID)  # None: no FIM tokens
    prefix_tokens: int = PREFIX_TOKENS

    @property
    def suffix_tokens(self) -> int:
        return self.canvas - self.room - 1  # the canvas's last slot holds EOS

    @property
    def windows(self) -> tuple[int, int]:
        """(prefix, suffix) characters cut before tokenizing: `PREFIX_CHARS`, `SUFFIX_CHARS` scaled with the token
        windows (ample: over 12 characters per token)."""
        return PREFIX_CHARS * self.prefix_tokens // PREFIX_TOKENS, SUFFIX_CHARS * self.suffix_tokens // SUFFIX_TOKENS

    def start(self) -> list[int]:
        return [] if self.bos is None else [self.bos]


CODE = Layout()


def find_fim_ids(token_to_id: Callable[[str], int | None]) -> tuple[int, int, int] | None:
    """A tokenizer's (prefix, suffix, middle) FIM token ids, spelt `<fim_prefix>` or `<|fim_prefix|>`, or None."""
    for names in FIM_SPELLINGS:
        ids = tuple(token_to_id(n) for n in names)
        if None not in ids:
            return ids  # type: ignore[return-value]
    return None


Kind = Literal["line", "lines", "body", "bracket"]
SPAN_KINDS: tuple[str, ...] = ("line", "lines", "body", "bracket")
MULTI_LINE = ("lines", "body")


# -- sources ------------------------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    """The running interpreter's standard library directory (`Lib/` of a CPython checkout)."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_source(path: Path) -> str | None:
    """The file's text if it is a UTF-8 Python file that parses, else None."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        ast.parse(text)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None
    return text


def source_files(root: Path) -> dict[str, str]:
    """{relative path: text} for the usable `.py` files under `root`, sorted by path."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if set(rel.split("/")[:-1]) & SKIP_DIRS or not p.is_file() or p.stat().st_size > MAX_FILE_BYTES:
            continue
        text = read_source(p)
        if text is not None and text.strip():
            out[rel] = text
    return out


def split_of(rel_path: str) -> str:
    """ "test" for about `HELDOUT_PERCENT` % of paths, "train" for the rest, decided by the path alone."""
    h = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:4], "big")
    return "test" if h % 100 < HELDOUT_PERCENT else "train"


# -- tokenizer ----------------------------------------------------------------------------------------------------
def build_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a byte-level BPE on `texts` and write tokenizer.json + tokenizer_config.json into `out_dir`."""
    tok = byte_bpe(texts, vocab_size, list(SPECIAL_TOKENS))
    return save_tokenizer(tok, out_dir, 512, additional_special_tokens=list(SPECIAL_TOKENS[3:]))


# -- spans --------------------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One infilling problem: `text[start:end]` of file `path` is the middle."""

    path: str
    kind: str
    start: int
    end: int
    prefix: str  # the text before the middle (the last PREFIX_CHARS characters)
    middle: str
    suffix: str  # the text after it (the first SUFFIX_CHARS characters)

    @classmethod
    def cut(cls, path: str, kind: str, text: str, start: int, end: int) -> Item:
        return cls(
            path,
            kind,
            start,
            end,
            text[max(0, start - PREFIX_CHARS) : start],
            text[start:end],
            text[end : end + SUFFIX_CHARS],
        )


class _Lines:
    """Line start offsets of a text, and (line, UTF-8 column) -> character offset."""

    def __init__(self, text: str):
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for ln in self.lines:
            self.starts.append(self.starts[-1] + len(ln))

    def offset(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8", "replace"))

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Whole lines first..last (1-based, inclusive)."""
        return self.starts[first - 1], self.starts[last]


_OPENERS = {"(": ")", "[": "]", "{": "}"}
_BRACKETED = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Tuple)


def _bracket_spans(tree: ast.AST, lines: _Lines) -> list[tuple[int, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            start, end = lines.offset(node.func.end_lineno, node.func.end_col_offset), None  # type: ignore[arg-type]
        elif isinstance(node, ast.Subscript):
            start = lines.offset(node.value.end_lineno, node.value.end_col_offset)  # type: ignore[arg-type]
        elif isinstance(node, _BRACKETED):
            start = lines.offset(node.lineno, node.col_offset)
        else:
            continue
        end = lines.offset(node.end_lineno, node.end_col_offset)  # type: ignore[arg-type]
        seg = lines.text[start:end]
        if (
            3 <= len(seg) <= MAX_SPAN_CHARS
            and seg[0] in _OPENERS
            and seg[-1] == _OPENERS[seg[0]]
            and _unmatched(seg) == ("", "")
        ):
            out.append((start, end))
    return out


def _body_spans(tree: ast.AST, lines: _Lines) -> list[tuple[int, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            first = node.body[0]
            if lines.lines[first.lineno - 1][: first.col_offset].strip():
                continue  # the body starts on the header's line
            start, end = lines.span(first.lineno, node.end_lineno)
            if end - start <= MAX_SPAN_CHARS:
                out.append((start, end))
    return out


def candidate_spans(text: str) -> dict[str, list[tuple[int, int]]]:
    """{kind: [(start, end), ...]} of every span of each kind in one file (multi-line runs by start line and
    length)."""
    lines = _Lines(text)
    tree = ast.parse(text)
    blank = [not ln.strip() for ln in lines.lines]
    one = [lines.span(i + 1, i + 1) for i in range(len(lines.lines)) if not blank[i]]
    many = []
    for i in range(len(lines.lines)):
        for k in (2, 3, 4):
            if i + k <= len(lines.lines) and sum(not b for b in blank[i : i + k]) >= 2 and not blank[i]:
                s, e = lines.span(i + 1, i + k)
                if e - s <= MAX_SPAN_CHARS:
                    many.append((s, e))
    one = [(s, e) for s, e in one if e - s <= MAX_SPAN_CHARS]
    return {"line": one, "lines": many, "body": _body_spans(tree, lines), "bracket": _bracket_spans(tree, lines)}


def sample_items(files: dict[str, str], n: int, seed: int, count_tokens: Callable[[str], int]) -> list[Item]:
    """`n` spans from `files` ({path: text}), the kinds in turn, each kind's spans in a seeded random order, keeping
    those whose middle has 1..MAX_MIDDLE_TOKENS tokens (a kind whose spans run out starts its order again: repeats
    only then). Deterministic for the same files and seed."""
    rng = random.Random(seed)
    pools: dict[str, list[tuple[str, int, int]]] = {k: [] for k in SPAN_KINDS}
    for path, text in files.items():
        for kind, spans in candidate_spans(text).items():
            pools[kind].extend((path, s, e) for s, e in spans)
    for pool in pools.values():
        rng.shuffle(pool)
    cursor = dict.fromkeys(SPAN_KINDS, 0)
    items: list[Item] = []
    for i in range(n):
        kind = SPAN_KINDS[i % len(SPAN_KINDS)]
        pool = pools[kind]
        for _ in range(len(pool)):
            path, s, e = pool[cursor[kind] % len(pool)]
            cursor[kind] += 1
            if 1 <= count_tokens(files[path][s:e]) <= MAX_MIDDLE_TOKENS:
                items.append(Item.cut(path, kind, files[path], s, e))
                break
        else:
            raise ValueError(f"no {kind} span of 1..{MAX_MIDDLE_TOKENS} tokens in these files")
    return items


# -- formats ------------------------------------------------------------------------------------------------------
def suffix_ids(suffix: list[int], layout: Layout = CODE) -> list[int]:
    """The fixed tail of a diffusion canvas after the middle's room: the suffix's first `suffix_tokens` tokens, pads,
    and EOS in the canvas's last slot (pass it as `SamplingParams.suffix_token_ids` with max_new_tokens=room)."""
    n = layout.suffix_tokens
    s = suffix[:n]
    return s + [layout.pad] * (n - len(s)) + [layout.eos]


def diffusion_example(
    prefix: list[int], middle: list[int], suffix: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """(prompt, response, fixed) for the diffusion objective: the response plus the collator's EOS is exactly one
    canvas, laid out as inference lays it out; `fixed` marks the suffix region (never noised in training)."""
    if not 0 <= len(middle) <= MAX_MIDDLE_TOKENS:
        raise ValueError(f"the middle has {len(middle)} tokens; at most {MAX_MIDDLE_TOKENS} fit the canvas")
    room = middle + [EOS_ID] + [PAD_ID] * (ROOM - len(middle) - 1)
    return ar_prompt(prefix), room + suffix_ids(suffix)[:-1], list(range(ROOM, CANVAS))


def fim_prompt(prefix: list[int], suffix: list[int], layout: Layout = CODE) -> list[int]:
    """The FIM-reordered AR prompt: the middle follows <fim_middle> (ValueError if the layout has no FIM tokens)."""
    if layout.fim is None:
        raise ValueError("the FIM format needs a tokenizer with FIM tokens (<fim_prefix>, <fim_suffix>, <fim_middle>)")
    pre, suf, mid = layout.fim
    return layout.start() + [pre] + prefix[-layout.prefix_tokens :] + [suf] + suffix[: layout.suffix_tokens] + [mid]


def ar_prompt(prefix: list[int], layout: Layout = CODE) -> list[int]:
    """The left-to-right prompt (also the diffusion model's): BOS and the end of the prefix."""
    return layout.start() + prefix[-layout.prefix_tokens :]


# -- metrics ------------------------------------------------------------------------------------------------------
def _lines_norm(s: str) -> str:
    return "\n".join(ln.rstrip() for ln in s.strip("\n").splitlines()).strip("\n")


def exact_match(pred: str, ref: str, kind: str) -> bool:
    """Whitespace-insensitive for one-line kinds; multi-line kinds keep each line's indentation."""
    return _lines_norm(pred) == _lines_norm(ref) if kind in MULTI_LINE else pred.strip() == ref.strip()


def parses(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def _unmatched(s: str) -> tuple[str, str]:
    """(closers with no opener, openers left open) in `s`, outside strings and comments (a light scanner: string
    prefixes and escapes are handled, f-string internals are treated as string)."""
    closed, stack = [], []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "#":
            i = s.find("\n", i)
            i = n if i < 0 else i
            continue
        if c in "'\"":
            q = s[i : i + 3] if s[i : i + 3] in ("'''", '"""') else c
            j = i + len(q)
            while j < n and s[j : j + len(q)] != q and not (len(q) == 1 and s[j] == "\n"):
                j += 2 if s[j] == "\\" else 1
            i = j + len(q)
            continue
        if c in _OPENERS:
            stack.append(c)
        elif c in ")]}":
            if stack and _OPENERS[stack[-1]] == c:
                stack.pop()
            else:
                closed.append(c)
        i += 1
    return "".join(closed), "".join(stack)


def brackets_ok(pred: str, ref: str) -> bool:
    """The infill closes the brackets the gap had to close and leaves open those it had to leave open."""
    return _unmatched(pred) == _unmatched(ref)


def indent_ok(text: str) -> bool:
    """The file tokenizes without an indentation error (unclosed brackets are `brackets_ok`'s business)."""
    try:
        for _ in tokenize.generate_tokens(io.StringIO(text).readline):
            pass
    except IndentationError:
        return False
    except (SyntaxError, tokenize.TokenError):
        pass
    return True


def binary_reason(raw: bytes) -> str | None:
    """Why `raw` is not Python source text (NUL bytes, not UTF-8), or None."""
    if b"\0" in raw:
        return "it contains NUL bytes (a binary file?)"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"it is not UTF-8 text (byte {e.start})"
    return None
