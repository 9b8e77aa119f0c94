"""The code models: a tiny end-to-end `dgemma code train` -> infill -> eval run, the live canvas, infilling with
any checkpoint (a random one with the task's tokenizer, the bundled Sudoku model), and a code checkpoint through
`LLM` and the server's /v1/completions with `suffix`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma import LLM, DiffusionGemma, save_model
from dgemma.model.checkpoint import BUNDLED_MODELS
from dgemma.entrypoints.cli import main as cli_main
from dgemma.engine.params import SamplingParams
from dgemma.tasks import code as C
from dgemma.tasks.code_cli import eval_command
from dgemma.tasks.code_model import (
    FORMATS,
    GENERATION_CONFIG,
    VARIANTS,
    Infiller,
    Recipe,
    layout_of,
    model_config,
    score,
)

from test_code import fake_stdlib

FILE = "def area(r):\n    return 3.14 * r * r\n\n\nprint(area(2))\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """`dgemma code train` at toy size on a fake Lib/: (the run directory, the Lib/ directory)."""
    base = tmp_path_factory.mktemp("code")
    lib = base / "Lib"
    lib.mkdir()
    fake_stdlib(lib)
    out = base / "run"
    assert (
        cli_main(
            [
                "code",
                "train",
                "--output",
                str(out),
                "--stdlib",
                str(lib),
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--examples",
                "16",
                "--held-out",
                "2",
                "--hidden",
                "32",
                "--layers",
                "2",
                "--vocab",
                "300",
                "--parallel",
                "1",
                "--prompt-loss",
                "--ar-weight",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return out, lib


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random code checkpoint: the task's tokenizer (trained on a fake Lib/), model shape and generation config."""
    base = tmp_path_factory.mktemp("tiny")
    (base / "Lib").mkdir()
    tok = C.build_tokenizer(C.source_files(fake_stdlib(base / "Lib")).values(), base / "tokenizer", vocab_size=300)
    torch.manual_seed(0)
    model = DiffusionGemma(model_config(hidden=32, layers=2, heads=4, vocab=300))
    return save_model(model, base / "model", generation_config=GENERATION_CONFIG, tokenizer_dir=tok)


def test_train_writes_three_models_from_one_init(run):
    out, _ = run
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["steps"] == 2 and saved["objectives"] == ["diffusion", "fim", "ar"]
    assert saved["prompt_loss"] is True and saved["ar_weight"] == 1.0  # (the fixture's flags)
    logs = {o: [json.loads(x) for x in (out / o / "train_log.jsonl").read_text().splitlines()] for o in FORMATS}
    # The diffusion model trains both losses (backward through the denoising pass and the clean canvas's encoder pass)
    assert logs["diffusion"][-1]["diffusion_loss"] > 0 and logs["diffusion"][-1]["ar_loss"] > 0
    assert logs["fim"][-1]["ar_loss"] > 0 and logs["ar"][-1]["ar_loss"] > 0
    for o in FORMATS:  # every model's next-token loss covers the prompt too
        state = json.loads((out / o / "checkpoint-000001" / "train_state" / "state.json").read_text())
        assert state["config"]["prompt_loss"] is True
    for o in FORMATS:
        final = out / o / "final"
        assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
        assert json.loads((final / "generation_config.json").read_text())["max_new_tokens"] == C.ROOM
    init = json.loads((out / "init" / "config.json").read_text())
    assert init["canvas_length"] == C.CANVAS and init["text_config"]["vocab_size"] == 300


def test_infiller_formats_stay_within_the_room(run):
    out, _ = run
    for fmt in FORMATS:
        res = Infiller(out / fmt / "final", fmt, max_batch=2, device="cpu", max_denoising_steps=3).infill(
            [FILE[:13], "x = ("], [FILE[33:], ")\n"]
        )
        assert len(res) == 2 and all(0 <= r.tokens <= C.ROOM and r.forwards >= 1 for r in res)
    with pytest.raises(ValueError, match="no FIM tokens"):
        Infiller(BUNDLED_MODELS["sudoku"], "fim", device="cpu")


