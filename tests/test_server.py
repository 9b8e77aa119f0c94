"""The OpenAI-compatible server (dgemma.entrypoints.server), end to end.

A real uvicorn server runs in a subprocess on 127.0.0.1 (a free port) over a tiny random-weights checkpoint with a
real byte-level BPE tokenizer. It is driven with the official `openai` client and with raw httpx:

- completions / chat / streaming (include_usage, drafts), usage fields, stop strings, AR mode;
- client mistakes -> 400 (or 404 for an unknown model) with an OpenAI error body, never 422/500, and the server
  still answers /health afterwards (wrong types, huge numbers, empty prompt, invalid UTF-8, wrong content type,
  non-object JSON, a 1 MB prompt answered quickly);
- cancellation (tiny client timeouts) frees the rows; overload gets 429 + Retry-After while admitted requests
  complete with the same tokens as when run alone; batched == unbatched for the same seeds;
- /metrics; SIGTERM drains an in-flight request and exits 0; a dead engine thread gives 500 bodies and /health 503.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import torch  # noqa: E402

from bpe import build_bpe_tokenizer  # noqa: E402
from dgemma import DiffusionGemma, save_model  # noqa: E402
from dgemma.model.config import tiny_config  # noqa: E402
from forcing import force_canvas, printable_tokens  # noqa: E402

MODEL = "tiny"
MAX_QUEUE = 6
MAX_BATCH = 4
MAX_MODEL_LEN = 128
CANVAS = 8
ROOT = Path(__file__).resolve().parents[1]
# Requests that cannot finish by themselves within a test: up to 12 canvases of 10 000 denoising steps (minutes).
ENDLESS = {"max_tokens": 96, "ignore_eos": True, "fixed_steps": True, "max_denoising_steps": 10_000}
# Alternating letters and digits are one token per character (no token of tests/bpe.py spans a letter and a digit),
# so a regex of them places known text at known token positions while the model still picks every character.
ALNUM = "[a-z][0-9]"


# -- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("srv"))


def make_checkpoint(d: Path) -> Path:
    """A tiny random-weights checkpoint with the byte-level BPE tokenizer, in `d`."""
    tok = build_bpe_tokenizer(d / "tok")
    torch.manual_seed(0)
    model = DiffusionGemma(tiny_config(vocab_size=300, canvas_length=CANVAS))
    return save_model(model, d / "ck", tokenizer_dir=tok, generation_config={"max_denoising_steps": 6})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(checkpoint: Path, *extra: str, scheme: str = "http", verify: Any = True) -> tuple[subprocess.Popen, str]:
    """A server on a free port (the given options after the defaults, which they override); its base URL once
    /health answers (over https with `verify` as the CA when `scheme` is https)."""
    port = _free_port()
    args = ["--model", str(checkpoint), "--port", str(port), "--served-model-name", MODEL]
    args += ["--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--max-model-len", str(MAX_MODEL_LEN)]
    args += ["--log-level", "warning", "--no-access-log", "--dtype", "float32"]  # float32 on every CPU
    cmd = [sys.executable, "-m", "dgemma.entrypoints.server", *args, *extra]
    return _spawn(cmd, f"{scheme}://127.0.0.1:{port}", verify), f"{scheme}://127.0.0.1:{port}"


def _spawn(cmd: list[str], url: str, verify: Any = True) -> subprocess.Popen:
    """Run a server command; return once `url`/health answers 200 (RuntimeError with its output if it exits)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1, verify=verify).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url = _start(checkpoint)
    yield url
    rc = _stop(proc)
    out = proc.stdout.read()
    assert rc == 0, out
    assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _metric(url: str, prefix: str) -> float:
    return sum(v for k, v in _metrics(url).items() if k.split("{")[0] == prefix)


def _wait_idle(url: str, timeout: float = 20) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = _metrics(url)
        busy = sum(
            v for k, v in m.items() if k.split("{")[0] in ("dgemma:num_requests_running", "dgemma:num_requests_waiting")
        )
        if busy == 0:
            return time.time() - t0
        time.sleep(0.1)
    raise AssertionError(f"the engine still has work after {timeout} s: {_metrics(url)}")


def _healthy(url: str) -> None:
    assert httpx.get(url + "/health", timeout=10).status_code == 200


