"""Code-infilling data: sources and the train/held-out split, the tokenizer, spans, formats, metrics, and the
`dgemma code infill` input errors (no model needed: they are found before one is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgemma.entrypoints.cli import main as cli_main
from dgemma.tasks import code as C
from dgemma.tasks.code_model import build_data, split_files

SOURCE = '''import os


def {name}_join(parts, sep=","):
    """Join the parts of {name}."""
    out = [p.strip() for p in parts]
    return sep.join(out)


class Box{n}:
    def __init__(self, size):
        self.size = size
        self.items = {{}}

    def put(self, key, value):
        self.items[key] = (value, os.sep)
        return len(self.items)


MARKS = [{marks}]
'''
TRAIN_MARK, TEST_MARK = "kqjxkqjx", "xjqkxjqk"  # the same letters: only where they occur decides the merges


def fake_stdlib(root: Path, n_train: int = 6, n_test: int = 2) -> Path:
    """A Lib/ directory with `n_train` training and `n_test` held-out modules (chosen by `split_of`), plus files that
    must be skipped. Training modules mention TRAIN_MARK many times, held-out ones TEST_MARK."""
    made = {"train": 0, "test": 0}
    want = {"train": n_train, "test": n_test}
    for i in range(1000):
        name = f"mod{i}"
        split = C.split_of(f"{name}.py")
        if made[split] >= want[split]:
            continue
        mark = TRAIN_MARK if split == "train" else TEST_MARK
        (root / f"{name}.py").write_text(SOURCE.format(name=name, n=i, marks=", ".join([f"'{mark}'"] * 60)))
        made[split] += 1
        if made == want:
            break
    assert made == want  # the search found enough names for both splits
    for skipped in ("site-packages/pkg.py", "test/test_x.py", "pkg/tests/t.py", "encodings/cp1.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("x = 1\n")
    (root / "latin1.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8
    (root / "broken.py").write_text("def f(:\n")  # does not parse
    return root


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    return fake_stdlib(tmp_path_factory.mktemp("Lib"))


@pytest.fixture(scope="module")
def data(lib, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    train, test = build_data(out, n_train=40, per_kind_test=3, seed=0, vocab=300, root=lib)
    return out, train, test


# -- sources and split ----------------------------------------------------------------------------------------------
def test_sources_skip_tests_site_packages_and_unparsable_files(lib):
    files = C.source_files(lib)
    assert all(p.startswith("mod") for p in files) and len(files) == 8


def test_split_depends_on_the_path_alone_and_is_disjoint(lib):
    splits = split_files(lib)
    assert set(splits) == {"train", "test"} and not set(splits["train"]) & set(splits["test"])
    assert len(splits["test"]) == 2 and len(splits["train"]) == 6
    assert all(C.split_of(p) == s for s, files in splits.items() for p in files)
    share = sum(C.split_of(f"pkg/m{i}.py") == "test" for i in range(2000)) / 2000
    assert 0.07 < share < 0.13  # about HELDOUT_PERCENT


def test_items_come_from_their_own_split_only(data):
    out, train, test = data
    assert {it.path for it in train} and {it.path for it in test}
    assert all(C.split_of(it.path) == "train" for it in train) and all(C.split_of(it.path) == "test" for it in test)
    assert not {it.path for it in train} & {it.path for it in test}
    manifest = json.loads((out / "manifest.json").read_text())
    assert not set(manifest["train_files"]) & set(manifest["test_files"])


def test_tokenizer_learns_from_training_files_only(data):
    from tokenizers import Tokenizer

    out, _, _ = data
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    vocab = tok.get_vocab()
    assert [vocab[t] for t in C.SPECIAL_TOKENS] == list(range(6)) and len(vocab) == 300
    assert any("kqjx" in t for t in vocab)  # merged: frequent in the training files
    assert not any("xjqk" in t for t in vocab)  # never merged: it occurs only in held-out files
    assert len(tok.encode(TEST_MARK).ids) > len(tok.encode(TRAIN_MARK).ids)
    assert tok.decode(tok.encode("def f(x):\n    return x  # é\n").ids) == "def f(x):\n    return x  # é\n"


def test_build_data_is_deterministic_and_cached(lib, data, tmp_path):
    _, train, test = data
    again, again_test = build_data(tmp_path, n_train=40, per_kind_test=3, seed=0, vocab=300, root=lib)
    assert again == train and again_test == test
    cached = build_data(tmp_path, n_train=40, per_kind_test=3, seed=0, vocab=300, root=lib)
    assert cached == (again, again_test)


# -- spans ----------------------------------------------------------------------------------------------------------
def test_span_kinds():
    text = SOURCE.format(name="x", n=1, marks="'a'") + "s = 'é'; n = len('é' * 2)\n"
    spans = {k: [text[s:e] for s, e in v] for k, v in C.candidate_spans(text).items()}
    assert "    out = [p.strip() for p in parts]\n" in spans["line"] and "\n" not in spans["line"]
    assert all(s.count("\n") in (2, 3, 4) for s in spans["lines"])
    assert (
        '    """Join the parts of x."""\n    out = [p.strip() for p in parts]\n    return sep.join(out)\n'
        in spans["body"]
    )
    assert "        self.items[key] = (value, os.sep)\n        return len(self.items)\n" in spans["body"]
    for expected in ("[p.strip() for p in parts]", "(out)", "(value, os.sep)", "[key]", "('é' * 2)"):
        assert expected in spans["bracket"], expected  # non-ASCII before a node: offsets are characters
    assert "{}" not in spans["bracket"]  # too short to be a task


def test_sample_items_takes_kinds_in_turn_within_the_room(lib):
    files = split_files(lib)["train"]
    words = lambda s: len(s.split())  # noqa: E731  (a stand-in tokenizer: one token per word)
    items = C.sample_items(files, 400, seed=3, count_tokens=words)
    assert [it.kind for it in items[:8]] == list(C.SPAN_KINDS) * 2
    assert all(1 <= words(it.middle) <= C.MAX_MIDDLE_TOKENS for it in items)
    for it in items:
        text = files[it.path]
        assert it.middle == text[it.start : it.end] and text[: it.start].endswith(it.prefix)
        assert text[it.end :].startswith(it.suffix)
    assert C.sample_items(files, 400, seed=3, count_tokens=words) == items
    assert len({(it.path, it.start, it.end) for it in items if it.kind == "body"}) < 100  # repeats once run out
    with pytest.raises(ValueError, match="no line span"):
        C.sample_items(files, 4, seed=0, count_tokens=lambda s: 1000)


# -- formats --------------------------------------------------------------------------------------------------------
def test_diffusion_example_is_one_canvas_laid_out_as_inference_lays_it_out():
    prefix, middle, suffix = list(range(100, 300)), [7, 8, 9], list(range(400, 500))
    prompt, response, fixed = C.diffusion_example(prefix, middle, suffix)
    assert prompt == [C.BOS_ID] + prefix[-C.PREFIX_TOKENS :]
    assert len(response) + 1 == C.CANVAS  # the collator's EOS is the canvas's last slot
    assert response[: C.ROOM] == middle + [C.EOS_ID] + [C.PAD_ID] * (C.ROOM - 4)
    # SamplingParams(max_new_tokens=ROOM, suffix_token_ids=suffix_ids(...)) fixes canvas[ROOM:] to these ids
    assert response[C.ROOM :] + [C.EOS_ID] == C.suffix_ids(suffix) and len(C.suffix_ids(suffix)) == C.CANVAS - C.ROOM
    assert fixed == list(range(C.ROOM, C.CANVAS))
    short = C.suffix_ids([5, 6])
    assert short == [5, 6] + [C.PAD_ID] * (C.SUFFIX_TOKENS - 2) + [C.EOS_ID]
    with pytest.raises(ValueError, match="at most"):
        C.diffusion_example(prefix, [1] * C.ROOM, suffix)


def test_ar_formats():
    prefix, suffix = list(range(100, 300)), list(range(400, 500))
    fim = C.fim_prompt(prefix, suffix)
    assert fim[:2] == [C.BOS_ID, C.FIM_PREFIX_ID] and fim[-1] == C.FIM_MIDDLE_ID
    assert fim[2 : 2 + C.PREFIX_TOKENS] == prefix[-C.PREFIX_TOKENS :]
    assert fim[2 + C.PREFIX_TOKENS] == C.FIM_SUFFIX_ID and fim[3 + C.PREFIX_TOKENS : -1] == suffix[: C.SUFFIX_TOKENS]
    assert C.ar_prompt(prefix) == [C.BOS_ID] + prefix[-C.PREFIX_TOKENS :]


# -- metrics --------------------------------------------------------------------------------------------------------
def test_metrics():
    assert C.exact_match("  return x \n", "return x\n", "line")
    assert C.exact_match("    a = 1\n    b = 2  \n", "    a = 1\n    b = 2\n", "lines")
    assert not C.exact_match("a = 1\nb = 2\n", "    a = 1\n    b = 2\n", "body")  # indentation matters
    assert C.parses("x = (1,\n 2)\n") and not C.parses("x = (1,\n")
    assert C.brackets_ok("f(a, [b])", "g(c)") and not C.brackets_ok("f(a, [b]", "g(c)")
    assert C.brackets_ok("1, 2)", "3)")  # closes the outer bracket the gap had to close
    assert C.brackets_ok("s = ')' # (\n", "t = 1\n")  # strings and comments do not count
    assert not C.brackets_ok("x = (1]", "x = (1)")
    assert C.indent_ok("if x:\n    y = 1\nz = 2\n")
    assert not C.indent_ok("if x:\n        y = 1\n    z = 2\n")
    assert C.indent_ok("x = (1,\n")  # unclosed brackets are not an indentation error


def test_binary_reason():
    assert C.binary_reason(b"x = 1\n") is None
    assert "NUL" in C.binary_reason(b"\x7fELF\x00\x01")
    assert "UTF-8" in C.binary_reason(b"s = '\xe9'\n")


# -- CLI input errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, setup, message",
    [
        (["missing.py", "--line", "1"], None, "missing.py: no such file"),
        (["src.py", "--line", "9"], "a = 1\nb = 2\n", "line 9 is out of range: src.py has 2 lines"),
        (["src.py", "--span", "2:5"], "a = 1\nb = 2\n", "line 5 is out of range"),
        (["src.py", "--span", "3:2"], "a = 1\n", "need 1 <= A <= B"),
        (["src.py", "--span", "two"], "a = 1\n", "--span takes A:B"),
        (["src.py", "--line", "1"], b"\x7fELF\x02\x01\x00\x00", "cannot infill: it contains NUL bytes"),
        (["src.py", "--line", "1"], b"s = '\xe9'\n", "cannot infill: it is not UTF-8"),
        (["src.py", "--line", "1"], "", "is empty: there is no line 1"),
        (["src.py"], "a = 1\n", "give --line N or --span A:B, or mark the gap with one <FILL> (found 0"),
        (["src.py"], "a = <FILL>\nb = <FILL>\n", "(found 2 markers)"),
        (["."], None, "is a directory"),
    ],
)
def test_infill_input_errors(args, setup, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        (tmp_path / "src.py").write_bytes(setup if isinstance(setup, bytes) else setup.encode())
    assert cli_main(["code", "infill", *args, "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error: ") and message in err


def test_infill_reads_stdin(monkeypatch, capsys):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x00\x01binary")))
    assert cli_main(["code", "infill", "--line", "1", "--model", "no-model"]) == 2
    assert "<stdin>: cannot infill: it contains NUL bytes" in capsys.readouterr().err


def test_infill_without_a_model_says_how_to_train_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src.py").write_text("a = 1\n")
    assert cli_main(["code", "infill", "src.py", "--line", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a checkpoint: --model PATH" in err and "dgemma code train" in err
