"""The denoising step (`dgemma/engine/step.py`): one function serves every row on every path.

The CPU default runs the step eagerly on exact shapes; with `graphs` on (the CUDA default) the same step runs from
static bucket-padded buffers, which is what a CUDA graph replays. A batch mixing a constrained, a templated, an
infilling and a free row must go through the very same function on both paths and make the same decisions.
"""

from __future__ import annotations

import json
import sys

import jsonschema
import pytest
import torch

import dgemma.engine.runner as runner_mod
import dgemma.engine.step as step_mod
from dgemma import DiffusionGemma, save_model
from dgemma.engine.graphs import StepGraphs
from dgemma.engine.params import SamplingParams
from dgemma.entrypoints.llm import LLM
from dgemma.model.config import tiny_config

from bpe import build_bpe_tokenizer
from engine_trace import same_run, tracing

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("step") / "model"
    build_bpe_tokenizer(d, 300)
    torch.manual_seed(0)
    model = DiffusionGemma(
        tiny_config(vocab_size=300, canvas_length=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    )
    model.reset_parameters()  # the default scale: large weights amplify rounding from step to step past LOGIT_TOL
    save_model(model, d, tokenizer_dir=d)
    return d


def _mixed() -> tuple[list[str], list[SamplingParams]]:
    prompts = ["a", "b", "c", "d"]
    params = [
        SamplingParams(max_new_tokens=24, seed=1, ignore_eos=True),  # free
        SamplingParams(max_new_tokens=64, seed=2, json_schema=SCHEMA),  # constrained
        SamplingParams(max_new_tokens=24, seed=3, ignore_eos=True, template=[40, -1, 41, -1, 42]),  # templated
        SamplingParams(max_new_tokens=12, seed=4, suffix=" end"),  # infilling
    ]
    return prompts, params


def _run(llm: LLM) -> tuple[list, list, object]:
    """Generate the mixed batch; the code objects that called the sampler, and the trace."""
    callers = []
    prompts, params = _mixed()
    with tracing() as trace, pytest.MonkeyPatch.context() as mp:
        real = step_mod.sample_step  # the trace's recorder: the spy goes outside it, so its caller is the step

        def spy(*args, **kwargs):
            callers.append(sys._getframe(1).f_code)
            return real(*args, **kwargs)

        mp.setattr(step_mod, "sample_step", spy)
        outs = llm.generate(prompts, params)
    return outs, callers, trace


def test_eager_and_static_paths_run_one_step_function(model_dir):
    eager = LLM(model_dir, max_batch=4, max_model_len=256)
    static = LLM(model_dir, max_batch=4, max_model_len=256)
    static.engine.graphs = StepGraphs(static.model, static.engine.cache, step_mod.denoise_step, capture=False)
    assert eager.engine.graphs is None and runner_mod.denoise_step is step_mod.denoise_step
    a, calls_a, trace_a = _run(eager)
    b, calls_b, trace_b = _run(static)
    # every sampler call of both runs came from the one step function, and the static run used the static buffers
    assert calls_a and calls_b and set(calls_a) == set(calls_b) == {step_mod.denoise_step.__code__}
    assert ("denoise", 4) in static.engine.graphs._graphs
    # each contract holds on both paths
    for outs in (a, b):
        jsonschema.validate(json.loads(outs[1].outputs[0].text), SCHEMA)
        assert outs[3].outputs[0].token_ids and len(outs[0].outputs[0].token_ids) == 24
    # the same decisions: identical tokens wherever rounding (spans padded to 256 on the static path) did not part
    # the runs; where it did, `same_run` proves it was rounding at a decision boundary
    agreed = 0
    for x, y, sp in zip(a, b, _mixed()[1]):
        if same_run(trace_a, trace_b, sp.seed):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids, f"seed {sp.seed}"
            agreed += 1
    assert agreed >= 3