# -- basics --------------------------------------------------------------------------------------------------------
def test_info_endpoints(server):
    _healthy(server)
    assert httpx.get(server + "/version").json()["version"]
    models = httpx.get(server + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    r = httpx.get(server + "/no/such/route")
    assert r.status_code == 404 and "error" in r.json()


def test_completion(client):
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=16, seed=1)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    c = r.choices[0]
    assert isinstance(c.text, str) and c.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0
    assert 0 <= u.completion_tokens <= 16 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    steps = u.model_extra["denoising_steps"]  # (completion_tokens may be 0: the model may write EOS first)
    assert steps >= 1 and u.model_extra["tokens_per_forward"] == pytest.approx(u.completion_tokens / steps)
    # Same seed, same output; token-id prompts and the one-element list forms work too.
    again = client.completions.create(model=MODEL, prompt=["hello world"], max_tokens=16, seed=1)
    assert again.choices[0].text == c.text
    ids = client.completions.create(
        model=MODEL, prompt=[5, 6, 7], max_tokens=8, seed=2, extra_body={"ignore_eos": True}
    )
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 8
    assert ids.choices[0].finish_reason == "length"
    nested = client.completions.create(
        model=MODEL, prompt=[[5, 6, 7]], max_tokens=8, seed=2, extra_body={"ignore_eos": True}
    )
    assert nested.choices[0].text == ids.choices[0].text


def test_chat(client):
    msgs = [{"role": "user", "content": "what is the city name?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, seed=3)
    assert r.object == "chat.completion"
    m = r.choices[0].message
    assert m.role == "assistant" and isinstance(m.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens <= 12
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=12, seed=3)
    assert r2.choices[0].message.content == m.content


def test_streaming_completion_matches_non_streaming(client):
    kw = dict(model=MODEL, prompt="the quick brown fox", max_tokens=20, seed=4, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len(text_chunks) <= 4  # at most one per canvas (20 tokens = 3 canvases of 8), then the finish
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.usage.model_extra["denoising_steps"] == full.usage.model_extra["denoising_steps"]
    # Without include_usage there is no usage chunk.
    plain = list(client.completions.create(stream=True, **kw))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)
    # Text arrives a canvas at a time: 20 one-character tokens (what a random model writes can have no printable
    # text at all, so the text is constrained to letters and digits) come as 8 + 8 + 4 characters.
    chunks = client.completions.create(
        model=MODEL,
        prompt="the quick brown fox",
        max_tokens=24,
        seed=4,
        stream=True,
        extra_body={"structured_outputs": {"regex": f"({ALNUM}){{10}}"}},
    )
    assert [len(c.choices[0].text) for c in chunks if c.choices and c.choices[0].text] == [8, 8, 4]


def test_streaming_chat(client):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=16,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == full.choices[0].message.content
    assert body[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_stream_drafts(client, server):
    kw = dict(model=MODEL, prompt="hello", max_tokens=16, seed=6)
    chunks = list(client.completions.create(stream=True, extra_body={"stream_drafts": True, "ignore_eos": True}, **kw))
    drafts = [c for c in chunks if (c.model_extra or {}).get("draft") is not None]
    assert drafts and all(isinstance(c.model_extra["draft"], str) and c.choices[0].text == "" for c in drafts)
    # Drafts do not change the text; off by default.
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    plain = list(client.completions.create(stream=True, extra_body={"ignore_eos": True}, **kw))
    assert not any((c.model_extra or {}).get("draft") for c in plain)
    assert "".join(c.choices[0].text for c in plain if c.choices) == text


def test_stop_string(client):
    # The stop string must be in the output, past the first canvas, on any CPU: the regex puts "QZ" at tokens 12-13
    # (the second canvas of 8; see ALNUM), between characters the model picks.
    rx = f"({ALNUM}){{6}}QZ({ALNUM}){{6}}"
    kw = dict(
        model=MODEL, prompt="data key value", max_tokens=32, seed=7, extra_body={"structured_outputs": {"regex": rx}}
    )
    base = client.completions.create(**kw)
    assert re.fullmatch(rx, base.choices[0].text) and base.usage.completion_tokens == 26
    stop = "QZ"
    expect = base.choices[0].text[:12]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == expect and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 14  # the shortest token prefix that holds the stop string
    streamed = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expect
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_ar_mode(client):
    kw = dict(model=MODEL, prompt=[5, 6, 7], max_tokens=6, extra_body={"mode": "ar", "ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text  # greedy by default
    assert a.usage.completion_tokens == 6 and a.usage.model_extra["tokens_per_forward"] == pytest.approx(1.0)
    assert a.usage.model_extra["denoising_steps"] == 0
    s1 = client.completions.create(temperature=1.0, seed=9, **kw)
    s2 = client.completions.create(temperature=1.0, seed=9, **kw)
    assert s1.choices[0].text == s2.choices[0].text


def test_diffusion_knobs(client):
    r = client.completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=8,
        seed=1,
        extra_body={
            "max_denoising_steps": 3,
            "fixed_steps": True,
            "t_min": 0.3,
            "t_max": 0.9,
            "entropy_bound": 0.2,
            "ignore_eos": True,
        },
    )
    assert r.usage.model_extra["denoising_steps"] == 3 and r.usage.completion_tokens == 8
    r = client.completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=8,
        seed=1,
        extra_body={"stability_threshold": 2, "confidence_threshold": 0.5, "stop_token_ids": [299]},
    )
    assert r.choices[0].finish_reason in ("stop", "length")


# -- client mistakes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(n=0), "n"),
        (dict(logprobs=21), "logprobs"),
        (dict(echo=True, suffix="x"), "echo"),
        (dict(best_of=3), "best_of"),
        (dict(suffix="x", extra_body={"mode": "ar"}), "suffix"),
        (dict(extra_body={"response_format": {"type": "xml"}}), "response_format"),
        (dict(extra_body={"structured_outputs": {"regex": "[a-z]+", "choice": ["a"]}}), "structured_outputs"),
        (dict(extra_body={"structured_outputs": {"regex": "(unclosed"}}), "structured_outputs"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(seed=-1), "seed"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(extra_body={"mode": "fast"}), "mode"),
        (dict(extra_body={"max_denoising_steps": 0}), "max_denoising_steps"),
        (dict(extra_body={"t_min": 0.9, "t_max": 0.1}), "t_max"),
        (dict(extra_body={"stop_token_ids": [100000]}), "stop_token_ids"),
        (dict(extra_body={"entropy_bound": "big"}), "entropy_bound"),
    ],
)
def test_bad_fields_openai(client, server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL, prompt="hello", **{"max_tokens": 4, **kwargs})
    err = ei.value.body
    assert err["type"] == "BadRequestError" and err["param"] == param and err["message"], err
    _healthy(server)


def test_bad_chat_openai(client, server):
    for kw in (
        dict(messages=[]),
        dict(messages=[{"role": "user"}]),
        dict(messages=[{"role": 1, "content": "x"}]),
        dict(messages=[{"role": "user", "content": "x"}], top_logprobs=2),  # without logprobs
        dict(messages=[{"role": "user", "content": "x"}], response_format={"type": "xml"}),
        dict(
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
        ),
        dict(messages=[{"role": "user", "content": "x"}], n=0),
    ):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, max_tokens=4, **kw)
    _healthy(server)


