"""Sudoku data for fine-tuning a small DiffusionGemma block-diffusion model.

Pure Python (plus HF `tokenizers` for `build_tokenizer`); no training code lives here.

Grids are strings of 81 characters '0'-'9', row-major, '0' meaning blank.

Puzzles and solutions
    parse_puzzle(s)            -> normalised 81-char grid ('.' accepted for blanks, whitespace stripped);
                                  raises SudokuError (a ValueError) on wrong length, bad characters or
                                  contradictory clues (naming the row/column/box and digit).
    solve(puzzle, limit=2)     -> up to `limit` solutions (bitmask candidates, naked- and hidden-single
                                  propagation, minimum-remaining-values backtracking);
                                  len(solve(p, 2)) == 1 <=> the solution is unique.
    is_valid_solution(grid), keeps_clues(puzzle, grid)
    generate(clues, rng)       -> (puzzle, solution) with a unique solution and exactly `clues` clues, 17-50:
                                  random removal from 22 up; 17-21 from known 17-clue puzzles under random
                                  symmetries plus added clues. transform(puzzle, solution, rng) is one such
                                  symmetry.
    difficulty(puzzle)         -> "easy" (>= 40 clues), "medium" (30-39), "hard" (< 30).
    build_dataset(n, seed, clue_range=(24, 50)), split(items, test_fraction=0.1, seed=0),
    save_jsonl(items, path), load_jsonl(path)

Text formats (published recipe)
    prompt_text(puzzle)  = INSTRUCTION + "\\n" + the 81 cells space-separated (0 = blank)
    target_text(solution) = the 81 digits space-separated
    extract_grid(text)   -> the first 81 digits found in `text` (as a grid string) or None

Tokenizer (ids are stable; change them only with a new tokenizer version)
    0 <pad>   1 <eos>   2 <bos>
    3..12     the digits '0'..'9'  (id = 3 + digit)
    13..25    the instruction words, in INSTRUCTION_WORDS order: 13 Solve, 14 this, 15 sudoku, 16 puzzle,
              17 ".", 18 Replace, 19 each, 20 with, 21 a, 22 digit, 23 from, 24 to, 25 ":"
    26        <unk>   (vocab size 27)
    build_tokenizer(dir) writes tokenizer.json (WordLevel model, Whitespace pre-tokenizer) and
    tokenizer_config.json; encode_grid / decode_grid map a grid to one token id per cell and back, in pure
    Python, consistent with the tokenizer. The tokenizer decodes the prompt with whitespace normalised
    (the newline after the instruction becomes a space).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Iterable

from dgemma.text.build import save_tokenizer

__all__ = [
    "SudokuError",
    "parse_puzzle",
    "solve",
    "is_valid_solution",
    "keeps_clues",
    "generate",
    "difficulty",
    "build_dataset",
    "split",
    "save_jsonl",
    "load_jsonl",
    "prompt_text",
    "target_text",
    "extract_grid",
    "build_tokenizer",
    "encode_grid",
    "decode_grid",
    "INSTRUCTION",
    "INSTRUCTION_WORDS",
    "VOCAB",
    "PAD_ID",
    "EOS_ID",
    "BOS_ID",
    "DIGIT_BASE_ID",
    "UNK_ID",
    "transform",
    "SEEDS_17",
]


class SudokuError(ValueError):
    """Malformed or contradictory puzzle, or a generation request that could not be met."""


# --------------------------------------------------------------------------- geometry

_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_PEERS: list[tuple[int, ...]] = [
    tuple(j for j in range(81) if j != i and (_ROW[j] == _ROW[i] or _COL[j] == _COL[i] or _BOX[j] == _BOX[i]))
    for i in range(81)
]
_UNITS: list[tuple[int, ...]] = (
    [tuple(r * 9 + c for c in range(9)) for r in range(9)]
    + [tuple(r * 9 + c for r in range(9)) for c in range(9)]
    + [tuple(i for i in range(81) if _BOX[i] == b) for b in range(9)]
)
_ALL = 0x3FE  # bits 1..9
_BIT = [1 << d for d in range(10)]
_POPCOUNT = [bin(m).count("1") for m in range(1024)]
_DIGITS_OF = [tuple(d for d in range(1, 10) if m >> d & 1) for m in range(1024)]
_DIGIT_OF_SINGLE = {1 << d: d for d in range(1, 10)}


# --------------------------------------------------------------------------- parsing / checks


def parse_puzzle(s: str) -> str:
    """Normalise a puzzle string: 81 cells of '1'-'9' or '0'/'.' for blanks, whitespace ignored."""
    if not isinstance(s, str):
        raise SudokuError(f"puzzle must be a string, got {type(s).__name__}")
    cells = "".join(s.split())
    if len(cells) != 81:
        raise SudokuError(f"puzzle must have 81 cells, got {len(cells)}")
    bad = sorted({c for c in cells if c not in "0123456789."})
    if bad:
        raise SudokuError(f"puzzle has invalid characters {bad!r}; use '1'-'9' and '0' or '.' for blanks")
    grid = cells.replace(".", "0")
    _check_consistent(grid)
    return grid


def _check_consistent(grid: str) -> None:
    seen: dict[tuple[str, int, str], int] = {}
    for i, c in enumerate(grid):
        if c == "0":
            continue
        for kind, idx in (("row", _ROW[i]), ("column", _COL[i]), ("box", _BOX[i])):
            key = (kind, idx, c)
            if key in seen:
                j = seen[key]
                raise SudokuError(
                    f"contradictory clues: digit {c} appears twice in {kind} {idx + 1} "
                    f"(cells r{_ROW[j] + 1}c{_COL[j] + 1} and r{_ROW[i] + 1}c{_COL[i] + 1})"
                )
            seen[key] = i


def _is_grid(grid: object) -> bool:
    return isinstance(grid, str) and len(grid) == 81 and all(c in "0123456789" for c in grid)


def is_valid_solution(grid: str) -> bool:
    """True if `grid` is a complete, correct Sudoku (every row, column and box holds 1-9 once)."""
    if not _is_grid(grid) or "0" in grid:
        return False
    full = set("123456789")
    for u in range(9):
        if set(grid[u * 9 : (u + 1) * 9]) != full:
            return False
        if set(grid[u::9]) != full:
            return False
        r0, c0 = (u // 3) * 3, (u % 3) * 3
        if {grid[(r0 + r) * 9 + c0 + c] for r in range(3) for c in range(3)} != full:
            return False
    return True


def keeps_clues(puzzle: str, grid: str) -> bool:
    """True if every clue of `puzzle` appears unchanged in `grid`."""
    puzzle = parse_puzzle(puzzle)
    return _is_grid(grid) and all(p == "0" or p == g for p, g in zip(puzzle, grid))


# --------------------------------------------------------------------------- solver


def _search(cells: list[int], cand: list[int], out: list[str], limit: int, rng: random.Random | None) -> None:
    """Depth-first search with naked/hidden-single propagation and MRV branching.

    `cells[i]` is the digit (0 = blank); `cand[i]` the candidate bitmask of blank cells. Mutates both (callers pass
    copies).
    """
    best = _propagate(cells, cand)
    if best is None:
        return
    if best < 0:
        out.append("".join(map(str, cells)))
        return
    digits = list(_DIGITS_OF[cand[best]])
    if rng is not None:
        rng.shuffle(digits)
    for d in digits:
        c2, k2 = cells[:], cand[:]
        c2[best] = d
        if _eliminate(c2, k2, _PEERS[best], _BIT[d]):
            _search(c2, k2, out, limit, rng)
            if len(out) >= limit:
                return


def _propagate(cells: list[int], cand: list[int]) -> int | None:
    """Naked singles (and, when none are left, hidden singles) to a fixed point. Returns the blank cell with the
    fewest candidates (where to branch), -1 when the grid is full, None on a contradiction."""
    while True:
        swept = _naked_singles(cells, cand)
        if swept is None:
            return None
        progressed, best = swept
        if progressed:
            continue
        if best < 0:
            return -1
        hidden = _hidden_singles(cells, cand)
        if not hidden:
            return None if hidden is None else best


def _naked_singles(cells: list[int], cand: list[int]) -> tuple[bool, int] | None:
    """One sweep placing every blank cell that has a single candidate. Returns (whether any was placed, the blank
    cell with the fewest candidates or -1), None on a contradiction."""
    best, best_n, progressed = -1, 10, False
    for i in range(81):
        if cells[i]:
            continue
        m = cand[i]
        n = _POPCOUNT[m]
        if n == 0:
            return None
        if n == 1:
            cells[i] = _DIGIT_OF_SINGLE[m]
            if not _eliminate(cells, cand, _PEERS[i], m):
                return None
            progressed = True
        elif n < best_n:
            best_n, best = n, i
    return progressed, best


def _eliminate(cells: list[int], cand: list[int], peers: Iterable[int], m: int) -> bool:
    """Remove the candidate bits `m` from the blank `peers`; False if one is left without candidates."""
    for p in peers:
        if not cells[p] and cand[p] & m:
            cand[p] &= ~m
            if not cand[p]:
                return False
    return True


def _hidden_singles(cells: list[int], cand: list[int]) -> bool | None:
    """Pin every digit that has exactly one possible cell in a unit to that cell. Returns whether anything changed,
    None on a contradiction (a digit with no place in some unit)."""
    progressed = False
    for unit in _UNITS:
        once = twice = placed = 0
        for i in unit:
            if cells[i]:
                placed |= _BIT[cells[i]]
            else:
                twice |= once & cand[i]
                once |= cand[i]
        if (once | placed) != _ALL:
            return None
        hidden = once & ~twice & ~placed
        while hidden:
            b = hidden & -hidden
            hidden ^= b
            for i in unit:
                if not cells[i] and cand[i] & b:
                    cand[i] &= b
                    progressed = True
                    break
    return progressed


def _initial(grid: str) -> tuple[list[int], list[int]]:
    cells = [ord(c) - 48 for c in grid]
    rows = [0] * 9
    cols = [0] * 9
    boxes = [0] * 9
    for i, d in enumerate(cells):
        if d:
            b = _BIT[d]
            rows[_ROW[i]] |= b
            cols[_COL[i]] |= b
            boxes[_BOX[i]] |= b
    cand = [0 if d else _ALL & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]]) for i, d in enumerate(cells)]
    return cells, cand


def solve(puzzle: str, limit: int = 2) -> list[str]:
    """Return up to `limit` solutions of `puzzle` (so `len(solve(p, 2)) == 1` means the solution is unique)."""
    if limit < 1:
        raise ValueError("limit must be >= 1")
    grid = parse_puzzle(puzzle)
    return _solve_grid(grid, limit)


def _solve_grid(grid: str, limit: int, rng: random.Random | None = None) -> list[str]:
    cells, cand = _initial(grid)
    out: list[str] = []
    _search(cells, cand, out, limit, rng)
    return out


# --------------------------------------------------------------------------- generation


def _random_full_grid(rng: random.Random) -> str:
    """A randomised backtracking fill of the empty grid (digits tried in random order at each branch)."""
    sols = _solve_grid("0" * 81, 1, rng)
    return sols[0]


# Known 17-clue puzzles (17 is the minimum for a unique solution). Puzzles of 17-21 clues are made from these by
# a random symmetry plus clues added from the solution: removal from a random grid almost never gets that low.
SEEDS_17 = (
    "000000010400000000020000000000050407008000300001090000300400200050100000000806000",
    "000000012000035000000600070700000300000400800100000000000120000080000040050000600",
    "000000012003600000000007000410020000000500300700000600280000040000300500000000000",
)
LOW_CLUES = 21  # at or below this, generate() derives puzzles from SEEDS_17


def transform(puzzle: str, solution: str, rng: random.Random) -> tuple[str, str]:
    """A random validity-preserving symmetry of a (puzzle, solution) pair: digit relabelling, row/column
    permutations within bands and stacks, band and stack permutations, transposition. The result is another
    unique-solution puzzle with the same clue count."""
    digits = list("123456789")
    rng.shuffle(digits)
    relabel = {"0": "0", **{str(i + 1): d for i, d in enumerate(digits)}}

    def perm() -> list[int]:
        bands = rng.sample(range(3), 3)
        return [3 * b + r for b in bands for r in rng.sample(range(3), 3)]

    rows, cols = perm(), perm()
    transpose = rng.random() < 0.5

    def apply(g: str) -> str:
        out = []
        for r in range(9):
            for c in range(9):
                rr, cc = (cols[c], rows[r]) if transpose else (rows[r], cols[c])
                out.append(relabel[g[9 * rr + cc]])
        return "".join(out)

    return apply(puzzle), apply(solution)


def generate(clues: int, rng: random.Random, max_attempts: int = 2000) -> tuple[str, str]:
    """A (puzzle, solution) pair: unique solution, exactly `clues` clues (17 <= clues <= 50).

    From 22 clues up: a random full grid, then cells removed in random order whenever the puzzle stays unique,
    stopping at `clues` (a grid that gets stuck above the target is replaced, up to `max_attempts` grids;
    measured on one core: 25 clues ~10 ms, 22 ~0.1 s). From 17 to 21 clues, where removal almost never arrives:
    a known 17-clue puzzle (`SEEDS_17`) under a random symmetry, plus `clues - 17` clues copied from its
    solution (adding clues keeps the solution unique). Deterministic for a given `rng` state.
    """
    if not isinstance(clues, int) or not 17 <= clues <= 50:
        raise SudokuError(f"clues must be an integer in 17..50, got {clues!r}")
    if clues <= LOW_CLUES:
        seed = rng.choice(SEEDS_17)
        puzzle, solution = transform(seed, _solve_grid(seed, 1)[0], rng)
        cells = list(puzzle)
        blanks = [i for i in range(81) if cells[i] == "0"]
        for i in rng.sample(blanks, clues - 17):
            cells[i] = solution[i]
        return "".join(cells), solution
    for _ in range(max_attempts):
        solution = _random_full_grid(rng)
        cells = list(solution)
        order = list(range(81))
        rng.shuffle(order)
        remaining = 81
        for i in order:
            if remaining == clues:
                break
            keep = cells[i]
            cells[i] = "0"
            if len(_solve_grid("".join(cells), 2)) == 1:
                remaining -= 1
            else:
                cells[i] = keep
        if remaining == clues:
            return "".join(cells), solution
    raise SudokuError(f"could not generate a unique puzzle with {clues} clues in {max_attempts} attempts")


def difficulty(puzzle: str) -> str:
    """'easy' (>= 40 clues), 'medium' (30-39) or 'hard' (< 30), as in the DiffusionGemma Sudoku eval."""
    n = 81 - parse_puzzle(puzzle).count("0")
    return "easy" if n >= 40 else "medium" if n >= 30 else "hard"


# --------------------------------------------------------------------------- datasets


def build_dataset(n: int, seed: int, clue_range: tuple[int, int] = (24, 50)) -> list[dict]:
    """`n` items {"puzzle", "solution", "clues", "difficulty"}; clue counts uniform in `clue_range` (inclusive).

    Deterministic for a given seed (and Python version: uses `random.Random(seed)`).
    """
    lo, hi = clue_range
    if not 17 <= lo <= hi <= 50:
        raise SudokuError(f"clue_range must satisfy 17 <= lo <= hi <= 50, got {clue_range!r}")
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        c = rng.randint(lo, hi)
        puzzle, solution = generate(c, rng)
        items.append({"puzzle": puzzle, "solution": solution, "clues": c, "difficulty": difficulty(puzzle)})
    return items


def split(items: list[dict], test_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Shuffle deterministically and split into (train, test); test gets round(len * test_fraction) items."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError("test_fraction must be in [0, 1]")
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_test = round(len(items) * test_fraction)
    test = [items[i] for i in idx[:n_test]]
    train = [items[i] for i in idx[n_test:]]
    return train, test


def save_jsonl(items: Iterable[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, sort_keys=True) + "\n")


def load_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- text formats

INSTRUCTION = "Solve this sudoku puzzle . Replace each 0 with a digit from 1 to 9 :"
INSTRUCTION_WORDS: tuple[str, ...] = tuple(dict.fromkeys(w for w in INSTRUCTION.split() if not w.isdigit()))


def prompt_text(puzzle: str) -> str:
    """Instruction line, newline, then the 81 cells space-separated (0 = blank)."""
    return INSTRUCTION + "\n" + " ".join(parse_puzzle(puzzle))


def target_text(solution: str) -> str:
    """The 81 digits space-separated."""
    if not _is_grid(solution):
        raise SudokuError("solution must be 81 digits")
    return " ".join(solution)


def extract_grid(text: str) -> str | None:
    """The first 81 digits found in `text` (anything else is ignored), or None if there are fewer."""
    digits = re.findall(r"[0-9]", text)
    return "".join(digits[:81]) if len(digits) >= 81 else None


# --------------------------------------------------------------------------- tokenizer

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
DIGIT_BASE_ID = 3  # '0' -> 3 ... '9' -> 12
VOCAB: dict[str, int] = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<bos>": BOS_ID}
VOCAB.update({str(d): DIGIT_BASE_ID + d for d in range(10)})
VOCAB.update({w: 13 + k for k, w in enumerate(INSTRUCTION_WORDS)})
UNK_ID = len(VOCAB)
VOCAB["<unk>"] = UNK_ID


def encode_grid(grid: str) -> list[int]:
    """One token id per cell: digit d -> DIGIT_BASE_ID + d."""
    if not _is_grid(grid):
        raise SudokuError("grid must be 81 characters '0'-'9'")
    return [DIGIT_BASE_ID + ord(c) - 48 for c in grid]


def decode_grid(ids: Iterable[int]) -> str:
    """Inverse of encode_grid; raises SudokuError on a non-digit id or a length other than 81."""
    out = []
    for t in ids:
        t = int(t)
        if not DIGIT_BASE_ID <= t < DIGIT_BASE_ID + 10:
            raise SudokuError(f"token id {t} is not a digit token")
        out.append(chr(48 + t - DIGIT_BASE_ID))
    if len(out) != 81:
        raise SudokuError(f"expected 81 digit tokens, got {len(out)}")
    return "".join(out)


def build_tokenizer(dir: str | Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json into `dir` (created if needed); return the directory."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<eos>", "<bos>", "<unk>")])
    return save_tokenizer(tok, dir, 512, unk_token="<unk>")
