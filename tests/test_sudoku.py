"""Sudoku data side: parser, solver, generator, dataset, text formats and tokenizer."""

import random

import pytest

from dgemma.tasks import sudoku as S

HARD17 = "000000010400000000020000000000050407008000300001090000300400200050100000000806000"
# Independently known solution of HARD17 (checked below against the solver, not produced by it).
SOLVED = "693784512487512936125963874932651487568247391741398625319475268856129743274836159"


def test_parse_accepts_dots_and_whitespace():
    s = "\n".join(HARD17[i : i + 9] for i in range(0, 81, 9)).replace("0", ".")
    assert S.parse_puzzle(" " + s + " \n") == HARD17


@pytest.mark.parametrize(
    "bad, msg",
    [
        (HARD17[:80], "81 cells, got 80"),
        (HARD17 + "1", "81 cells, got 82"),
        ("x" + HARD17[1:], "invalid characters"),
    ],
)
def test_parse_errors(bad, msg):
    with pytest.raises(S.SudokuError, match=msg):
        S.parse_puzzle(bad)


@pytest.mark.parametrize(
    "cells, unit",
    [
        ({0: "5", 8: "5"}, "row 1"),
        ({0: "5", 72: "5"}, "column 1"),
        ({0: "5", 20: "5"}, "box 1"),
        ({80: "3", 60: "3"}, "box 9"),
    ],
)
def test_parse_contradictions_name_the_unit(cells, unit):
    g = ["0"] * 81
    for i, c in cells.items():
        g[i] = c
    with pytest.raises(S.SudokuError, match=f"digit {list(cells.values())[0]} appears twice in {unit} "):
        S.parse_puzzle("".join(g))
    assert issubclass(S.SudokuError, ValueError)


def test_solver_hard_17_clue_unique():
    sols = S.solve(HARD17, 2)
    assert sols == [SOLVED]
    assert S.is_valid_solution(sols[0])
    assert S.keeps_clues(HARD17, sols[0])


def test_solver_detects_multiple_solutions():
    assert len(S.solve("0" * 81, 2)) == 2
    assert len(S.solve("0" * 81, 5)) == 5
    # HARD17 is minimal: dropping its clue '6' at r9c6 makes it ambiguous
    assert len(S.solve(HARD17[:-4] + "0000", 2)) == 2
    assert S.solve(HARD17, 1) == [SOLVED]


def test_validity_checks():
    assert S.is_valid_solution(SOLVED)
    swapped = SOLVED[1] + SOLVED[0] + SOLVED[2:]
    assert not S.is_valid_solution(swapped)
    assert not S.is_valid_solution(SOLVED[:80] + "0")
    assert not S.is_valid_solution(SOLVED[:80])
    # rows and columns fine but boxes broken: a cyclic shift-by-one Latin square
    latin = "".join("".join(str((r + c) % 9 + 1) for c in range(9)) for r in range(9))
    assert not S.is_valid_solution(latin)
    assert S.keeps_clues(HARD17, SOLVED)
    assert not S.keeps_clues(HARD17, SOLVED[:7] + "2" + SOLVED[8:])  # clue r1c8 = 1 overwritten


@pytest.mark.parametrize("clues", [17, 18, 20, 21, 22, 25, 30, 35, 40, 45, 50])
def test_generate_unique_with_exact_clues(clues):
    rng = random.Random(clues)
    for _ in range(2):
        puzzle, solution = S.generate(clues, rng)
        assert 81 - puzzle.count("0") == clues
        assert S.is_valid_solution(solution)
        assert S.keeps_clues(puzzle, solution)
        assert S.solve(puzzle, 2) == [solution]


def test_generate_rejects_out_of_range():
    with pytest.raises(S.SudokuError):
        S.generate(16, random.Random(0))
    with pytest.raises(S.SudokuError):
        S.generate(51, random.Random(0))


def test_difficulty_bins():
    def with_clues(n):
        return SOLVED[:n] + "0" * (81 - n)

    assert [S.difficulty(with_clues(n)) for n in (29, 30, 39, 40, 50)] == ["hard", "medium", "medium", "easy", "easy"]


