"""The sampling-knob table (dgemma/params.py) and what is derived from it: SamplingParams.validate, the CLI flags
and the server's request schema with its request -> SamplingParams translation (dgemma/protocol.py), without HTTP."""

from __future__ import annotations

import argparse

import pydantic
import pytest

from dgemma.entrypoints import protocol as P
from dgemma.entrypoints.cli import CLIError, add_sampling_arguments, sampling_params_from_args
from dgemma.engine.params import KNOBS, SamplingParamError, SamplingParams


def _outside(knob) -> object:
    """A value just outside the knob's range (or not one of its choices)."""
    if knob.kind is str:
        return "nope"
    if knob.kind is bool:
        return 3
    if knob.ge is not None:
        return knob.ge - 1
    return knob.gt if knob.gt is not None else knob.le + 1


@pytest.mark.parametrize("knob", [k for k in KNOBS], ids=lambda k: k.name)
def test_every_knob_is_validated_flagged_and_in_the_schema(knob):
    with pytest.raises(SamplingParamError, match=knob.name) as e:
        SamplingParams(**{knob.name: _outside(knob)}).validate()
    assert e.value.param == knob.name
    SamplingParams(**{knob.name: knob.default}).validate()  # the default is valid
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    assert knob.flag in parser.format_help()
    if knob.api_name is None:
        assert knob.api_name not in P.CompletionRequest.model_fields
        return
    assert knob.api_name in P.ChatCompletionRequest.model_fields
    if knob.kind is not bool:
        with pytest.raises(pydantic.ValidationError) as v:  # (completions alone take max_tokens 0: echo scoring)
            P.ChatCompletionRequest.model_validate(
                {"messages": [{"role": "user", "content": "x"}], knob.api_name: _outside(knob)}
            )
        assert v.value.errors()[0]["loc"][0] == knob.api_name


def test_request_to_sampling_params():
    req = P.CompletionRequest.model_validate(
        {
            "prompt": "hi",
            "max_tokens": 7,
            "seed": 3,
            "stop": "END",
            "stop_token_ids": [9],
            "mode": "ar",
            "temperature": 1,
            "top_k": 4,
            "ignore_eos": True,
            "response_format": {"type": "json_object"},
        }
    )
    sp = req.sampling_params(default_max_tokens=100)
    assert (sp.max_new_tokens, sp.seed, sp.stop, sp.stop_token_ids, sp.mode, sp.ignore_eos) == (
        7,
        3,
        ["END"],
        [9],
        "ar",
        True,
    )
    assert sp.temperature == 1.0 and isinstance(sp.temperature, float) and sp.top_k == 4 and sp.json_object
    chat = P.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5, "max_tokens": 9, "t_min": 0.3}
    )
    sp = chat.sampling_params(default_max_tokens=100)
    assert sp.max_new_tokens == 5 and sp.t_min == 0.3 and sp.t_max is None  # unset: the checkpoint's
    assert P.CompletionRequest.model_validate({"prompt": "x"}).sampling_params(50).max_new_tokens == 50


@pytest.mark.parametrize(
    "body,param",
    [
        ({"t_min": 0.9, "t_max": 0.1}, "t_max"),
        ({"stop": ["a", ""]}, "stop"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a"}, "suffix": "z"}, "suffix"),
    ],
)
def test_request_errors_name_the_request_field(body, param):
    req = P.CompletionRequest.model_validate({"prompt": "x", **body})
    with pytest.raises(P.RequestError) as e:
        req.sampling_params(default_max_tokens=10)
    assert e.value.param == param and str(e.value)


def test_api_param_names():
    assert P.api_param("max_new_tokens") == "max_tokens" and P.api_param("suffix_token_ids") == "suffix"
    assert P.api_param("t_max") == "t_max" and P.api_param(None) is None


def test_cli_flags_follow_the_table():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    sp = sampling_params_from_args(parser.parse_args(["--stability-threshold", "0", "--t-min", "0.2"]))
    assert sp.stability_threshold == 0 and sp.t_min == 0.2 and sp.max_new_tokens == 256  # 0 is a given value
    with pytest.raises(CLIError, match="--top-k"):
        sampling_params_from_args(parser.parse_args(["--top-k", "3"]))  # an AR knob in diffusion mode
    with pytest.raises(CLIError, match="--schedule"):
        sampling_params_from_args(parser.parse_args(["--mode", "ar", "--schedule", "cosine"]))
    assert sampling_params_from_args(parser.parse_args(["--mode", "ar", "--top-k", "3"])).top_k == 3