def test_unknown_model_and_context_limit(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL, prompt=[5] * 100, max_tokens=1000)
    msg = ei.value.body["message"]
    assert "100" in msg and "1000" in msg and str(MAX_MODEL_LEN) in msg
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[5] * 500, max_tokens=1)
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL, prompt=[5, 6, 300], max_tokens=1)
    assert ei.value.body["param"] == "prompt"


_J = {"content-type": "application/json"}


@pytest.mark.parametrize(
    "content,headers",
    [
        (b'{"prompt": 5, "max_tokens": 4}', _J),  # wrong type
        (b'{"prompt": "hi", "max_tokens": "4"}', _J),
        (b'{"prompt": "hi", "max_tokens": 4.5}', _J),
        (b'{"prompt": "hi", "max_tokens": true}', _J),
        (b'{"prompt": "hi", "stream": "yes"}', _J),
        (b'{"prompt": "hi", "stop": 3}', _J),
        (b'{"prompt": [1, "a"], "max_tokens": 4}', _J),
        (b'{"prompt": [1.5], "max_tokens": 4}', _J),
        (b'{"prompt": ["a", "b"], "max_tokens": 4}', _J),  # several prompts
        (b'{"prompt": "hi", "max_tokens": 1' + b"0" * 40 + b"}", _J),  # huge numbers
        (b'{"prompt": "hi", "max_tokens": 4, "seed": 1' + b"0" * 30 + b"}", _J),
        (b'{"prompt": "hi", "max_tokens": 4, "temperature": 1e999}', _J),
        (b'{"prompt": "hi", "max_tokens": 4, "t_min": NaN}', _J),
        (b'{"prompt": "hi", "max_tokens": 4, "seed": 1' + b"0" * 5000 + b"}", _J),
        (b'{"prompt": "", "max_tokens": 4}', _J),  # empty prompts
        (b'{"prompt": [], "max_tokens": 4}', _J),
        (b'{"prompt": [[]], "max_tokens": 4}', _J),
        (b'{"max_tokens": 4}', _J),
        (b'{"prompt": "\xff\xfe bad utf-8"}', _J),  # invalid UTF-8
        (b'{"prompt": "hi"}', {"content-type": "text/plain"}),  # wrong content type
        (b"prompt=hi", {"content-type": "application/x-www-form-urlencoded"}),
        (b'["hi"]', _J),  # non-object JSON
        (b'"hi"', _J),
        (b"null", _J),
        (b"{not json", _J),
        (b"", _J),
        (b"[" * 100000 + b"]" * 100000, _J),  # deeply nested
        (b'{"prompt": "hi", "stream_options": {"include_usage": true}}', _J),  # stream_options without stream
    ],
)
def test_malformed_completions(server, content, headers):
    r = httpx.post(server + "/v1/completions", content=content, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400 and err["message"]
    _healthy(server)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": "hi"},
        {"messages": [1]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
    ],
)
def test_malformed_chat(server, body):
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "BadRequestError"
    _healthy(server)


