"""Structured output on 250 real-world-shaped JSON Schemas (tests/realworld_schemas.py) with a random-weights model,
a byte-level BPE tokenizer and `max_new_tokens=512`: every schema `jsonschema` accepts compiles (unknown formats and
unsupported keywords are warnings, not errors), every `finish_reason: "stop"` output validates, and >= 99 % of the
schemas finish within the budget. The full run is marked slow (docs/structured.md records the measured rates; the test
prints them, and so does `python tests/test_constraints_suite.py`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bpe import build_bpe_tokenizer  # noqa: E402
from realworld_schemas import suite  # noqa: E402

jsonschema = pytest.importorskip("jsonschema")

BUDGET = 512


def build_llm(root: Path):
    from dgemma import LLM, DiffusionGemma, save_model
    from dgemma.model.config import tiny_config

    tok = build_bpe_tokenizer(root / "tok")
    torch.manual_seed(0)
    model = DiffusionGemma(tiny_config(vocab_size=300, canvas_length=16))
    path = save_model(model, root / "ck", tokenizer_dir=tok, generation_config={"max_denoising_steps": 8})
    return LLM(path, device="cpu", dtype="float32", max_batch=8, max_model_len=BUDGET + 64)


def run(llm, schemas: list[tuple[str, dict]], budget: int = BUDGET) -> dict[str, object]:
    """Generate once per schema; returns counts and the failing names."""
    from dgemma import SamplingParams
    from dgemma.structured.constraints import ConstraintError

    rejected, stopped, invalid, unfinished = [], 0, [], []
    prompts, params, names = [], [], []
    for k, (name, schema) in enumerate(schemas):
        p = SamplingParams(max_new_tokens=budget, seed=k, json_schema=schema)
        try:
            llm.engine.guides.compile(p.constraint())
        except ConstraintError as e:
            rejected.append((name, str(e)))
            continue
        prompts.append("Reply in JSON.")
        params.append(p)
        names.append((name, schema))
    outs = [r.outputs[0] for r in llm.generate(prompts, params)] if prompts else []  # batched by the engine
    for (name, schema), o in zip(names, outs):
        if o.finish_reason != "stop":
            unfinished.append(name)
            continue
        stopped += 1
        try:
            jsonschema.validate(json.loads(o.text), schema)
        except (ValueError, jsonschema.ValidationError) as e:
            invalid.append((name, str(e)[:200]))
    return {
        "schemas": len(schemas),
        "rejected": rejected,
        "stopped": stopped,
        "invalid": invalid,
        "unfinished": unfinished,
    }


def test_every_schema_compiles(tmp_path):
    llm = build_llm(tmp_path)
    from dgemma import SamplingParams

    for name, schema in suite():
        jsonschema.Draft202012Validator.check_schema(schema)
        llm.engine.guides.compile(SamplingParams(json_schema=schema).constraint())  # raises on a rejection


@pytest.mark.slow
def test_suite_validity_and_finish_rates(tmp_path):
    r = run(build_llm(tmp_path), suite())
    print(summary(r))
    assert not r["rejected"] and not r["invalid"], r
    assert r["stopped"] >= 0.99 * r["schemas"], r


def summary(r: dict[str, object]) -> str:
    return (
        f"{r['stopped']}/{r['schemas']} finished, {len(r['invalid'])} invalid, {len(r['rejected'])} rejected; "
        f"unfinished: {r['unfinished']}"
    )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        llm = build_llm(Path(d))
        result = run(llm, suite())
        print(json.dumps(result, indent=1))
        print(f"{summary(result)}; {time.time() - t0:.0f} s")