def test_build_dataset_deterministic_and_bins():
    a = S.build_dataset(12, seed=7)
    assert a == S.build_dataset(12, seed=7)
    assert a != S.build_dataset(12, seed=8)
    for it in a:
        assert set(it) == {"puzzle", "solution", "clues", "difficulty"}
        assert 24 <= it["clues"] <= 50
        assert 81 - it["puzzle"].count("0") == it["clues"]
        exp = "easy" if it["clues"] >= 40 else "medium" if it["clues"] >= 30 else "hard"
        assert it["difficulty"] == exp
        assert S.keeps_clues(it["puzzle"], it["solution"]) and S.is_valid_solution(it["solution"])


def test_split_and_jsonl(tmp_path):
    items = [{"i": i} for i in range(50)]
    train, test = S.split(items, 0.1, seed=3)
    assert (len(train), len(test)) == (45, 5)
    assert sorted(x["i"] for x in train + test) == list(range(50))
    assert S.split(items, 0.1, seed=3) == (train, test)
    assert S.split(items, 0.1, seed=4) != (train, test)
    p = tmp_path / "d.jsonl"
    data = S.build_dataset(3, seed=1)
    S.save_jsonl(data, p)
    assert S.load_jsonl(p) == data
    assert len(p.read_text().splitlines()) == 3


def test_text_formats_and_extract():
    pt = S.prompt_text(HARD17.replace("0", "."))
    instr, cells = pt.split("\n")
    assert instr == S.INSTRUCTION
    assert cells.split(" ") == list(HARD17)
    tt = S.target_text(SOLVED)
    assert tt == " ".join(SOLVED) and len(tt) == 161
    assert S.extract_grid("Answer: " + tt + " 1 2 3") == SOLVED
    assert S.extract_grid("first: " + SOLVED[:40] + "\n" + SOLVED[40:]) == SOLVED
    assert S.extract_grid("1 2 3") is None


def test_grid_ids():
    ids = S.encode_grid(SOLVED)
    assert len(ids) == 81 and ids[0] == S.DIGIT_BASE_ID + 6
    assert S.decode_grid(ids) == SOLVED
    assert S.encode_grid("0" * 81) == [3] * 81
    with pytest.raises(S.SudokuError):
        S.decode_grid([S.PAD_ID] + ids[1:])
    with pytest.raises(S.SudokuError):
        S.decode_grid(ids[:80])


def test_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer

    d = S.build_tokenizer(tmp_path / "tok")
    assert (d / "tokenizer_config.json").exists()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>")] == [0, 1, 2]
    assert [tok.token_to_id(str(i)) for i in range(10)] == list(range(3, 13))
    assert tok.token_to_id("<unk>") == S.UNK_ID == tok.get_vocab_size() - 1 == 26  # ids are pinned
    assert tok.get_vocab() == S.VOCAB and tok.token_to_id("Solve") == 13 and tok.token_to_id(":") == 25
    pt = S.prompt_text(HARD17)
    enc = tok.encode(pt)
    assert S.UNK_ID not in enc.ids
    assert enc.ids[-81:] == S.encode_grid(HARD17)
    assert tok.decode(enc.ids) == " ".join(pt.split())
    tgt = tok.encode(S.target_text(SOLVED)).ids
    assert tgt == S.encode_grid(SOLVED)
    assert tok.encode("<bos> 5 <eos>").ids == [2, 8, 1]
    # the project's own tokenizer loader accepts the directory too
    from dgemma.text.tokenizer import Tokenizer as DT

    dt = DT.from_dir(d)
    assert dt.bos_token_id == 2 and dt.eos_token_id == 1
    assert dt.encode(S.target_text(SOLVED)) == S.encode_grid(SOLVED)


def test_low_clue_puzzles_vary_and_the_seeds_are_minimal_17s():
    rng = random.Random(3)
    puzzles = {S.generate(17, rng)[0] for _ in range(20)}
    assert len(puzzles) == 20  # random symmetries: all different
    for seed in S.SEEDS_17:
        assert 81 - seed.count("0") == 17 and len(S.solve(seed, 2)) == 1


def test_transform_preserves_validity_uniqueness_and_clue_count():
    rng = random.Random(0)
    p, sol = S.generate(30, rng)
    seen = set()
    for _ in range(20):
        tp, tsol = S.transform(p, sol, rng)
        assert tp.count("0") == p.count("0")
        assert S.is_valid_solution(tsol) and S.keeps_clues(tp, tsol) and S.solve(tp, 2) == [tsol]
        seen.add(tp)
    assert len(seen) > 15  # the symmetries really vary the puzzle
