"""Tool calls, reasoning, logprobs, echo and n > 1 through the OpenAI-compatible server, driven by the official `openai`
client on loopback, over a tiny random-weights model with a byte-level BPE tokenizer and a Gemma-4-format chat
template (tests/gemma4_chat.py).

- `tool_choice` "required" and named functions: every returned call validates with `jsonschema` against its tool's
  schema (5 schemas, >= 20 seeds), with finish_reason "tool_calls"; streamed `delta.tool_calls` reassemble to the
  same calls; `auto` with forced text (weights boosting a letter) gives text, and with a forced opening marker
  gives a constrained call; tool-result turns reach the prompt as the template writes them; bad declarations are
  400s naming the field.
- the same on a template with no tool-call syntax: named and required calls are JSON constrained by the schemas
  (an array of {name, arguments} for required), returned as tool calls, whole and streamed; `auto` is a 400.
- reasoning: an output forced through a grammar to open and close a thinking channel is split into
  `reasoning_content` and `content` (also when streamed).
- logprobs: AR-mode logprobs equal `log_softmax` of the model's own encoder logits for the same tokens; `echo` with
  `max_tokens: 0` returns the prompt's log-probabilities of a direct causal encode; diffusion-mode logprobs are
  well-formed; `n=4` returns four choices from one prefill.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")

import torch  # noqa: E402

from dgemma import DiffusionGemma, load_model, save_model  # noqa: E402
from dgemma.model.config import tiny_config  # noqa: E402
from dgemma.engine.logprobs import prompt_logprobs  # noqa: E402
from dgemma.text.tokenizer import Tokenizer  # noqa: E402
from forcing import boost_token  # noqa: E402
from gemma4_chat import build_gemma4_tokenizer  # noqa: E402
from test_chat import TOOL_SCHEMAS, TOOLS  # noqa: E402
from test_server import MODEL, _start, _stop, make_checkpoint  # noqa: E402

VOCAB = 320  # the BPE's 300 tokens, Gemma 4's 12 markers, and spare ids
CANVAS = 8
MAX_LEN = 2048
MSGS = [{"role": "user", "content": "what is the weather in the city?"}]
LOGPROB_CHAT = dict(model=MODEL, messages=MSGS, logprobs=True)


def _checkpoint(root: Path, boost: str | None = None) -> tuple[Path, Tokenizer]:
    tok_dir, _ = build_gemma4_tokenizer(root / "tok")
    tok = Tokenizer.from_dir(tok_dir)
    torch.manual_seed(0)
    model = DiffusionGemma(tiny_config(vocab_size=VOCAB, canvas_length=CANVAS))
    if boost is not None:
        (tid,) = tok.encode(boost)
        boost_token(model, tid)
    gen = {"max_denoising_steps": 6}
    return save_model(model, root / "ck", tokenizer_dir=tok_dir, generation_config=gen), tok


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> tuple[Path, Tokenizer]:
    return _checkpoint(tmp_path_factory.mktemp("tools"))


def _serve(path: Path):
    proc, url = _start(path, "--max-model-len", str(MAX_LEN))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return proc, url, client


@pytest.fixture(scope="module")
def srv(ck):
    proc, url, client = _serve(ck[0])
    yield url, client
    assert _stop(proc) == 0


def _calls(choice) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]


def _streamed(client, kw: dict) -> tuple[dict[int, dict], list, list[str]]:
    """A streamed chat completion's tool calls assembled by index from their deltas, its finish reasons and its
    content deltas."""
    calls: dict[int, dict] = {}
    reasons, content = [], []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            reasons.append(ch.finish_reason)
            content.append(ch.delta.content or "")
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                c["id"] += d.id or ""
                c["name"] += d.function.name or "" if d.function else ""
                c["arguments"] += d.function.arguments or "" if d.function else ""
    return calls, reasons, content


def _check_calls(choice, names) -> None:
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls and choice.message.content is None
    for c in choice.message.tool_calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), TOOL_SCHEMAS[c.function.name])


# -- tool calls ------------------------------------------------------------------------------------------------------
def test_required_and_named_calls_validate(srv):
    url, client = srv
    jobs = [(s, "required") for s in range(20)] + [(s, n) for n in TOOL_SCHEMAS for s in range(4)]

    def run(job):
        seed, how = job
        choice = how if how == "required" else {"type": "function", "function": {"name": how}}
        return job, client.chat.completions.create(
            model=MODEL, messages=MSGS, tools=TOOLS, tool_choice=choice, seed=seed, max_tokens=160
        )

    with cf.ThreadPoolExecutor(4) as ex:
        for (seed, how), r in ex.map(run, jobs):
            names = set(TOOL_SCHEMAS) if how == "required" else {how}
            _check_calls(r.choices[0], names)
            if how != "required":
                assert len(r.choices[0].message.tool_calls) == 1


def test_streamed_calls_reassemble(srv):
    _, client = srv
    kw = dict(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required", seed=7, max_tokens=160)
    whole = client.chat.completions.create(**kw).choices[0]
    calls, reasons, _ = _streamed(client, kw)
    got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    assert got == _calls(whole) and reasons[-1] == "tool_calls"
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_tool_results_reach_the_prompt(srv, ck):
    _, client = srv
    tok = ck[1]
    msgs = MSGS + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS[:1], max_tokens=4, seed=0, tool_choice="none"
    )
    q = '<|"|>'
    decl = tok.apply_chat_template(MSGS, tools=[TOOLS[0]], add_generation_prompt=False)
    expected = (
        decl + "<|turn>model\n" + f"<|tool_call>call:get_weather{{city:{q}Oslo{q}}}<tool_call|>"
        f"<|tool_response>response:get_weather{{value:{q}rain{q}}}<tool_response|>"
    )
    assert r.usage.prompt_tokens == len(tok.encode(expected))


def test_auto_gives_text_when_text_is_forced(tmp_path_factory):
    path, _ = _checkpoint(tmp_path_factory.mktemp("auto_text"), boost="a")
    proc, _, client = _serve(path)
    try:
        r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, seed=0, max_tokens=16)
        c = r.choices[0]
        assert c.message.tool_calls is None and c.message.content == "a" * 16 and c.finish_reason == "length"
    finally:
        assert _stop(proc) == 0


def test_auto_constrains_a_call_once_it_starts(tmp_path_factory):
    path, _ = _checkpoint(tmp_path_factory.mktemp("auto_call"), boost="<|tool_call>")
    proc, _, client = _serve(path)
    try:
        for seed in range(3):
            r = client.chat.completions.create(
                model=MODEL, messages=MSGS, tools=TOOLS, seed=seed, max_tokens=160, parallel_tool_calls=False
            )
            _check_calls(r.choices[0], set(TOOL_SCHEMAS))
            assert len(r.choices[0].message.tool_calls) == 1
    finally:
        assert _stop(proc) == 0


@pytest.mark.parametrize(
    "tools,choice,param",
    [
        ([{"type": "function", "function": {"name": "bad name"}}], None, "tools[0].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            None,
            "tools[0].function.parameters.type",
        ),
        ([{"type": "code_interpreter"}], None, "tools[0].type"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        (TOOLS, "always", "tool_choice"),
        (
            [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"properties": {"a": {"$ref": "https://example.com/s.json"}}},
                    },
                }
            ],
            "required",
            "tools",
        ),
    ],
)
def test_bad_tools_are_400s(srv, tools, choice, param):
    url, _ = srv
    body = {"model": MODEL, "messages": MSGS, "tools": tools, "max_tokens": 4}
    if choice is not None:
        body["tool_choice"] = choice
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


# -- tool calls on a template with no tool syntax: JSON constrained by the schemas ---------------------------------
@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A server whose checkpoint has the Gemma-3-style default template: no tool-call syntax."""
    proc, url = _start(make_checkpoint(tmp_path_factory.mktemp("plain")), "--max-model-len", "1024")
    yield url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert _stop(proc) == 0