def test_huge_prompt_rejected_quickly(server):
    t0 = time.time()
    r = httpx.post(server + "/v1/completions", json={"prompt": "hello world " * 90_000, "max_tokens": 4}, timeout=30)
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = httpx.post(
        server + "/v1/chat/completions",
        timeout=30,
        json={"messages": [{"role": "user", "content": "x" * 1_000_000}], "max_tokens": 4},
    )
    assert r.status_code == 400
    assert time.time() - t0 < 60  # well under a second; a quadratic or blocking path would take far longer
    _healthy(server)


# -- concurrency -----------------------------------------------------------------------------------------------------
def _complete(client, prompt, seed, max_tokens=16, **extra):
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, seed=seed, extra_body={"ignore_eos": True, **extra}
    )
    return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason


def _literal(seed: int) -> dict:
    """A completion whose every token is forced (a literal regex): its text is known whatever the arithmetic.
    Sampled tokens of a random model may differ between batch shapes in a near-tie (batched kernels round
    differently), so exact equality across shapes is asserted on forced output only; the engine tests check
    that a row's sampled tokens do not depend on its neighbours at a fixed shape."""
    return {"structured_outputs": {"regex": f"job {seed} done"}}


def test_batched_equals_unbatched(client):
    """Concurrent requests each get their own output (no row mix-up), the same as when run alone."""
    jobs = [
        ("hello world", 11),
        ("the quick brown fox", 12),
        ([5, 6, 7, 8], 13),
        ("data", 14),
        ("what is the price", 15),
        ([9, 10], 16),
    ]
    alone = [_complete(client, p, s, 20, **_literal(s)) for p, s in jobs]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        together = list(ex.map(lambda j: _complete(client, j[0], j[1], 20, **_literal(j[1])), jobs))
    assert together == alone
    assert [t for t, _, _ in together] == [f"job {s} done" for _, s in jobs]


