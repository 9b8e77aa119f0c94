"""API keys, TLS, CORS and a proxy's root path (dgemma.entrypoints.security), end to end with the official `openai`
client against a real server process over a tiny random-weights checkpoint:

- keys from $DGEMMA_API_KEY (two, for rotation): no key and a wrong key get 401 with an OpenAI error body, either
  right key gets 200 (whole and streamed); /health, /metrics and /version stay open; keys never reach the log;
- CORS: a preflight from the allowed origin is answered with its headers, one from another origin is refused;
- the root path: the API answers under it too, behind the same key;
- TLS with a certificate the test generates (openssl): the client verifies it; plain HTTP is refused.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_server import MODEL, _start, _stop, make_checkpoint  # noqa: E402

KEYS = ("sk-dgemma-test-5b1e0c", "sk-dgemma-next-9d27aa")
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("sec"))


@pytest.fixture(scope="module")
def server(checkpoint):
    os.environ["DGEMMA_API_KEY"] = ",".join(KEYS)
    try:
        proc, url = _start(checkpoint, "--allowed-origins", ORIGIN, "--root-path", "/api", "--log-level", "debug")
    finally:
        del os.environ["DGEMMA_API_KEY"]
    yield url
    assert _stop(proc) == 0
    log = proc.stdout.read()
    assert "an API key required" in log and not any(k in log for k in KEYS), log


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


UNAUTHORIZED = {
    "message": "invalid or missing API key: send the header `Authorization: Bearer <key>`",
    "type": "AuthenticationError",
    "param": None,
    "code": 401,
}


def _check_401(e: openai.AuthenticationError) -> None:
    assert e.status_code == 401 and e.body == UNAUTHORIZED


def test_missing_and_wrong_keys_are_401(server):
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": UNAUTHORIZED}  # no key (the openai client will not send a request without one)
    for key in ("sk-wrong", KEYS[0] + "x", KEYS[0][:-1], f"{KEYS[0]},{KEYS[1]}"):
        with pytest.raises(openai.AuthenticationError) as e:
            _client(server, key).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        _check_401(e.value)
    with pytest.raises(openai.AuthenticationError) as e:
        _client(server, "sk-wrong").models.list()
    _check_401(e.value)
    for path in ("/tokenize", "/detokenize"):
        assert httpx.post(server + path, json={"prompt": "hi", "tokens": [5]}).status_code == 401
    basic = httpx.get(server + "/v1/models", headers={"Authorization": f"Basic {KEYS[0]}"})
    assert basic.status_code == 401


def test_right_keys_are_served(server):
    for key in KEYS:
        c = _client(server, key)
        r = c.completions.create(model=MODEL, prompt="hello", max_tokens=4, seed=1)
        assert r.choices[0].finish_reason in ("length", "stop") and r.usage.prompt_tokens > 0
        assert [m.id for m in c.models.list().data] == [MODEL]
    chunks = list(
        _client(server, KEYS[1]).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, seed=2, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
    tok = httpx.post(
        server + "/tokenize", json={"prompt": "hello"}, headers={"Authorization": f"Bearer {KEYS[0]}"}
    ).json()
    assert tok["count"] == len(tok["tokens"]) > 0


def test_health_metrics_version_stay_open(server):
    assert httpx.get(server + "/health").status_code == 200
    assert httpx.get(server + "/version").json()["version"]
    assert "dgemma:num_requests_running" in httpx.get(server + "/metrics").text


def test_cors_preflight(server):
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(server + "/v1/chat/completions", headers={"Origin": ORIGIN, **ask})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    bad = httpx.options(server + "/v1/chat/completions", headers={"Origin": "https://evil.example", **ask})
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    # an actual cross-origin call: answered (401 without a key) with the CORS header, so the page can read why
    r = httpx.get(server + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(server + "/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_root_path(server):
    # the proxy strips its prefix (/api) before forwarding; the app then knows it is served under it
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    assert httpx.get(server + "/v1/models", headers=auth).json()["data"][0]["id"] == MODEL
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/openapi.json").json()["servers"] == [{"url": "/api"}]


def _certificate(d: Path) -> tuple[Path, Path]:
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(checkpoint, tmp_path):
    key, cert = _certificate(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    proc, url = _start(
        checkpoint, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--api-key", "k", scheme="https",
        verify=trust,
    )  # fmt: skip
    try:
        assert url.startswith("https://")
        with openai.OpenAI(
            base_url=url + "/v1", api_key="k", max_retries=0, timeout=60, http_client=httpx.Client(verify=trust)
        ) as c:
            assert c.completions.create(model=MODEL, prompt="hello", max_tokens=3, seed=0).usage.prompt_tokens > 0
        with pytest.raises(httpx.HTTPError):  # an unknown certificate is not trusted
            httpx.get(url + "/health")
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
            httpx.get(url.replace("https://", "http://") + "/health")
    finally:
        assert _stop(proc) == 0
