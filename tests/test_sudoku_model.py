"""The Sudoku model: data augmentation, prompts and templates, the solver, the CLI, and the bundled checkpoints."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dgemma import LLM
from dgemma.model.checkpoint import BUNDLED_MODELS, save_model
from dgemma.entrypoints.cli import main as cli_main
from dgemma.model.modeling import DiffusionGemma
from dgemma.tasks import sudoku as S
from dgemma.tasks.sudoku_cli import EXAMPLE
from dgemma.tasks.sudoku_model import (
    CANVAS,
    GENERATION_CONFIG,
    Recipe,
    Solver,
    build_data,
    canvas_template,
    model_config,
    prompt_ids,
    to_examples,
)
from dgemma.text.tokenizer import Tokenizer

from forcing import boost_token

PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"


@pytest.fixture(scope="module")
def tiny_sudoku(tmp_path_factory) -> Path:
    """A random-weights model with the Sudoku config and tokenizer that solves nothing, by construction: its weights
    make the digit 1 win every cell it writes (tests/forcing.py), so every grid repeats a digit within a row, on any
    CPU. (Plain random weights fail too, but only almost surely, and only as far as float rounding allows.)"""
    d = tmp_path_factory.mktemp("sudoku") / "model"
    torch.manual_seed(0)
    model = DiffusionGemma(model_config(hidden=32, layers=2, heads=2))
    boost_token(model, S.DIGIT_BASE_ID + 1)
    save_model(
        model, d, generation_config={**GENERATION_CONFIG, "max_denoising_steps": 4}, tokenizer_dir=S.build_tokenizer(d)
    )
    return d


def test_prompt_ids_match_the_tokenizer(tmp_path):
    tok = Tokenizer.from_dir(S.build_tokenizer(tmp_path))
    ids = prompt_ids(PUZZLE)
    assert ids == [tok.bos_token_id] + tok.encode(S.prompt_text(PUZZLE))
    assert ids[-81:] == S.encode_grid(PUZZLE)


def test_canvas_template_fixes_clues_and_eos():
    t = canvas_template(PUZZLE)
    assert len(t) == CANVAS and t[-1] == S.EOS_ID
    assert [t[i] for i in range(81) if PUZZLE[i] != "0"] == [S.DIGIT_BASE_ID + int(c) for c in PUZZLE if c != "0"]
    assert all(t[i] == -1 for i in range(81) if PUZZLE[i] == "0")


def test_examples_have_one_canvas(tmp_path):
    train, test = build_data(tmp_path, n_base=4, n_test=2, n_train=10, seed=0, progress=False)
    assert len(train) == 10 and len(test) == 2
    assert not {t["puzzle"] for t in test} & {t["puzzle"] for t in train}
    ex = to_examples(train[:2])
    assert len(ex[0].response) + 1 == CANVAS  # 81 cells + EOS fill the canvas exactly


def test_solver_reports_bad_lines_and_clamps_clues(tiny_sudoku):
    solver = Solver(tiny_sudoku, clamp=True, max_batch=4)
    bad_len, bad_char, contradiction = "123", "x" * 81, "11" + "0" * 79
    res = solver.solve([PUZZLE, bad_len, bad_char, contradiction, PUZZLE.replace("0", ".")])
    assert [r.error is None for r in res] == [True, False, False, False, True]
    assert "81" in res[1].error and "row" in res[3].error.lower()
    for r in (res[0], res[4]):
        assert r.grid is not None and not r.solved  # the model writes digits everywhere, never a solution
        assert all(r.grid[i] == PUZZLE[i] for i in range(81) if PUZZLE[i] != "0")  # clamped clues, whatever it writes
        assert r.steps >= 1


def test_solve_cli_lines_json_and_exit_status(tiny_sudoku, tmp_path, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text(PUZZLE + "\nbad line\n")
    out = tmp_path / "out.txt"
    code = cli_main(
        ["sudoku", "solve", "--model", str(tiny_sudoku), "--input", str(inp), "--output", str(out), "--device", "cpu"]
    )
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("error:")
    assert code == 1  # the model does not solve it, and one line was invalid
    capsys.readouterr()
    cli_main(["sudoku", "solve", "--model", str(tiny_sudoku), PUZZLE, "--json", "--mode", "ar"])
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    assert set(rec) >= {"puzzle", "grid", "solved", "error", "steps", "seconds"} and rec["solved"] is False
    assert cli_main(["sudoku", "solve", "--model", str(tiny_sudoku)]) == 2
    assert "no puzzles" in capsys.readouterr().err
    for action in (["solve", PUZZLE], ["eval", "--per-difficulty", "1"]):  # bad devices: a clear error
        assert cli_main(["sudoku", *action, "--device", "nonsense"]) == 2
        assert "invalid --device 'nonsense'" in capsys.readouterr().err
        if not torch.cuda.is_available():
            assert cli_main(["sudoku", *action, "--device", "cuda"]) == 2
            assert "CUDA is not available" in capsys.readouterr().err


def test_eval_cli_prints_a_table_and_json(tiny_sudoku, tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    rng = random.Random(1)
    S.save_jsonl([{"puzzle": S.generate(c, rng)[0]} for c in (45, 35, 26)], data)
    assert (
        cli_main(
            [
                "sudoku",
                "eval",
                "--diffusion-model",
                str(tiny_sudoku),
                "--ar-model",
                str(tiny_sudoku),
                "--data",
                str(data),
                "--per-difficulty",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])["results"]
    variants = (
        "diffusion+clamp",
        "diffusion",
        "diffusion+clamp+vote",
        "diffusion+clamp+vote-16x8",
        "ar",
        "ar+best-of-16",
        "ar+best-of-128",
    )
    assert {(r["variant"], r["difficulty"]) for r in res} == {
        (v, d) for v in variants for d in ("easy", "medium", "hard")
    }
    assert all(r["n"] == 1 and 0 <= r["rate"] <= 1 for r in res)


def test_train_recipe_runs_both_objectives_from_one_init(tmp_path):
    """The `dgemma sudoku train` path at toy size: one shared init, both objectives (in parallel processes on a
    multi-core machine), the recipe saved, and the Sudoku default ar_weight 0 (no next-token loss logged)."""
    from dgemma.tasks.sudoku_model import train_recipe

    r = Recipe(
        out_dir=str(tmp_path / "run"),
        hidden=32,
        layers=2,
        heads=2,
        n_base=4,
        n_train=8,
        n_test=2,
        steps=2,
        batch_size=4,
        warmup_steps=1,
    )
    finals = train_recipe(r, progress=False)
    assert set(finals) == {"diffusion", "ar"} and all((f / "model.safetensors").is_file() for f in finals.values())
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["ar_weight"] == 0.0 and saved["steps"] == 2
    logs = {
        o: [json.loads(x) for x in (tmp_path / "run" / o / "train_log.jsonl").read_text().splitlines()] for o in finals
    }
    assert logs["diffusion"][-1]["ar_loss"] is None and logs["ar"][-1]["ar_loss"] > 0


def test_recipe_defaults_fit_the_bundle_budget():
    cfg = model_config(Recipe().hidden, Recipe().layers, Recipe().heads)
    assert cfg.text.num_parameters() * 4 < 20e6  # float32 weights under 20 MB


# -- the bundled models ------------------------------------------------------------------------------------------------
bundled = pytest.mark.skipif(
    not (BUNDLED_MODELS["sudoku"] / "config.json").is_file(), reason="the bundled Sudoku model is not in this checkout"
)


@bundled
def test_bundled_models_are_small_and_load_by_name():
    for name in ("sudoku", "sudoku-ar"):
        d = BUNDLED_MODELS[name]
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        assert size <= 20e6, (name, size)
        for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
            assert (d / f).is_file()
    llm = LLM(model="sudoku", max_batch=1)
    assert llm.tokenizer is not None and llm.model.config.canvas_length == CANVAS


@bundled
def test_bundled_model_solves_the_example(capsys):
    assert cli_main(["sudoku", "solve", "--example", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["solved"] and S.is_valid_solution(rec["grid"]) and S.keeps_clues(EXAMPLE, rec["grid"])


def test_conflicting_cells_agreement_and_rounds(tiny_sudoku):
    from dgemma.tasks.sudoku_model import _agreed, conflicting_cells

    sol = S.solve(PUZZLE, 1)[0]
    assert conflicting_cells(sol) == set()
    broken = sol[0] + sol[0] + sol[2:]  # cell 1 copies cell 0: both conflict
    assert {0, 1} <= conflicting_cells(broken)
    other = sol[:80] + str(int(sol[80]) % 9 + 1)
    agreed = _agreed(PUZZLE, [sol, other])
    assert agreed[80] == ("0" if PUZZLE[80] == "0" else PUZZLE[80])  # disagreement: re-noised
    assert all(agreed[k] == sol[k] for k in range(80))  # agreement (and no conflict): clamped
    assert _agreed(PUZZLE, [broken])[1] == ("0" if PUZZLE[1] == "0" else PUZZLE[1])
    one = Solver(tiny_sudoku).solve([PUZZLE])[0]
    more = Solver(tiny_sudoku, rounds=3, samples=2).solve([PUZZLE])[0]
    assert not one.solved and not more.solved
    assert more.steps > one.steps  # unsolved: it drew more samples and rounds
    assert more.grid is not None and S.keeps_clues(PUZZLE, more.grid)
    with pytest.raises(ValueError, match="rounds"):
        Solver(tiny_sudoku, rounds=0)
