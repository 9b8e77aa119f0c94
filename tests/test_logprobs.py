"""Log-probability helpers (engine.logprobs): prompt scoring equals a direct causal `encode` of the same tokens (in
any chunking), top-k alternatives are the distribution's best, and the OpenAI shapes are right."""

from __future__ import annotations

import math

import pytest
import torch

from dgemma import DiffusionGemma
from dgemma.model.config import tiny_config
from dgemma.engine.logprobs import chat_logprobs, completion_logprobs, from_logits, prompt_logprobs


@pytest.fixture(scope="module")
def model() -> DiffusionGemma:
    torch.manual_seed(0)
    return DiffusionGemma(tiny_config(vocab_size=96, canvas_length=8)).eval()


def test_prompt_logprobs_equal_a_direct_encode(model):
    ids = torch.randint(0, 96, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        direct = torch.log_softmax(model.logits(model.encode(torch.tensor([ids]), model.new_cache(1, 21)))[0], -1)
    for chunk in (1, 4, 256):
        got = prompt_logprobs(model, ids, top_k=3, chunk=chunk)
        assert got[0] is None and len(got) == len(ids)
        for t in range(1, len(ids)):
            assert got[t].token_id == ids[t]
            assert got[t].logprob == pytest.approx(float(direct[t - 1, ids[t]]), abs=1e-5)
            best = torch.topk(direct[t - 1], 3)
            assert [i for i, _ in got[t].top] == best.indices.tolist()
            assert [v for _, v in got[t].top] == pytest.approx(best.values.tolist(), abs=1e-5)
    assert prompt_logprobs(model, []) == [] and prompt_logprobs(model, [5]) == [None]


def test_from_logits():
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, 5.0]])
    a, b = from_logits(logits, [1, 0], top_k=1)
    assert a.logprob == pytest.approx(math.log(0.75)) and a.top == [(1, pytest.approx(math.log(0.75)))]
    assert b.logprob == pytest.approx(math.log(0.5)) and len(b.top) == 1
    assert from_logits(logits, [0, 1])[0].top == []


def test_openai_shapes():
    text = {1: "a", 2: "bc", 3: "é"}.__getitem__
    entries = from_logits(torch.zeros(2, 4), [2, 3], top_k=2)
    chat = chat_logprobs(entries, text)["content"]
    assert chat[1]["token"] == "é" and chat[1]["bytes"] == [0xC3, 0xA9]
    assert chat[0]["logprob"] == pytest.approx(math.log(0.25)) and len(chat[0]["top_logprobs"]) == 2
    assert set(chat[0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    comp = completion_logprobs([None] + entries, [1, 2, 3], lambda t: text(t) if t else "<0>", offset=10)
    assert comp["tokens"] == ["a", "bc", "é"] and comp["text_offset"] == [10, 11, 13]
    assert comp["token_logprobs"][0] is None and comp["top_logprobs"][0] is None
    assert comp["token_logprobs"][1] == pytest.approx(math.log(0.25)) and len(comp["top_logprobs"][2]) == 2
