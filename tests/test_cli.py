"""Tests for the `dgemma` command line (dgemma/cli.py), mostly in-process via `main([...])` for speed."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgemma import DiffusionGemma, save_model
from dgemma.entrypoints import cli, cli_generate
from dgemma.entrypoints.cli import SUBCOMMANDS, main, register
from dgemma.model.config import tiny_config
from dgemma.entrypoints.llm import LLM
from dgemma.engine.params import SamplingParams

from bpe import build_bpe_tokenizer
from forcing import force_canvas, printable_tokens

EOT = 4  # <end_of_turn> in tests/bpe.py: chat replies stop there
CANVAS = 16


@pytest.fixture(scope="module")
def ids_ckpt(tmp_path_factory) -> Path:
    """A checkpoint without a tokenizer (token ids only)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ids") / "ckpt"
    save_model(DiffusionGemma(tiny_config(vocab_size=64, canvas_length=CANVAS, max_position_embeddings=128)), d)
    return d


@pytest.fixture(scope="module")
def tok_ckpt(tmp_path_factory) -> Path:
    """A checkpoint with the tests' byte-level BPE tokenizer (300 tokens) and the default (Gemma) chat template."""
    tok = build_bpe_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("tokckpt") / "ckpt"
    save_model(
        DiffusionGemma(tiny_config(vocab_size=300, canvas_length=CANVAS, max_position_embeddings=512)),
        d,
        tokenizer_dir=tok,
    )
    return d


@pytest.fixture(scope="module")
def llms(ids_ckpt, tok_ckpt) -> dict[str, LLM]:
    return {"ids": LLM(ids_ckpt, max_batch=1), "tok": LLM(tok_ckpt, max_batch=1)}


def without_setup_lines(err: str) -> str:
    """stderr without the leading lines saying how the model runs (`dgemma: device cpu, dtype float32 (...)`,
    `dgemma: kernels: ...`), if the CLI prints them: the tests look at everything else."""
    lines = err.splitlines(keepends=True)
    while lines and lines[0].startswith(("dgemma: device ", "dgemma: kernels: ")):
        lines.pop(0)
    return "".join(lines)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, without_setup_lines(err)