def test_json_calls_validate_on_a_template_without_tool_syntax(plain):
    _, client = plain
    jobs = [(s, "required", True) for s in range(6)] + [(s, "required", False) for s in range(2)]
    jobs += [(s, n, True) for n in TOOL_SCHEMAS for s in range(2)]

    def run(job):
        seed, how, parallel = job
        choice = how if how == "required" else {"type": "function", "function": {"name": how}}
        return job, client.chat.completions.create(
            model=MODEL, messages=MSGS, tools=TOOLS, tool_choice=choice, seed=seed, max_tokens=200,
            parallel_tool_calls=parallel,
        )  # fmt: skip

    with cf.ThreadPoolExecutor(4) as ex:
        for (seed, how, parallel), r in ex.map(run, jobs):
            _check_calls(r.choices[0], set(TOOL_SCHEMAS) if how == "required" else {how})
            if how != "required" or not parallel:
                assert len(r.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "create_event"}}])
def test_json_calls_stream(plain, choice):
    _, client = plain
    kw = dict(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice=choice, seed=3, max_tokens=200)
    whole = client.chat.completions.create(**kw).choices[0]
    calls, reasons, content = _streamed(client, kw)
    got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    assert got == _calls(whole) and reasons[-1] == "tool_calls" and not "".join(content)
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_auto_needs_a_tool_syntax(plain):
    url, _ = plain
    body = {"model": MODEL, "messages": MSGS, "tools": TOOLS, "max_tokens": 4}
    for choice in (None, "auto"):
        r = httpx.post(url + "/v1/chat/completions", json={**body, "tool_choice": choice}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
        assert "tool_choice 'auto' is unavailable" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={**body, "tool_choice": "none"}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"].get("tool_calls") is None


# -- reasoning -------------------------------------------------------------------------------------------------------
THINK = '<[305]> "thought\\n" "the sky" <[306]> "blue"'  # <|channel> thought\n ... <channel|> answer


def test_reasoning_is_split(srv):
    _, client = srv
    kw = dict(
        model=MODEL,
        messages=MSGS,
        max_tokens=32,
        seed=1,
        extra_body={"structured_outputs": {"grammar": "start: " + THINK}},
    )
    m = client.chat.completions.create(**kw).choices[0].message
    assert (m.reasoning_content, m.content) == ("the sky", "blue")
    parts = {"reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            parts["content"] += ch.delta.content or ""
            parts["reasoning_content"] += (ch.delta.model_extra or {}).get("reasoning_content") or ""
    assert parts == {"reasoning_content": "the sky", "content": "blue"}


# -- logprobs, echo, n ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(ck) -> DiffusionGemma:
    return load_model(ck[0], dtype=torch.float32).eval()


def _ids(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def test_ar_logprobs_are_the_encoders(srv, model):
    _, client = srv
    prompt = [40, 41, 42, 43, 44]
    r = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=6,
        logprobs=3,
        temperature=0,
        extra_body={"mode": "ar", "ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    lp = r.choices[0].logprobs
    out = _ids(lp.tokens)
    assert len(out) == 6
    ref = prompt_logprobs(model, prompt + out, top_k=3)[len(prompt) :]
    for got, top, want in zip(lp.token_logprobs, lp.top_logprobs, ref):
        assert got == pytest.approx(want.logprob, abs=1e-4)
        assert sorted(top.values(), reverse=True) == pytest.approx([v for _, v in want.top], abs=1e-4)
    chat = client.chat.completions.create(
        **LOGPROB_CHAT, max_tokens=5, top_logprobs=2, temperature=0, extra_body={"mode": "ar", "ignore_eos": True}
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)  # greedy: the best token


def test_echo_logprobs_with_no_new_tokens(srv, model):
    _, client = srv
    prompt = [7, 70, 170, 27, 99, 12, 250]
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, extra_body={"return_tokens_as_token_ids": True}
    )
    lp = r.choices[0].logprobs
    assert _ids(lp.tokens) == prompt and lp.token_logprobs[0] is None and r.usage.completion_tokens == 0
    ref = prompt_logprobs(model, prompt, top_k=1)
    assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in ref[1:]], abs=1e-4)
    assert lp.text_offset[0] == 0
    text = client.completions.create(model=MODEL, prompt="hello world", max_tokens=0, echo=True, logprobs=0)
    assert text.choices[0].text == "hello world"


def test_diffusion_logprobs_are_well_formed(srv):
    _, client = srv
    r = client.chat.completions.create(
        **LOGPROB_CHAT, max_tokens=12, top_logprobs=3, seed=2, extra_body={"ignore_eos": True}
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    for t in content:
        assert t.logprob <= 0 and [x.logprob for x in t.top_logprobs] == sorted(
            [x.logprob for x in t.top_logprobs], reverse=True
        )


def test_n_samples(srv):
    _, client = srv
    kw = dict(model=MODEL, prompt="the quick brown fox", max_tokens=8, seed=5, extra_body={"ignore_eos": True})
    r = client.completions.create(n=4, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    one = client.completions.create(**kw)
    assert r.usage.completion_tokens == 32 and r.usage.prompt_tokens == one.usage.prompt_tokens  # counted once
    again = client.completions.create(n=4, **kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    chat = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4, n=3, seed=1)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(n=4, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(4)] == [c.text for c in r.choices]


def test_unknown_formats_are_warnings(srv):
    _, client = srv
    schema = {
        "type": "object",
        "properties": {
            "file": {"type": "string", "format": "binary", "maxLength": 4},
            "n": {"type": "integer", "format": "int64"},
        },
        "required": ["file", "n"],
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        max_tokens=64,
        seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "upload", "schema": schema}},
    )
    assert any("binary" in w for w in r.model_extra["warnings"])
    assert r.choices[0].finish_reason == "stop"  # the budget-aware closing finishes it
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
