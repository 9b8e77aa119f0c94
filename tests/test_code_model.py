"""The code model: a tiny end-to-end `dgemma code train` -> infill -> eval run, the live canvas, and the bundled
checkpoints (by name, through `LLM`, the CLI and the server's /v1/completions with `suffix`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgemma import LLM
from dgemma.model.checkpoint import BUNDLED_MODELS
from dgemma.entrypoints.cli import main as cli_main
from dgemma.engine.params import SamplingParams
from dgemma.tasks import code as C
from dgemma.tasks.code_model import BUNDLED, VARIANTS, Infiller, Recipe, model_config, score

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


def test_train_writes_three_models_from_one_init(run):
    out, _ = run
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["steps"] == 2 and saved["objectives"] == ["diffusion", "fim", "ar"]
    assert saved["prompt_loss"] is True and saved["ar_weight"] == 1.0  # (the fixture's flags)
    logs = {o: [json.loads(x) for x in (out / o / "train_log.jsonl").read_text().splitlines()] for o in BUNDLED}
    # The diffusion model trains both losses (backward through the denoising pass and the clean canvas's encoder pass)
    assert logs["diffusion"][-1]["diffusion_loss"] > 0 and logs["diffusion"][-1]["ar_loss"] > 0
    assert logs["fim"][-1]["ar_loss"] > 0 and logs["ar"][-1]["ar_loss"] > 0
    for o in BUNDLED:  # every model's next-token loss covers the prompt too
        state = json.loads((out / o / "checkpoint-000001" / "train_state" / "state.json").read_text())
        assert state["config"]["prompt_loss"] is True
    for o in BUNDLED:
        final = out / o / "final"
        assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
        assert json.loads((final / "generation_config.json").read_text())["max_new_tokens"] == C.ROOM
    init = json.loads((out / "init" / "config.json").read_text())
    assert init["canvas_length"] == C.CANVAS and init["text_config"]["vocab_size"] == 300


def test_infiller_formats_stay_within_the_room(run):
    out, _ = run
    for fmt in BUNDLED:
        res = Infiller(out / fmt / "final", fmt, max_batch=2, device="cpu", max_denoising_steps=3).infill(
            [FILE[:13], "x = ("], [FILE[33:], ")\n"]
        )
        assert len(res) == 2 and all(0 <= r.tokens <= C.ROOM and r.forwards >= 1 for r in res)
    with pytest.raises(ValueError, match="not a code model"):
        Infiller(BUNDLED_MODELS["sudoku"])


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
    finals = {o: str(out / o / "final") for o in BUNDLED}
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
    for cmd in (["code", "train", "--objectives", "fim,bert"], ["sudoku", "train", "--objectives", "fim"]):
        assert cli_main([*cmd, "--output", str(out / "never")]) == 2
        assert "unknown objective" in capsys.readouterr().err and not (out / "never").exists()


def test_eval_refuses_training_files(run, tmp_path):
    from dgemma.tasks.code_model import held_out_files

    out, lib = run
    train = [C.Item(**d) for d in C.load_jsonl(out / "data" / "train.jsonl")]
    with pytest.raises(ValueError, match="is a training file"):
        held_out_files(train[:1], lib)


def test_recipe_defaults_fit_the_bundle_budget():
    r = Recipe()
    assert model_config(r.hidden, r.layers, r.heads, r.vocab).text.num_parameters() * 4 < 30e6


# -- the bundled models ------------------------------------------------------------------------------------------------
bundled = pytest.mark.skipif(
    not all((BUNDLED_MODELS[n] / "config.json").is_file() for n in BUNDLED.values()),
    reason="the bundled code models are not in this checkout",
)


@bundled
def test_bundled_models_are_small_and_infill_by_name():
    for name in BUNDLED.values():
        d = BUNDLED_MODELS[name]
        assert sum(f.stat().st_size for f in d.iterdir() if f.is_file()) <= 30e6, name
        assert (d / "README.md").is_file() or name != "code"
    llm = LLM(model="code", max_batch=1)
    assert llm.model.config.canvas_length == C.CANVAS and llm.tokenizer.token_to_id("<fim_middle>") == C.FIM_MIDDLE_ID
    out = llm.generate("def area(r):\n", SamplingParams(max_new_tokens=C.ROOM, suffix="\n\nprint(area(2))\n", seed=0))[
        0
    ]
    assert out.outputs[0].finish_reason in ("stop", "length") and len(out.outputs[0].token_ids) <= C.ROOM


@bundled
def test_bundled_model_serves_fill_in_the_middle():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dgemma.entrypoints.server import create_app

    app = create_app(LLM("code", max_batch=2), model_name="code")
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