def test_cancellation_frees_rows(server, client):
    # Each of these would run for minutes (ENDLESS): only aborts can free the rows within the bounds below, which are
    # generous so that a loaded machine meets them.
    slow = {"prompt": "hello world", "seed": 1, **ENDLESS}

    def cancel_plain(_):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server + "/v1/completions", json=slow, timeout=0.3)

    def cancel_stream(_):
        with httpx.stream(
            "POST", server + "/v1/completions", json={**slow, "stream": True, "stream_drafts": True}, timeout=60
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first chunk (a draft: one step) arrives, then the client goes away

    aborted0 = _metric(server, "dgemma:request_aborted_total")
    with cf.ThreadPoolExecutor(MAX_BATCH) as ex:
        list(ex.map(cancel_plain, range(MAX_BATCH)))
        list(ex.map(cancel_stream, range(2)))
    _wait_idle(server, timeout=60)
    assert _metric(server, "dgemma:request_aborted_total") - aborted0 >= 2
    t0 = time.time()
    text, n, reason = _complete(client, "hello", 1, 8)
    assert n == 8 and reason == "length" and time.time() - t0 < 60  # not stuck behind the aborted work
    _healthy(server)


def test_overload_gets_429(server, client):
    kw = dict(prompt="hello world", seed=21, max_tokens=16, max_denoising_steps=8, fixed_steps=True, **_literal(21))
    expect = _complete(client, **kw)
    assert expect[0] == "job 21 done"

    def call(_):
        try:
            return _complete(client, **kw)
        except openai.RateLimitError as e:
            assert e.response.headers.get("retry-after")
            assert e.body["type"] == "RateLimitError"
            return "429"

    # At capacity, whatever the timing: MAX_QUEUE streams that cannot finish by themselves are in flight (each is
    # accepted, running or waiting, once its headers arrive), so every further request gets 429.
    hold = {"model": MODEL, "prompt": "hello world", "stream": True, **ENDLESS}
    with httpx.Client(timeout=60) as hc, contextlib.ExitStack() as held:
        for _ in range(MAX_QUEUE):
            assert held.enter_context(hc.stream("POST", server + "/v1/completions", json=hold)).status_code == 200
        assert [call(i) for i in range(3)] == ["429"] * 3
    _wait_idle(server, timeout=60)  # the held streams were closed: aborted
    # A burst: a 429 means MAX_QUEUE requests of the burst were in flight, and those complete, so at least MAX_QUEUE
    # succeed whatever the timing; admitted requests complete correctly (the same forced text as alone).
    with cf.ThreadPoolExecutor(3 * MAX_QUEUE) as ex:
        results = list(ex.map(call, range(3 * MAX_QUEUE)))
    ok = [r for r in results if r != "429"]
    assert len(ok) >= MAX_QUEUE
    assert all(r == expect for r in ok)
    _wait_idle(server)
    assert _complete(client, **kw) == expect


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="hello", max_tokens=8, seed=1, extra_body={"ignore_eos": True})
    text = httpx.get(server + "/metrics").text
    for name in (
        "dgemma:num_requests_running",
        "dgemma:num_requests_waiting",
        "dgemma:prompt_tokens_total",
        "dgemma:generation_tokens_total",
        "dgemma:tokens_per_forward_bucket",
        "dgemma:denoising_steps_per_canvas_bucket",
        "dgemma:time_to_first_token_seconds_bucket",
        "dgemma:e2e_request_latency_seconds_bucket",
        "dgemma:request_success_total",
    ):
        assert name in text, name
    m = _metrics(server)
    assert _metric(server, "dgemma:prompt_tokens_total") > 0
    assert _metric(server, "dgemma:generation_tokens_total") > 0
    assert any(k.startswith("dgemma:request_rejected_total") and 'status="429"' in k for k in m)


