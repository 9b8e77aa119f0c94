"""The server at `--tensor-parallel-size 2` (2 CPU processes, gloo): the API tests of test_server.py against it
(completions, chat, streaming, disconnects, 429), and a worker that dies gives 503 on /health and a non-zero exit."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import (  # noqa: E402  (the same tests, run here against a tensor-parallel server)
    _start,
    _stop,
    checkpoint,
    client,
    test_cancellation_frees_rows,
    test_chat,
    test_completion,
    test_overload_gets_429,
    test_streaming_chat,
    test_streaming_completion_matches_non_streaming,
)

TP = ("--tensor-parallel-size", "2")
__all__ = [
    "checkpoint",
    "client",
    "test_cancellation_frees_rows",
    "test_chat",
    "test_completion",
    "test_overload_gets_429",
    "test_streaming_chat",
    "test_streaming_completion_matches_non_streaming",
]


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url = _start(checkpoint, *TP)
    yield url
    rc = _stop(proc)
    out = proc.stdout.read()
    assert rc == 0, out
    assert "Traceback" not in out, out


def test_echo_with_logprobs_scores_the_prompt_on_every_rank(server):
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 4, "echo": True, "logprobs": 1, "seed": 1}
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    scores = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert scores[0] is None and len(scores) > 4 and all(isinstance(s, float) and s <= 0 for s in scores[1:])


def _children(pid: int) -> list[int]:
    """The processes `pid` started, from any of its threads (the model loads on the server's torch thread)."""
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def test_a_dead_worker_gives_503_and_a_nonzero_exit(checkpoint):
    proc, url = _start(checkpoint, *TP)
    try:
        ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200
        workers = [c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        deadline, status = time.time() + 20, 200
        while time.time() < deadline and status == 200:
            status = httpx.get(url + "/health", timeout=5).status_code
            time.sleep(0.1)
        assert status == 503
        assert "worker 1" in httpx.get(url + "/health", timeout=5).json()["error"]["message"]
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
