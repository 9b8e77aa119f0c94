"""Tokenizers that agree, and the tokenizer endpoints (dgemma.entrypoints.tokenization):

- transformers' `AutoTokenizer` on every bundled model gives exactly the ids dgemma's text path gives (BOS
  included), for a set of prompts; a checkpoint whose tokenizer files disagree with dgemma's BOS policy is
  warned about once;
- /tokenize and /detokenize answer in vLLM's shapes (text and chat forms, token strings, special tokens off);
- on the bundled Sudoku model a token-id prompt without BOS (as lm-evaluation-harness sends it by default) gets
  BOS as context: the same completion as the text prompt, and `echo` returns the ids as sent.
"""

from __future__ import annotations

import logging

import pytest

from dgemma.model.checkpoint import BUNDLED_MODELS
from dgemma.tasks import sudoku as S
from dgemma.text.tokenizer import Tokenizer

PUZZLES = [
    "530070000600195000098000060800060003400803001700020006060000280000419005000080079",
    "000000907000420180000705026100904000050000040000507009920108000034059000507000000",
]
PROMPTS = [S.prompt_text(p) for p in PUZZLES] + [
    "",
    "Solve this sudoku puzzle.",
    "1 2 3",
    "5 <eos>",
    "7",
]  # (text that starts with a literal "<bos>" gets a second one from transformers, not from dgemma)


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_transformers_agrees_on_bundled_models(name, caplog):
    transformers = pytest.importorskip("transformers")
    from dgemma.entrypoints.llm import LLM

    with caplog.at_level(logging.WARNING, logger="dgemma.text.tokenizer"):
        llm = LLM(name, max_batch=1)
    assert not caplog.records  # the files agree with dgemma's BOS policy: no warning
    hf = transformers.AutoTokenizer.from_pretrained(str(BUNDLED_MODELS[name]))
    for text in PROMPTS:
        ours = llm.encode_prompt(text)[1]
        assert hf(text)["input_ids"] == ours, text
        assert ours[0] == llm.tokenizer.bos_token_id
        assert hf.decode(ours, skip_special_tokens=True) == llm.decode(ours), text
    assert llm.tokenizer.transformers_adds_bos()


def test_disagreeing_bos_policy_is_warned_once(tmp_path, caplog):
    from bpe import build_bpe_tokenizer

    d = build_bpe_tokenizer(tmp_path / "tok")  # a BOS token, but no post-processor that adds it
    with caplog.at_level(logging.WARNING, logger="dgemma.text.tokenizer"):
        tok = Tokenizer.from_dir(d)
        Tokenizer.from_dir(d)
    assert not tok.transformers_adds_bos()
    (warning,) = [r for r in caplog.records if r.name == "dgemma.text.tokenizer"]
    assert "adds no BOS" in warning.getMessage() and "TemplateProcessing" in warning.getMessage()


# -- the endpoints, on the bundled Sudoku model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sudoku():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from test_server import MODEL, _start, _stop

    proc, url = _start("sudoku", "--max-model-len", "512")
    yield url, httpx.Client(base_url=url, timeout=60), MODEL
    assert _stop(proc) == 0


def test_tokenize_and_detokenize(sudoku):
    _, http, model = sudoku
    text = S.prompt_text(PUZZLES[0])
    r = http.post("/tokenize", json={"model": model, "prompt": text, "return_token_strs": True}).json()
    assert set(r) == {"count", "max_model_len", "tokens", "token_strs"} and r["max_model_len"] == 512
    assert r["tokens"][0] == S.BOS_ID and r["tokens"][-81:] == S.encode_grid(PUZZLES[0])
    assert r["count"] == len(r["tokens"]) and r["token_strs"][:3] == ["<bos>", "Solve", "this"]
    raw = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert raw["tokens"] == r["tokens"][1:] and raw["token_strs"] is None
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "1 2"}]}).json()
    assert chat["tokens"][0] == S.BOS_ID and chat["count"] > 3
    back = http.post("/detokenize", json={"model": model, "tokens": r["tokens"]}).json()
    assert back == {"prompt": "<bos> " + " ".join(text.split())}
    assert http.post("/detokenize", json={"tokens": [10**6]}).json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={"model": "other", "prompt": "1"}).status_code == 404
    r = http.post("/tokenize", json={"messages": [{"role": "user", "content": "1"}], "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_token_id_prompts_get_bos_as_context(sudoku):
    _, http, model = sudoku
    text = S.prompt_text(PUZZLES[0])
    ids = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    body = {"model": model, "max_tokens": 81, "seed": 0}
    by_text = http.post("/v1/completions", json={**body, "prompt": text}).json()
    by_ids = http.post("/v1/completions", json={**body, "prompt": ids}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids) + 1  # the BOS the model saw
    verbatim = http.post("/v1/completions", json={**body, "prompt": ids, "add_special_tokens": False}).json()
    assert verbatim["usage"]["prompt_tokens"] == len(ids)
    echo = {"model": model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    lp = http.post("/v1/completions", json={**echo, "return_tokens_as_token_ids": True}).json()["choices"][0]
    tokens = [int(t.removeprefix("token_id:")) for t in lp["logprobs"]["tokens"]]
    assert tokens == ids and lp["logprobs"]["token_logprobs"][0] is not None  # conditioned on the BOS