# -- lifecycle -------------------------------------------------------------------------------------------------------
def test_sigterm_drains_and_exits_zero(checkpoint):
    proc, url = _start(checkpoint, "--shutdown-timeout", "300")  # room to drain on a loaded machine
    try:
        # 12 canvases x 100 steps: seconds, so it is still running when the signal comes, well within the drain.
        body = {
            "model": MODEL,
            "prompt": "hello",
            "max_tokens": 96,
            "seed": 1,
            "ignore_eos": True,
            "fixed_steps": True,
            "max_denoising_steps": 100,
        }
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(httpx.post, url + "/v1/completions", json=body, timeout=300)
            t0 = time.time()
            while _metric(url, "dgemma:num_requests_running") < 1:
                assert time.time() - t0 < 120 and not fut.done()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            r = fut.result()
        assert r.status_code == 200, r.text  # the in-flight request finished
        assert r.json()["usage"]["completion_tokens"] == 96
        assert proc.wait(timeout=120) == 0
    finally:
        _stop(proc)
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def _sse(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


@pytest.fixture
def one_thread():
    """In-process servers run the engine in a thread; on a small shared machine two OpenMP threads per op make
    every step crawl. Use one (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_dead_engine_gives_500_and_health_503(checkpoint, one_thread, monkeypatch):
    from fastapi.testclient import TestClient

    from dgemma.entrypoints.llm import LLM
    from dgemma.entrypoints.server import create_app

    llm = LLM(checkpoint, max_batch=2, max_model_len=128)
    # Every canvas starts with a printable token, so the canvases committed before the failure have text to send.
    force_canvas(monkeypatch, at={0: printable_tokens(llm.tokenizer, 300)[0]})
    step, calls = llm.engine.step, [0]

    def failing_step():  # works long enough to commit a canvas or two, then the "device" fails
        calls[0] += 1
        if calls[0] > 8:
            raise RuntimeError("simulated device failure")
        return step()

    llm.engine.step = failing_step
    app = create_app(llm, model_name=MODEL, max_queue=4)
    with TestClient(app) as tc:
        assert tc.get("/health").status_code == 200
        r = tc.post(
            "/v1/completions",
            json={
                "prompt": "hi",
                "max_tokens": 64,
                "ignore_eos": True,
                "stream": True,
                "fixed_steps": True,
                "max_denoising_steps": 3,
            },
        )
        assert r.status_code == 200
        events = _sse(r.text)
        assert events[-1] == "[DONE]" and "simulated device failure" in events[-2]["error"]["message"]
        assert any(e["choices"][0]["text"] for e in events[:-2])  # text before the failure (2 canvases)
        assert tc.get("/health").status_code == 503
        r = tc.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
        r = tc.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True})
        assert r.status_code == 500
        assert tc.get("/v1/models").status_code == 200  # the process keeps answering


def test_request_timeout_aborts(checkpoint, one_thread):
    from fastapi.testclient import TestClient

    from dgemma.entrypoints.llm import LLM
    from dgemma.entrypoints.server import create_app

    llm = LLM(checkpoint, max_batch=2, max_model_len=128)
    app = create_app(llm, model_name=MODEL, max_queue=4, request_timeout=0.5)
    slow = {"prompt": "hi", **ENDLESS}  # minutes: only the timeout ends these within the bounds below
    with TestClient(app) as tc:
        t0 = time.time()
        r = tc.post("/v1/completions", json=slow)
        assert r.status_code == 504 and r.json()["error"]["type"] == "TimeoutError"
        events = _sse(tc.post("/v1/completions", json={**slow, "stream": True}).text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 504
        assert time.time() - t0 < 60
        deadline = time.time() + 60
        while llm.engine.has_unfinished():  # the timed-out requests were aborted
            assert time.time() < deadline
            time.sleep(0.05)
        r = tc.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "seed": 1})
        assert r.status_code == 200 and tc.get("/health").status_code == 200


# -- structured output and infilling ----------------------------------------------------------------------------------
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def test_json_schema_through_the_openai_client(client):
    import jsonschema

    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "a person"}],
            max_tokens=96,
            seed=seed,
            response_format=rf,
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.completions.create(
        model=MODEL, prompt="{", max_tokens=96, seed=1, extra_body={"response_format": {"type": "json_object"}}
    )
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_structured_outputs_object_and_streaming(client):
    import re as _re

    r = client.completions.create(
        model=MODEL,
        prompt="pick",
        max_tokens=16,
        seed=2,
        extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}},
    )
    assert r.choices[0].text in ("red", "green", "blue") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model=MODEL,
        prompt="date",
        max_tokens=32,
        seed=3,
        extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}},
    )
    assert _re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].text)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="x",
            max_tokens=96,
            seed=4,
            stream=True,
            extra_body={"structured_outputs": {"json": PERSON}},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    import jsonschema

    jsonschema.validate(json.loads(text), PERSON)


def test_hostile_schemas_get_a_400_quickly(client, server):
    deep: dict = {"type": "string"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    huge_enum = {"enum": [f"v{i}" for i in range(50_000)]}
    for schema in (deep, huge_enum, {"type": "string", "pattern": "(" * 5000}, {"type": "bogus"}):
        t0 = time.perf_counter()
        with pytest.raises(openai.BadRequestError) as ei:
            client.completions.create(
                model=MODEL,
                prompt="x",
                max_tokens=16,
                extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "h", "schema": schema}}},
            )
        assert time.perf_counter() - t0 < 60  # well under a second each; a hang would not be
        assert ei.value.body["param"] == "response_format" and ei.value.body["message"]
    _healthy(server)


def test_suffix_infilling(client):
    r = client.completions.create(
        model=MODEL, prompt="def add(a, b):\n    ", suffix="\n    return c\n", max_tokens=12, seed=5
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert "<eos>" not in r.choices[0].text and "<pad>" not in r.choices[0].text
