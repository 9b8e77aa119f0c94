"""The input processor (dgemma/entrypoints/inputs.py): every entry point turns a prompt into the same token ids and
validates its request once, through the engine's `validate`.

- one prompt through `LLM`, the CLI and the server reaches the engine as the same ids, with BOS once;
- a conversation renders to the same ids through `generate([messages])`, `chat()`, `dgemma generate --chat` and the
  server's chat endpoint; the CLI's chat stops at the template's own end of turn;
- a bad field is reported once, naming the field; a valid request is validated once (reference mode too);
- token-id prompts get BOS only where the server's client asks for special tokens and the checkpoint adds BOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dgemma import DiffusionGemma, save_model
from dgemma.engine.core import Engine
from dgemma.engine.params import SamplingParamError, SamplingParams
from dgemma.engine.request import InvalidRequest
from dgemma.entrypoints.cli import main
from dgemma.entrypoints.inputs import CONSTRAINT, InputProcessor, error_field
from dgemma.entrypoints.llm import LLM
from dgemma.entrypoints.output import chat_finish_reason
from dgemma.model.config import tiny_config
from dgemma.text.tokenizer import Tokenizer

from bpe import build_bpe_tokenizer
from gemma4_chat import build_gemma4_tokenizer

BOS, EOT = 2, 4  # <bos> and <end_of_turn> in tests/bpe.py
MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi there"},
    {"role": "user", "content": "what is the capital of France?"},
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tok = build_bpe_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("inputs") / "ckpt"
    model = DiffusionGemma(tiny_config(vocab_size=300, canvas_length=8, max_position_embeddings=256))
    return save_model(model, d, tokenizer_dir=tok, generation_config={"max_denoising_steps": 2})


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(ckpt, max_batch=2, max_model_len=128)


@pytest.fixture
def validated(monkeypatch) -> list[list[int]]:
    """The prompt ids of every `Engine.validate` call, in order."""
    seen: list[list[int]] = []
    real = Engine.validate

    def spy(self, prompt_ids, params=None):
        seen.append(list(prompt_ids))
        return real(self, prompt_ids, params)

    monkeypatch.setattr(Engine, "validate", spy)
    return seen


@pytest.fixture
def param_checks(monkeypatch) -> list[SamplingParams]:
    """Every `SamplingParams.validate` call."""
    seen: list[SamplingParams] = []
    real = SamplingParams.validate

    def spy(self, vocab_size=None):
        seen.append(self)
        return real(self, vocab_size)

    monkeypatch.setattr(SamplingParams, "validate", spy)
    return seen


def _cli(capsys, *argv) -> dict:
    code = main([str(a) for a in argv] + ["--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.splitlines()[-1])


def _server(llm: LLM):
    from fastapi.testclient import TestClient

    from dgemma.entrypoints.server import create_app

    return TestClient(create_app(llm, model_name="m", max_queue=4))


# -- prompts ---------------------------------------------------------------------------------------------------------
def test_one_prompt_gives_the_same_ids_everywhere(llm, ckpt, validated, capsys):
    _, ids = llm.encode_prompt("hello world")
    assert ids[0] == BOS and ids.count(BOS) == 1 and ids[1:] == llm.tokenizer.encode("hello world")
    assert llm.encode_prompt("<bos>hello world")[1] == ids  # a BOS already written is not doubled
    llm.generate("hello world", SamplingParams(max_new_tokens=4, seed=0))
    _cli(capsys, "generate", "--model", ckpt, "--prompt", "hello world", "--max-new-tokens", 4, "--seed", 0)
    with _server(llm) as c:
        r = c.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 4, "seed": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        no_bos = c.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 4, "add_special_tokens": False})
        assert no_bos.status_code == 200, no_bos.text
        tokenized = c.post("/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert validated == [ids, ids, ids, ids[1:]] and tokenized == ids  # validated once per request


def test_a_conversation_renders_the_same_everywhere(llm, ckpt, validated, capsys):
    llm.generate([MSGS], SamplingParams(max_new_tokens=4, seed=0))
    llm.chat(MSGS, SamplingParams(max_new_tokens=4, seed=0))
    with _server(llm) as c:
        r = c.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4, "seed": 0})
        assert r.status_code == 200, r.text
    assert len(validated) == 3 and validated[0] == validated[1] == validated[2]
    text = llm.tokenizer.apply_chat_template(MSGS)
    assert validated[0] == llm.tokenizer.encode(text) and validated[0].count(BOS) == 1  # the template's BOS
    validated.clear()
    one = [{"role": "user", "content": "hi"}]
    _cli(capsys, "generate", "--model", ckpt, "--prompt", "hi", "--chat", "--max-new-tokens", 4, "--seed", 0)
    assert validated == [llm.encode_prompt(one)[1]]


def test_the_cli_chat_stops_at_the_templates_end_of_turn(llm, ckpt, monkeypatch, capsys):
    seen: list[SamplingParams] = []
    real = InputProcessor.request
    monkeypatch.setattr(
        InputProcessor, "request", lambda self, ids, sp, chat=None: seen.append(sp) or real(self, ids, sp, chat)
    )
    _cli(capsys, "generate", "--model", ckpt, "--prompt", "hi", "--chat", "--max-new-tokens", 4, "--seed", 0)
    assert seen[-1].stop_token_ids == [EOT]
    _cli(capsys, "generate", "--model", ckpt, "--prompt", "hi", "--max-new-tokens", 4, "--seed", 0)
    assert seen[-1].stop_token_ids == []  # a plain prompt is not a turn


def test_end_of_turn_follows_the_template(tmp_path, llm):
    assert llm.inputs.end_of_turn_ids() == [EOT]  # the default (Gemma) template
    big = SimpleNamespace(vocab_size=10**6)
    g4_dir, marker = build_gemma4_tokenizer(tmp_path / "g4")
    assert InputProcessor(Tokenizer.from_dir(g4_dir), big, "g4").end_of_turn_ids() == [marker["<turn|>"]]
    plain = build_bpe_tokenizer(
        tmp_path / "plain", chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    )
    assert InputProcessor(Tokenizer.from_dir(plain), big, "plain").end_of_turn_ids() == []  # no marker: no stop
    assert InputProcessor(None, big, "ids").end_of_turn_ids() == []


def test_token_id_prompts_get_bos_only_where_asked_and_the_checkpoint_adds_it(tmp_path, llm):
    assert llm.encode_prompt({"prompt_token_ids": [5, 6]})[1] == [5, 6]  # as sent
    assert llm.inputs.bos_for_ids([5, 6]) == []  # tests/bpe.py's config does not say add_bos_token
    d = build_bpe_tokenizer(tmp_path / "adds")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    adds = InputProcessor(Tokenizer.from_dir(d), llm.engine, "adds")
    assert adds.bos_for_ids([5, 6]) == [BOS] and adds.bos_for_ids([BOS, 5]) == [] and adds.bos_for_ids([]) == []
    assert adds.tokenize({"prompt_token_ids": [5, 6]}).ids == [5, 6]  # LLM prompts stay as sent


# -- parameters ------------------------------------------------------------------------------------------------------
def test_a_request_is_validated_once(llm, param_checks, validated):
    llm.generate("x", SamplingParams(max_new_tokens=4, seed=0, suffix="y"))
    assert len(param_checks) == 1 and len(validated) == 1
    param_checks.clear()
    llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_new_tokens=4, seed=0), reference_sampling=True)
    assert len(param_checks) == 1 and len(validated) == 2
    with pytest.raises(ValueError, match="mode"):  # reference mode's own limits come after the one validation
        llm.generate("x", SamplingParams(max_new_tokens=4, mode="ar"), reference_sampling=True)


@pytest.mark.parametrize(
    "prompt,kw,field",
    [
        ("x", dict(t_min=0.9, t_max=0.1), "t_max"),
        ("x", dict(stop_token_ids=[300]), "stop_token_ids"),
        ("x", dict(suffix="y", mode="ar"), "suffix_token_ids"),
        ("x", dict(n=3), "n"),  # max_batch is 2
        ("x", dict(template=[5] * 9), "template"),  # the canvas has 8 positions
        ("x", dict(max_new_tokens=200), "max_new_tokens"),  # past the context of 128
        ({"prompt_token_ids": [5] * 128}, {}, "prompt"),
        ({"prompt_token_ids": [5, 300]}, {}, "prompt"),
        ({"prompt_token_ids": []}, {}, "prompt"),
        ("x", dict(regex="(unclosed"), CONSTRAINT),
    ],
)
def test_a_bad_field_is_reported_once_with_its_name(llm, param_checks, prompt, kw, field):
    with pytest.raises(ValueError) as e:
        llm.generate(prompt, SamplingParams(**{"max_new_tokens": 4, **kw}))
    assert error_field(e.value) == field and str(e.value)
    assert len(param_checks) == 1  # one validation, one error
    if isinstance(e.value, (SamplingParamError, InvalidRequest)):
        assert e.value.param == field
    assert not llm.engine.has_unfinished()  # nothing was queued


def test_the_server_names_the_request_field(llm):
    with _server(llm) as c:
        for body, param in (
            ({"prompt": [5] * 20, "max_tokens": 200}, "max_tokens"),
            ({"prompt": [5, 300], "max_tokens": 4}, "prompt"),
            ({"prompt": "x", "max_tokens": 4, "n": 3}, "n"),
            ({"prompt": "x", "max_tokens": 4, "structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ):
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tool_calls_finish_the_answer_once():
    calls = SimpleNamespace(calls=[object()])
    assert chat_finish_reason("stop", calls) == "tool_calls"
    assert chat_finish_reason("length", calls) == "length"  # cut short: the calls may be incomplete
    assert chat_finish_reason("stop", SimpleNamespace(calls=[])) == "stop"
    assert chat_finish_reason("stop", None) == "stop"