def run_json(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out  # exactly one JSON object
    return json.loads(lines[0])


def assert_user_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgemma: error: "), err
    for n in needles:
        assert n in lines[0], err


# -- generate ------------------------------------------------------------------------------------------------------
def test_json_fields_and_tokens_match_llm_generate(capsys, ids_ckpt, llms):
    obj = run_json(
        capsys, "generate", "--model", ids_ckpt, "--prompt-ids", "5,6,7", "--max-new-tokens", 20, "--seed", 1
    )
    assert set(obj) == {
        "token_ids",
        "finish_reason",
        "tokens_per_forward",
        "denoising_steps",
        "prompt_tokens",
        "completion_tokens",
        "timings",
    }  # no "text": this checkpoint has no tokenizer
    # The CLI's engine has one row; so has this one, so both run the same arithmetic (batch shapes change rounding).
    ref = LLM(ids_ckpt, max_batch=1).generate(
        [{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_new_tokens=20, seed=1)
    )[0]
    assert obj["token_ids"] == ref.outputs[0].token_ids
    assert obj["finish_reason"] == ref.outputs[0].finish_reason
    assert obj["prompt_tokens"] == 3 and obj["completion_tokens"] == len(obj["token_ids"])
    assert obj["denoising_steps"] == ref.metrics["denoising_steps"] > 0
    assert obj["tokens_per_forward"] == pytest.approx(ref.metrics["tokens_per_forward"])
    t = obj["timings"]
    assert {"load_s", "ttft_s", "generate_s", "total_s"} <= set(t)
    assert all(isinstance(v, float) and v >= 0 for v in t.values())
    assert t["total_s"] >= t["generate_s"] >= t["ttft_s"]


def test_prompt_ids_without_tokenizer_prints_ids(capsys, ids_ckpt):
    args = (
        "generate",
        "--model",
        ids_ckpt,
        "--prompt-ids",
        "5, 6,7",
        "--max-new-tokens",
        40,
        "--seed",
        3,
        "--ignore-eos",
    )
    obj = run_json(capsys, *args)
    assert obj["completion_tokens"] == 40 and obj["finish_reason"] == "length"
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert out == " ".join(map(str, obj["token_ids"])) + "\n"
    assert err == ""  # not a terminal: no drafts


def test_text_prompt_streams_the_json_text(capsys, tok_ckpt, llms, monkeypatch):
    # Every canvas starts with a printable token and EOS does not end the output, so all three canvases of the 40
    # tokens have text to write, on any CPU (a random model could end or write nothing printable in the first one).
    force_canvas(monkeypatch, at={0: printable_tokens(llms["tok"].tokenizer, 300)[0]})
    params = SamplingParams(max_new_tokens=40, seed=1, ignore_eos=True)
    args = (
        "generate",
        "--model",
        tok_ckpt,
        "--prompt",
        "hello world",
        "--max-new-tokens",
        40,
        "--seed",
        1,
        "--ignore-eos",
    )
    obj = run_json(capsys, *args)
    ref = llms["tok"].generate("hello world", params)[0]
    assert obj["token_ids"] == ref.outputs[0].token_ids
    assert obj["text"] == ref.outputs[0].text == llms["tok"].decode(obj["token_ids"])
    assert obj["prompt_tokens"] == len(ref.prompt_token_ids)
    writes: list[str] = []
    real = cli_generate.generate_one

    def spy(llm, ids, params, *, out=None, **kw):
        class Tee:
            def write(self, s):
                writes.append(s)
                out.write(s)

            def flush(self):
                out.flush()

        return real(llm, ids, params, out=Tee(), **kw)

    monkeypatch.setattr(cli_generate, "generate_one", spy)
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert out == obj["text"] + "\n"
    # Streamed a canvas at a time, not printed at the end: one write per text delta of the engine's stream.
    deltas = [d.text for d in llms["tok"].generate_stream("hello world", params) if d.text]
    assert writes == deltas and len(writes) >= 3


def test_stop_string_cuts_text_and_stream(capsys, tok_ckpt, llms, monkeypatch):
    # The stop string straddles the first commit: every canvas ends with "Q" and starts with "Z", and no other
    # token holds either letter, so "QZ" first occurs across canvases 1 and 2 (the text around it is the model's).
    # The stream must hold the "Q" back when canvas 1 commits, then cut there.
    tok = llms["tok"].tokenizer
    qz = [i for i in range(300) if {"Q", "Z"} & set(tok.decode([i]))]
    force_canvas(monkeypatch, at={CANVAS - 1: tok.encode("Q")[0], 0: tok.encode("Z")[0]}, ban=qz)
    base = (
        "generate",
        "--model",
        tok_ckpt,
        "--prompt",
        "the quick brown fox",
        "--max-new-tokens",
        48,
        "--seed",
        7,
        "--ignore-eos",
    )
    full = run_json(capsys, *base)["text"]
    stop = "QZ"
    expect = full[: full.find(stop)]
    obj = run_json(capsys, *base, "--stop", stop)
    assert obj["finish_reason"] == "stop"
    assert obj["text"] == expect and "Q" not in expect
    assert obj["completion_tokens"] == CANVAS + 1 and obj["denoising_steps"] > 0  # tokens up to the "Z"
    code, out, err = run(capsys, *base, "--stop", stop)
    assert code == 0, err
    assert out == expect + "\n"


def test_mode_ar(capsys, ids_ckpt, llms):
    base = ("generate", "--model", ids_ckpt, "--prompt-ids", "9,10,11", "--max-new-tokens", 12, "--mode", "ar")
    obj = run_json(capsys, *base, "--seed", 2, "--ignore-eos")
    ref = llms["ids"].generate(
        [{"prompt_token_ids": [9, 10, 11]}], SamplingParams(max_new_tokens=12, mode="ar", seed=2, ignore_eos=True)
    )[0]
    assert obj["token_ids"] == ref.outputs[0].token_ids and len(obj["token_ids"]) == 12
    assert obj["tokens_per_forward"] == pytest.approx(1.0)
    assert obj["denoising_steps"] == 0
    sampled = run_json(capsys, *base, "--seed", 2, "--ignore-eos", "--temperature", 1.0, "--top-k", 5, "--top-p", 0.9)
    assert sampled["completion_tokens"] == 12


def test_reference_sampling(capsys, ids_ckpt, llms):
    args = (
        "generate",
        "--model",
        ids_ckpt,
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        20,
        "--seed",
        1,
        "--reference-sampling",
    )
    obj = run_json(capsys, *args)
    ref = llms["ids"].generate(
        [{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_new_tokens=20, seed=1), reference_sampling=True
    )[0]
    assert obj["token_ids"] == ref.outputs[0].token_ids
    assert obj["denoising_steps"] == ref.metrics["decoder_passes"]
    code, out, err = run(capsys, *args)
    assert code == 0 and out == " ".join(map(str, obj["token_ids"])) + "\n"
    code, out, err = run(capsys, *args, "--mode", "ar")
    assert_user_error(code, out, err, "reference_sampling", "mode")


def test_drafts_on_a_terminal(capsys, tok_ckpt, monkeypatch):
    steps = 6  # 2 canvases x 3 steps, whatever the model writes: 6 drafts to draw
    args = (
        "generate",
        "--model",
        tok_ckpt,
        "--prompt",
        "hello",
        "--max-new-tokens",
        2 * CANVAS,
        "--seed",
        5,
        "--ignore-eos",
        "--fixed-steps",
        "--max-denoising-steps",
        steps // 2,
    )
    code, plain, _ = run(capsys, *args)
    assert code == 0
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = run(capsys, *args)
    assert code == 0
    assert out == cli_generate.terminal_safe(plain)  # the committed text is the same, minus control characters
    assert "\x1b" not in out
    # The denoised canvas was drawn on stderr at every step, each time from the line start.
    assert err.count(cli_generate.DraftLine.DIM) == steps and err.count("\r") > steps
    last = err.rsplit("\r", 1)[1]
    assert last.startswith("\x1b[K") and "\x1b[2m" not in last  # ... and cleared at the end
    code, out, err = run(capsys, *args, "--no-drafts")
    assert code == 0 and out == cli_generate.terminal_safe(plain) and err == ""


def test_invalid_knob_names_the_field(capsys, ids_ckpt):
    code, out, err = run(capsys, "generate", "--model", ids_ckpt, "--prompt-ids", "1,2", "--t-min", 2, "--t-max", 1)
    assert_user_error(code, out, err, "t_max")
    code, out, err = run(capsys, "generate", "--model", ids_ckpt, "--prompt-ids", "1,2", "--entropy-bound", -1)
    assert_user_error(code, out, err, "entropy_bound")
    code, out, err = run(capsys, "generate", "--model", ids_ckpt, "--prompt-ids", "1,2", "--temperature", 0.5)
    assert_user_error(code, out, err, "--temperature", "--mode ar")
    code, out, err = run(capsys, "generate", "--model", ids_ckpt, "--prompt-ids", "1,2", "--stop-token-id", 999)
    assert_user_error(code, out, err, "stop_token_ids")


def test_usage_errors_exit_2(capsys, ids_ckpt):
    for argv in (
        ["generate", "--model", ids_ckpt],  # no prompt
        ["generate", "--model", ids_ckpt, "--prompt-ids", "1,x"],
        ["generate", "--model", ids_ckpt, "--prompt-ids", "1", "--prompt", "a"],
        ["generate", "--model", ids_ckpt, "--prompt-ids", "1", "--max-new-tokens", "0"],
        ["generate", "--model", ids_ckpt, "--prompt-ids", "1", "--mode", "beam"],
        ["frobnicate"],
    ):
        code, out, err = run(capsys, *argv)
        assert code == 2 and "usage:" in err and "Traceback" not in err, argv
    code, out, err = run(capsys)
    assert code == 2 and "generate" in err


def test_bad_checkpoints_exit_2(capsys, ids_ckpt, tmp_path):
    code, out, err = run(capsys, "generate", "--model", tmp_path / "nope", "--prompt-ids", "1,2")
    assert_user_error(code, out, err, "nope", "does not exist")
    bad = tmp_path / "bad"
    shutil.copytree(ids_ckpt, bad)
    (bad / "config.json").write_text("{not json")
    code, out, err = run(capsys, "generate", "--model", bad, "--prompt-ids", "1,2")
    assert_user_error(code, out, err, "config.json")
    (bad / "config.json").write_text((ids_ckpt / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\0" * 10)
    code, out, err = run(capsys, "generate", "--model", bad, "--prompt-ids", "1,2")
    assert_user_error(code, out, err, "model.safetensors")
    code, out, err = run(capsys, "generate", "--model", ids_ckpt, "--prompt", "text needs a tokenizer")
    assert_user_error(code, out, err, "tokenizer", "--prompt-ids")
    code, out, err = run(capsys, "generate", "--model", ids_ckpt, "--prompt-ids", "1", "--device", "nonsense")
    assert_user_error(code, out, err, "--device")


def test_prompt_too_long_exits_2(capsys, ids_ckpt, tok_ckpt):
    ids = ",".join(["5"] * 200)  # the checkpoint's context is 128 tokens
    code, out, err = run(capsys, "generate", "--model", ids_ckpt, "--prompt-ids", ids, "--max-new-tokens", 8)
    assert_user_error(code, out, err, "context length")
    code, out, err = run(
        capsys, "generate", "--model", ids_ckpt, "--prompt-ids", ids, "--max-new-tokens", 8, "--reference-sampling"
    )
    assert_user_error(code, out, err, "context length")
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        tok_ckpt,
        "--prompt",
        "hello world " * 40,
        "--max-new-tokens",
        8,
        "--max-model-len",
        32,
    )
    assert_user_error(code, out, err, "context length")
    code, out, err = run(capsys, "generate", "--model", ids_ckpt, "--prompt-ids", "1,2,3", "--max-new-tokens", 500)
    assert_user_error(code, out, err, "max_new_tokens", "context length")


def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "generate" in out and "chat" in out
    for name in SUBCOMMANDS:
        code, out, _ = run(capsys, name, "--help")
        assert code == 0 and out.startswith(f"usage: dgemma {name}"), name
    code, out, _ = run(capsys, "generate", "--help")
    for flag in (
        "--model",
        "--prompt",
        "--prompt-ids",
        "--max-new-tokens",
        "--seed",
        "--max-denoising-steps",
        "--t-min",
        "--t-max",
        "--entropy-bound",
        "--stability-threshold",
        "--confidence-threshold",
        "--fixed-steps",
        "--temperature",
        "--top-k",
        "--top-p",
        "--stop",
        "--reference-sampling",
        "--mode",
        "--dtype",
        "--device",
        "--chat",
        "--json",
    ):
        assert flag in out, flag
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("dgemma ")


def test_keyboard_interrupt_exits_130(capsys, ids_ckpt, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_generate, "generate_one", interrupted)
    code, out, err = run(capsys, "generate", "--model", ids_ckpt, "--prompt-ids", "1,2")
    assert code == 130 and "Traceback" not in err


def test_generate_chat_flag(capsys, tok_ckpt, llms):
    obj = run_json(
        capsys, "generate", "--model", tok_ckpt, "--prompt", "hi", "--chat", "--max-new-tokens", 20, "--seed", 4
    )
    ref = llms["tok"].generate(
        [[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=20, seed=4, stop_token_ids=[EOT])
    )[0]
    assert obj["token_ids"] == ref.outputs[0].token_ids and obj["text"] == ref.outputs[0].text
    assert obj["prompt_tokens"] == len(ref.prompt_token_ids)


# -- chat ----------------------------------------------------------------------------------------------------------
def _reply(llm: LLM, messages: list[dict], seed: int, max_new_tokens: int = 24) -> str:
    params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed, stop_token_ids=[EOT])
    return llm.generate([messages], params)[0].outputs[0].text


def test_chat_reset_and_exit(capsys, tok_ckpt, llms, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/reset\n\nagain\n/exit\nnever read\n"))
    code, out, err = run(capsys, "chat", "--model", tok_ckpt, "--max-new-tokens", 24, "--seed", 3)
    assert code == 0, err
    r1 = _reply(llms["tok"], [{"role": "user", "content": "hi"}], 3)
    r2 = _reply(llms["tok"], [{"role": "user", "content": "again"}], 3)  # after /reset: a fresh conversation
    assert out == f"{r1}\n{r2}\n"
    assert "> " not in out  # no prompt when stdin is not a terminal


def test_chat_keeps_history_until_eof(capsys, tok_ckpt, llms, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nmore\n"))
    code, out, err = run(capsys, "chat", "--model", tok_ckpt, "--max-new-tokens", 24, "--seed", 3)
    assert code == 0, err
    r1 = _reply(llms["tok"], [{"role": "user", "content": "hi"}], 3)
    r2 = _reply(
        llms["tok"],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": r1}, {"role": "user", "content": "more"}],
        3,
    )
    assert out == f"{r1}\n{r2}\n"


def test_chat_errors(capsys, ids_ckpt, tok_ckpt, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, out, err = run(capsys, "chat", "--model", ids_ckpt)
    assert_user_error(code, out, err, "tokenizer")
    # A message too long for the context is reported, and the conversation goes on.
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world " * 40 + "\n/bogus\nhi\n"))
    code, out, err = run(capsys, "chat", "--model", tok_ckpt, "--max-new-tokens", 8, "--max-model-len", 64, "--seed", 0)
    assert code == 0 and "context length" in err and "unknown command /bogus" in err and "Traceback" not in err
    # One reply, for "hi" alone (the rejected message is not kept). The reply is compared, not its newlines: a random
    # model may write some. Same engine shape and context length as the CLI's, so the same arithmetic.
    hi = _reply(LLM(tok_ckpt, max_batch=1, max_model_len=64), [{"role": "user", "content": "hi"}], 0, 8)
    assert out == hi + "\n"


# -- the registry ------------------------------------------------------------------------------------------------
def test_register_a_subcommand(capsys):
    def add(p):
        p.add_argument("--name", default="world", help="who to greet")

    def go(args):
        print(f"hello {args.name}")
        return 0

    register("hello-test", "say hello", add, go)
    try:
        with pytest.raises(ValueError):
            register("hello-test", "again", add, go)
        code, out, _ = run(capsys, "hello-test", "--name", "dgemma")
        assert code == 0 and out == "hello dgemma\n"
        code, out, _ = run(capsys, "--help")
        assert "hello-test" in out and "say hello" in out
    finally:
        SUBCOMMANDS.pop("hello-test", None)


def test_a_broken_plugin_is_an_error_not_a_warning(monkeypatch):
    monkeypatch.setattr(cli, "PLUGINS", [*cli.PLUGINS, "dgemma.tasks.no_such_plugin"])
    with pytest.raises(ModuleNotFoundError, match="no_such_plugin"):
        cli.build_parser()


def test_serve_without_the_extra_says_what_to_install(capsys, monkeypatch, ids_ckpt):
    for name in ("fastapi", "uvicorn"):
        monkeypatch.setitem(sys.modules, name, None)  # `import fastapi` raises ImportError
    code, out, _ = run(capsys, "serve", "--help")
    assert code == 0 and "--port" in out
    code, out, err = run(capsys, "serve", "--model", ids_ckpt)
    assert_user_error(code, out, err, "dgemma serve needs fastapi, uvicorn: pip install 'dgemma[serve]'")


def test_cli_imports_without_the_serve_extra(tmp_path):
    """The plugins import normally (an error is not swallowed), so none may need the `serve` extra to import."""
    block = "import sys; sys.modules.update(dict.fromkeys(['fastapi', 'uvicorn', 'pydantic', 'prometheus_client']))"
    code = f"{block}; from dgemma.entrypoints.cli import main; sys.exit(main(['serve', '--model', 'x']))"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr.splitlines() == [
        "dgemma: error: dgemma serve needs fastapi, uvicorn, prometheus_client, pydantic: pip install 'dgemma[serve]'"
    ]


# -- a real process ----------------------------------------------------------------------------------------------
def test_console_script_exit_codes(ids_ckpt, tmp_path):
    exe = shutil.which("dgemma")
    cmd = [exe] if exe else [sys.executable, "-m", "dgemma.entrypoints.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run(
        cmd
        + [
            "generate",
            "--model",
            str(ids_ckpt),
            "--prompt-ids",
            "5,6,7",
            "--max-new-tokens",
            "16",
            "--seed",
            "1",
            "--json",
            "--threads",
            "1",
            "--ignore-eos",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    obj = json.loads(ok.stdout)
    assert obj["completion_tokens"] == len(obj["token_ids"]) == 16  # --ignore-eos: the length is not left to EOS
    bad = subprocess.run(
        cmd + ["generate", "--model", str(tmp_path / "missing"), "--prompt-ids", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    err = without_setup_lines(bad.stderr)
    assert err.startswith("dgemma: error: ") and "Traceback" not in err


def test_generate_structured_output_flags(capsys, tok_ckpt, tmp_path):
    import re as _re

    base = ("generate", "--model", str(tok_ckpt), "--prompt", "x")
    out = run_json(capsys, *base, "--seed", "0", "--max-new-tokens", "32", "--regex", "[0-9]{4}")
    assert _re.fullmatch("[0-9]{4}", out["text"])
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}))
    out = run_json(capsys, *base, "--seed", "0", "--max-new-tokens", "64", "--json-schema", str(schema))
    assert isinstance(json.loads(out["text"])["a"], bool)
    out = run_json(capsys, *base, "--seed", "1", "--max-new-tokens", "16", "--choice", "yes", "--choice", "no")
    assert out["text"] in ("yes", "no")
    code, _, err = run(capsys, *base, "--json-schema", "nope.json")
    assert code == 2 and "neither inline text nor an existing file" in err
    code, _, err = run(capsys, *base, "--regex", "(")
    assert code == 2 and "regex" in err
