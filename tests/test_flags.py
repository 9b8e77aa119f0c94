"""Command-line flags derived from config dataclasses (dgemma/entrypoints/flags.py) and the three training commands
built on them: `dgemma train`, `dgemma sudoku train`, `dgemma code train`."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Literal

import pytest

from dgemma.entrypoints import cli, cli_train
from dgemma.entrypoints.flags import CLIError, add_flags, flags_of, from_args
from dgemma.tasks import code_cli, sudoku_cli
from dgemma.tasks import code_model, sudoku_model
from dgemma.training.config import TrainConfig

# (the command, its config dataclass, its table, the arguments it requires)
COMMANDS = {
    "train": (TrainConfig, cli_train.TRAIN_FLAGS, ["--model", "m", "--data", "d.jsonl", "--output", "o"]),
    "sudoku train": (sudoku_model.Recipe, sudoku_cli.TRAIN_FLAGS, []),
    "code train": (code_model.Recipe, code_cli.TRAIN_FLAGS, []),
}


def subparser(command: str) -> argparse.ArgumentParser:
    p = cli.build_parser()
    for word in command.split():
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    return p


def parse(command: str, *argv: str) -> argparse.Namespace:
    return subparser(command).parse_args([*COMMANDS[command][2], *argv])


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_are_the_dataclass_defaults(command):
    cls, table, _ = COMMANDS[command]
    built = from_args(cls, parse(command), table)
    expect = cls()
    if command == "code train":  # --parallel: unset, the command decides from the cores
        assert built.parallel is None
        built = dataclasses.replace(built, parallel=expect.parallel)
    assert built == expect


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_flag(command, capsys):
    p = subparser(command)
    for action in p._actions:
        assert action.help and not action.help.startswith("(default"), action.option_strings
    text = p.format_help()
    for fl in flags_of(*COMMANDS[command][:2]):
        assert fl.options[0] in text


def test_train_flags_set_their_fields():
    args = parse(
        "train",
        "--objective",
        "ar",
        "--steps",
        "7",
        "--lr",
        "0.01",
        "--no-prompt-loss",
        "--lora-targets",
        "q_proj,,v_proj",
        "--save-every",
        "3",
    )
    cfg = from_args(TrainConfig, args, cli_train.TRAIN_FLAGS, precision="float32")
    assert (cfg.objective, cfg.steps, cfg.lr, cfg.prompt_loss, cfg.save_every) == ("ar", 7, 0.01, False, 3)
    assert cfg.lora_targets == ("q_proj", "v_proj") and cfg.precision == "float32"
    assert from_args(TrainConfig, parse("train", "--prompt-loss"), cli_train.TRAIN_FLAGS).prompt_loss is True
    # the flag's name, not the field's: --puzzles sets n_base, --output out_dir
    r = from_args(sudoku_model.Recipe, parse("sudoku train", "--puzzles", "5", "-o", "x"), sudoku_cli.TRAIN_FLAGS)
    assert (r.n_base, r.out_dir) == (5, "x")


def test_usage_errors_keep_their_messages(capsys):
    for argv, needle in (
        (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
        (["--batch-size", "x"], "argument --batch-size: expected a positive integer, got 'x'"),
        (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
        (["--objective", "mlm"], "argument --objective: invalid choice: 'mlm'"),
    ):
        with pytest.raises(SystemExit) as e:
            parse("train", *argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err
    with pytest.raises(CLIError, match=r"unknown objective 'mlm'; choose from diffusion, ar \(comma-separated\)"):
        from_args(sudoku_model.Recipe, parse("sudoku train", "--objectives", "diffusion,mlm"), sudoku_cli.TRAIN_FLAGS)
    with pytest.raises(CLIError, match="unknown objective ','"):
        from_args(code_model.Recipe, parse("code train", "--objectives", ","), code_cli.TRAIN_FLAGS)


@dataclasses.dataclass
class Toy:
    size: int = 3
    name: str | None = None
    kind: Literal["a", "b"] = "a"
    tags: tuple[str, ...] = ("x",)
    on: bool = False
    ratio: float = 0.5


def test_a_table_builds_typed_flags():
    table = {
        "size": {"ge": 2, "help": "how big"},
        "name": {"metavar": "STR", "help": "a name"},
        "kind": {"group": "what", "help": "which kind"},
        "tags": {"choices": ("x", "y"), "help": "labels"},
        "on": {"help": "switch"},
    }
    p = argparse.ArgumentParser()
    groups = add_flags(p, Toy, table)
    assert list(groups) == ["what"]
    got = from_args(Toy, p.parse_args(["--size", "2", "--kind", "b", "--tags", "y,x", "--on"]), table, ratio=1.0)
    assert got == Toy(size=2, name=None, kind="b", tags=("y", "x"), on=True, ratio=1.0)
    assert "--ratio" not in p.format_help()  # not in the table: no flag
    help_text = " ".join(p.format_help().split())
    assert "how big (default: 3)" in help_text and "switch (default: off)" in help_text
    assert "labels (comma-separated: x, y) (default: x)" in help_text and "a name (default" not in help_text
    with pytest.raises(SystemExit):
        p.parse_args(["--size", "1"])
    for bad in ({"nope": {"help": "no such field"}}, {"size": {"hlep": "a typo"}}, {"size": {}}):
        with pytest.raises(TypeError, match="bad flag table entries"):
            flags_of(Toy, bad)
