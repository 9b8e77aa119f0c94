"""The offline API with tools, reasoning, logprobs and n > 1 (`LLM.chat`, `SamplingParams(logprobs=..., n=...)`), in
process on a tiny random model with the Gemma-4-format tokenizer of tests/gemma4_chat.py:

- a required call validates against its schema, in diffusion and AR mode;
- `auto`: a call opened mid-canvas (the opening marker forced at a canvas position) is constrained from the marker
  on: the canvas is committed up to the marker and the call continues in a constrained canvas;
- logprobs: AR logprobs equal a direct encode of the same tokens; diffusion logprobs follow their definition (the
  last step's sampling distribution, temperature applied, at the committed tokens);
- n=4: four outputs, one prefill (the prompt's tokens run through the encoder once), per-sample seeds.
"""

from __future__ import annotations

import json

import pytest
import torch

from dgemma import LLM, DiffusionGemma, SamplingParams, save_model
from dgemma.model.config import tiny_config
from dgemma.engine.logprobs import prompt_logprobs
from forcing import force_canvas
from gemma4_chat import build_gemma4_tokenizer
from test_chat import TOOL_SCHEMAS, TOOLS

jsonschema = pytest.importorskip("jsonschema")
MSGS = [{"role": "user", "content": "what is the weather?"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_llm")
    tok_dir, ids = build_gemma4_tokenizer(root / "tok")
    torch.manual_seed(0)
    model = DiffusionGemma(tiny_config(vocab_size=320, canvas_length=8))
    path = save_model(model, root / "ck", tokenizer_dir=tok_dir, generation_config={"max_denoising_steps": 6})
    out = LLM(path, device="cpu", dtype="float32", max_batch=4, max_model_len=2048)
    out.marker_ids = ids
    return out


def _valid(output) -> None:
    assert output.finish_reason == "tool_calls" and output.message.tool_calls
    for c in output.message.tool_calls:
        jsonschema.validate(json.loads(c.arguments), TOOL_SCHEMAS[c.name])


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_required_call(llm, mode):
    for seed in range(3):
        r = llm.chat(
            MSGS,
            SamplingParams(max_new_tokens=160, seed=seed, mode=mode, temperature=1.0),
            tools=TOOLS,
            tool_choice="required",
        )
        _valid(r.outputs[0])


def test_auto_call_starts_mid_canvas(llm, monkeypatch):
    opener = llm.marker_ids["<|tool_call>"]
    force_canvas(monkeypatch, at={3: opener})  # every canvas would put the opening marker at position 3
    r = llm.chat(MSGS, SamplingParams(max_new_tokens=160, seed=0), tools=TOOLS, parallel_tool_calls=False)
    o = r.outputs[0]
    _valid(o)
    assert o.token_ids[3] == opener and opener not in o.token_ids[4:]  # cut at the marker; constrained after it
    assert len(o.message.tool_calls) == 1


def test_auto_text_stays_unconstrained(llm, monkeypatch):
    force_canvas(monkeypatch, ban=[llm.marker_ids["<|tool_call>"]])
    r = llm.chat(MSGS, SamplingParams(max_new_tokens=24, seed=0, ignore_eos=True), tools=TOOLS)
    o = r.outputs[0]
    assert o.finish_reason == "length" and not o.message.tool_calls and len(o.token_ids) == 24


def test_ar_logprobs_equal_a_direct_encode(llm):
    prompt = [40, 41, 42, 43]
    r = llm.generate(
        [{"prompt_token_ids": prompt}],
        SamplingParams(max_new_tokens=6, mode="ar", logprobs=2, ignore_eos=True, temperature=1.0, seed=3),
    )[0]
    o = r.outputs[0]
    ref = prompt_logprobs(llm.model, prompt + o.token_ids, top_k=2)[len(prompt) :]
    assert [e.token_id for e in o.logprobs] == o.token_ids
    for got, want in zip(o.logprobs, ref):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]


def test_prompt_logprobs(llm):
    prompt = [7, 70, 170, 27, 99]
    r = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_new_tokens=1, prompt_logprobs=1))[0]
    ref = prompt_logprobs(llm.model, prompt, top_k=1)
    assert r.prompt_logprobs[0] is None
    assert [e.logprob for e in r.prompt_logprobs[1:]] == pytest.approx([e.logprob for e in ref[1:]], abs=1e-5)


def test_diffusion_logprobs_follow_their_definition(llm, monkeypatch):
    import dgemma.engine.step as E

    seen = []
    real = E.sample_step

    def spy(logits, canvas, temperature, *a, **kw):  # the distribution the step samples from: temperature applied
        seen.append(torch.log_softmax(logits.float() / temperature[:, None, None], -1).clone())
        return real(logits, canvas, temperature, *a, **kw)

    monkeypatch.setattr(E, "sample_step", spy)
    r = llm.generate(
        [{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_new_tokens=8, logprobs=1, seed=1, ignore_eos=True)
    )[0]
    o = r.outputs[0]
    last = seen[-1][0]  # the step whose argmax canvas was committed (one canvas of 8)
    assert [e.logprob for e in o.logprobs] == pytest.approx(
        [float(last[p, t]) for p, t in enumerate(o.token_ids)], abs=1e-5
    )


def test_n_samples_share_one_prefill(llm):
    prompt = list(range(30, 50))
    before = llm.engine.stats["prefill_tokens"]
    r = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_new_tokens=8, n=4, seed=9, ignore_eos=True))[0]
    assert [o.index for o in r.outputs] == [0, 1, 2, 3] and all(len(o.token_ids) == 8 for o in r.outputs)
    assert llm.engine.stats["prefill_tokens"] - before == len(prompt)
    again = llm.generate(
        [{"prompt_token_ids": prompt}], SamplingParams(max_new_tokens=8, n=4, seed=9, ignore_eos=True)
    )[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in r.outputs]