def test_infill_cli_prints_the_file_and_draws_the_canvas(run, tmp_path, capsys):
    out, _ = run
    src = tmp_path / "area.py"
    src.write_text(FILE)
    model = str(out / "diffusion" / "final")
    assert cli_main(["code", "infill", str(src), "--line", "2", "--model", model, "--device", "cpu", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["original"] == "    return 3.14 * r * r\n" and rec["gap"] == "line 2" and rec["forwards"] >= 1
    assert (
        cli_main(
            [
                "code",
                "infill",
                str(src),
                "--span",
                "1:2",
                "--model",
                model,
                "--device",
                "cpu",
                "--print-file",
                "--live",
                "always",
            ]
        )
        == 0
    )
    shown = capsys.readouterr().out
    assert "\x1b[1;4m" in shown  # the draft canvas, drawn in place
    assert shown.endswith("\n\nprint(area(2))\n")  # then the whole file with the gap filled
    assert (
        cli_main(["code", "infill", str(src), "--line", "2", "--model", model, "--format", "ar", "--fixed-steps"]) == 2
    )
    assert "--fixed-steps applies only to --format diffusion" in capsys.readouterr().err


def test_eval_cli_prints_a_table_and_json(run, capsys):
    out, lib = run
    finals = {o: str(out / o / "final") for o in FORMATS}
    assert (
        cli_main(
            [
                "code",
                "eval",
                "--diffusion-model",
                finals["diffusion"],
                "--fim-model",
                finals["fim"],
                "--ar-model",
                finals["ar"],
                "--data",
                str(out / "data" / "test.jsonl"),
                "--stdlib",
                str(lib),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["variant", "1-line", "exact"]
    res = json.loads(lines[-1])["results"]
    assert [r["variant"] for r in res] == list(VARIANTS) and len(lines) == len(VARIANTS) + 2
    for r in res:
        assert r["n"] == 2 * len(C.SPAN_KINDS) and r["tokens_per_forward"] >= 0
        assert r["ms_per_infill"] > 0 or r["variant"] == "empty"
        assert all(0 <= r[k] <= 1 for k in ("single_line_exact", "multi_line_parse", "brackets_ok", "indent_ok"))
    # The do-nothing reference: every gap left empty, scored like a model's infills (no span here is empty)
    items = [C.Item(**d) for d in C.load_jsonl(out / "data" / "test.jsonl")]
    files = {it.path: (lib / it.path).read_text() for it in items}
    empty = res[list(VARIANTS).index("empty")]
    assert empty["per_kind"] == score(items, [""] * len(items), files)
    assert empty["single_line_exact"] == 0 and empty["tokens_per_forward"] == 0
    assert cli_main(["code", "eval", "--variants", "diffusion,beam"]) == 2
    assert "unknown variant 'beam'" in capsys.readouterr().err
    assert cli_main(["code", "eval", "--variants", "fim-ar,empty"]) == 2
    assert "fim-ar needs a model: --fim-model PATH, or --run DIR" in capsys.readouterr().err
    for cmd in (["code", "train", "--objectives", "fim,bert"], ["sudoku", "train", "--objectives", "fim"]):
        assert cli_main([*cmd, "--output", str(out / "never")]) == 2
        assert "unknown objective" in capsys.readouterr().err and not (out / "never").exists()


def test_eval_takes_a_training_run(run, capsys):
    out, lib = run
    argv = ["code", "eval", "--run", str(out), "--variants", "ar,empty", "--per-kind", "1", "--stdlib", str(lib)]
    assert cli_main([*argv, "--quiet", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["variant"] for r in res["results"]] == ["ar", "empty"] and res["n"] == len(C.SPAN_KINDS)
    assert eval_command("runs/x", ["diffusion", "fim", "ar"]) == "dgemma code eval --run runs/x"
    assert eval_command("runs/x", ["fim", "ar"]) == "dgemma code eval --run runs/x --variants fim-ar,ar,empty"


def test_eval_refuses_training_files(run, tmp_path):
    from dgemma.tasks.code_model import held_out_files

    out, lib = run
    train = [C.Item(**d) for d in C.load_jsonl(out / "data" / "train.jsonl")]
    with pytest.raises(ValueError, match="is a training file"):
        held_out_files(train[:1], lib)


def test_recipe_defaults_are_a_small_model():
    r = Recipe()
    assert model_config(r.hidden, r.layers, r.heads, r.vocab).text.num_parameters() * 4 < 30e6


# -- any checkpoint ------------------------------------------------------------------------------------------------
def test_only_sudoku_is_bundled_and_the_package_stays_small():
    models = Path(dgemma.__file__).parent / "models"
    assert sorted(BUNDLED_MODELS) == ["sudoku", "sudoku-ar"] and not list(models.glob("code*"))
    assert sum(f.stat().st_size for f in models.rglob("*") if f.is_file()) <= 10e6  # the wheel stays under 10 MB


def test_a_code_checkpoint_gets_the_trained_layout_and_infills(tiny):
    llm = LLM(tiny, max_batch=1, device="cpu")
    assert llm.model.config.canvas_length == C.CANVAS and llm.tokenizer.token_to_id("<fim_middle>") == C.FIM_MIDDLE_ID
    assert layout_of(llm) == C.CODE  # the task's tokenizer and canvas: the layout the models are trained on
    out = llm.generate("def area(r):\n", SamplingParams(max_new_tokens=C.ROOM, suffix="\n\nprint(area(2))\n", seed=0))[
        0
    ]
    assert out.outputs[0].finish_reason in ("stop", "length") and len(out.outputs[0].token_ids) <= C.ROOM


def test_any_checkpoint_infills_with_the_suffix_fixed_on_its_canvas(tmp_path, capsys):
    sudoku = BUNDLED_MODELS["sudoku"]  # no FIM tokens, a canvas of 82: the room is its first 41 positions
    inf = Infiller(sudoku, max_batch=1, device="cpu", max_denoising_steps=3)
    lay = inf.layout
    assert (lay.canvas, lay.room, lay.fim, lay.suffix_tokens) == (82, 41, None, 40)
    prompt, sp = inf._request([5, 6, 7], [8, 9], seed=0)
    assert sp.max_new_tokens == lay.room and sp.suffix_token_ids == [8, 9] + [lay.pad] * 38 + [lay.eos]
    drafts = [
        d.draft_token_ids
        for d in inf.llm.generate_stream([{"prompt_token_ids": prompt}], [sp], stream_drafts=True)
        if d.draft_token_ids is not None
    ]
    assert drafts and all(c[lay.room :] == sp.suffix_token_ids for c in drafts)  # fixed from the first step
    src = tmp_path / "area.py"
    src.write_text(FILE)
    for fmt in ("diffusion", "ar"):
        argv = ["code", "infill", str(src), "--line", "2", "--model", str(sudoku), "--format", fmt, "--json"]
        assert cli_main([*argv, "--device", "cpu"]) == 0
        rec = json.loads(capsys.readouterr().out)
        assert rec["original"] == "    return 3.14 * r * r\n" and 0 <= rec["tokens"] <= lay.room


def test_a_code_checkpoint_serves_fill_in_the_middle(tiny):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dgemma.entrypoints.server import create_app

    app = create_app(LLM(tiny, max_batch=2, device="cpu"), model_name="code")
    with TestClient(app) as tc:
        r = tc.post(
            "/v1/completions",
            json={
                "model": "code",
                "prompt": "def area(r):\n",
                "suffix": "\n\nx = 1\n",
                "max_tokens": C.ROOM,
                "seed": 0,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
