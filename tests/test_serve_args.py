"""The `dgemma serve` command line (dgemma.entrypoints.serve_args): vLLM's spellings, one-line answers for vLLM
options dgemma does not have, the positional MODEL, --seed and --generation-config; and `dgemma serve MODEL
--max-num-seqs 4 --api-key K` starting and serving as a vLLM command line would."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma.entrypoints.serve_args import VLLM_FLAGS, add_serve_arguments, arg_error

ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    return add_serve_arguments(argparse.ArgumentParser(prog="dgemma serve"))


def _parse(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


@pytest.mark.parametrize(
    "argv,replacement",
    [
        (["--gpu-memory-utilization", "0.9"], "--max-model-len and --max-num-seqs"),
        (["--pipeline-parallel-size", "2"], "--tensor-parallel-size"),
        (["--trust-remote-code"], "runs no code from the checkpoint"),
        (["--tool-call-parser=hermes"], "read from the chat template"),
        (["--disable-log-requests"], "use --no-access-log"),
    ],
)
def test_vllm_only_flags_get_one_line(capsys, argv, replacement):
    with pytest.raises(SystemExit) as e:
        _parse("m", *argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    flag = argv[0].split("=")[0]
    assert err == f"dgemma serve: error: {flag} is vLLM's; {VLLM_FLAGS[flag]}\n" and replacement in err


def test_vllm_table_names_real_options():
    parser = _parser()
    real = {s for a in parser._actions for s in a.option_strings if a.help != argparse.SUPPRESS}
    assert not set(VLLM_FLAGS) & real  # a vLLM flag dgemma has is a real option, not a table entry
    for flag, text in VLLM_FLAGS.items():
        named = re.findall(r"--[a-z][a-z-]+", text)
        assert all(n in real for n in named), (flag, named)
    help_text = parser.format_help()
    assert "--gpu-memory-utilization" not in help_text and "--max-num-seqs" in help_text


def test_the_dgemma_cli_answers_vllm_flags_in_one_line():
    code = "from dgemma.entrypoints.cli import main; raise SystemExit(main())"
    r = subprocess.run(
        [sys.executable, "-c", code, "serve", "m", "--enable-prefix-caching"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "reused automatically" in r.stderr, r.stderr


def test_model_positional_or_flag():
    for argv in (["m"], ["--model", "m"], ["m", "--model", "m"]):
        args = _parse(*argv)
        assert arg_error(args) is None and args.model == "m"
    assert "two models" in arg_error(_parse("a", "--model", "b"))
    assert "give the model" in arg_error(_parse())


def test_vllm_spellings():
    args = _parse("m", "--max-num-seqs", "4", "--seed", "7", "--generation-config", "default")
    assert (args.max_batch, args.seed, args.generation_config) == (4, 7, "default")
    assert _parse("m", "--max-batch", "3").max_batch == 3  # dgemma's own name still works
    assert arg_error(_parse("m", "--max-num-seqs", "0")) == "--max-batch must be in [1, 65536], got 0"
    assert _parse("m", "--allowed-origins", '["https://a.example", "https://b.example"]').allowed_origins == [
        "https://a.example",
        "https://b.example",
    ]
    assert _parse("m", "--allowed-origins", "https://a.example,https://b.example").allowed_origins == [
        "https://a.example",
        "https://b.example",
    ]
    assert _parse("m").allowed_origins == []  # no CORS unless asked for


def test_security_options_are_checked(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    assert "go together" in arg_error(_parse("m", "--ssl-certfile", str(cert)))
    assert "no such file" in arg_error(_parse("m", "--ssl-certfile", str(cert), "--ssl-keyfile", "nope.pem"))
    assert arg_error(_parse("m", "--api-key", " , ")) == "--api-key is empty"
    assert "must start with '/'" in arg_error(_parse("m", "--root-path", "api"))


def test_generation_config_and_seed(tmp_path):
    from dgemma.entrypoints import server
    from dgemma.model.device import resolve
    from test_server import make_checkpoint

    ck = make_checkpoint(tmp_path)
    assert server._generation_config("auto") is None and server._generation_config("default") == {}
    with pytest.raises(ValueError, match="no generation_config.json"):
        server._generation_config(str(tmp_path))
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "generation_config.json").write_text(json.dumps({"max_denoising_steps": 3}))
    args = _parse(str(ck), "--generation-config", str(tmp_path / "gen"), "--seed", "11")
    where, gen = server._prepare(args)
    assert gen == {"max_denoising_steps": 3}
    import torch

    draws = []
    for _ in range(2):  # the same seed: the same seeds drawn for unseeded requests
        llm = server._load(args, resolve("cpu", "float32", None), gen)
        draws.append(torch.randint(0, 2**62, (3,)).tolist())
    assert draws[0] == draws[1] and llm.generation_config == {"max_denoising_steps": 3}


def test_dgemma_serve_like_vllm(tmp_path):
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from test_server import _free_port, _spawn, _stop, make_checkpoint

    ck, port = make_checkpoint(tmp_path), _free_port()
    code = "from dgemma.entrypoints.cli import main; raise SystemExit(main())"
    cmd = [sys.executable, "-c", code, "serve", str(ck), "--max-num-seqs", "4", "--api-key", "K", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(cmd + ["--dtype", "float32", "--max-model-len", "128", "--no-access-log"], url)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="K", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == [str(ck)]
        r = c.completions.create(model=str(ck), prompt="hello", max_tokens=4, seed=0)
        assert r.usage.prompt_tokens > 0
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        assert _stop(proc) == 0
    assert "4 requests at a time" in proc.stdout.read()
