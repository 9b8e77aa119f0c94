"""Structured output (`dgemma/structured/constraints.py` and `frontier.py`, called by the engine at each step) and
infilling.

Random weights are the hardest case: nothing but the constraint keeps the output valid, so every output of a tiny
random-weights model with a real byte-level BPE tokenizer must validate (jsonschema for schemas, `re.fullmatch` for
regexes and regular grammars), and must finish within its token budget.
"""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch

from dgemma import DiffusionGemma, save_model
from dgemma.model.config import tiny_config
from dgemma.structured.constraints import Constraint, ConstraintError
from dgemma.entrypoints.llm import LLM
from dgemma.engine.params import SamplingParams

from bpe import build_bpe_tokenizer
from forcing import boost_token, force_canvas

CANVAS = 16


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    d = tmp_path_factory.mktemp("structured") / "model"
    build_bpe_tokenizer(d, 300)
    torch.manual_seed(0)
    model = DiffusionGemma(
        tiny_config(vocab_size=300, canvas_length=CANVAS, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    )
    model.reset_parameters(0.3)  # large random weights: confident, arbitrary logits (the adversarial case)
    save_model(model, d, tokenizer_dir=d)
    return LLM(d, max_batch=8, max_model_len=2048)


@pytest.fixture(scope="module")
def beta_llm(tmp_path_factory, llm) -> LLM:
    """A model whose weights make the first token of "beta" win every position (tests/forcing.py), on any CPU."""
    d = tmp_path_factory.mktemp("prefers_beta") / "model"
    torch.manual_seed(1)
    model = DiffusionGemma(
        tiny_config(vocab_size=300, canvas_length=CANVAS, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    )
    boost_token(model, llm.tokenizer.encode("beta")[0])
    save_model(model, d, tokenizer_dir=llm.path)
    return LLM(d, max_batch=1, max_model_len=256)


_str = {"type": "string"}
_int = {"type": "integer"}
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": _str}, "required": ["name"]},
    {
        "type": "object",
        "properties": {"a": _int, "b": {"type": "boolean"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5}}, "required": ["x"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 20}}, "required": ["n"]},
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4}},
        "required": ["n"],
    },
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"v": {"enum": [1, "two", None, True]}}, "required": ["v"]},
    {"type": "object", "properties": {"k": {"const": "fixed"}}, "required": ["k"]},
    {"type": "array", "items": _int, "minItems": 2, "maxItems": 4},
    {"type": "array", "items": _str, "maxItems": 2},
    {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}, "maxItems": 2},
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": _str, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}},
        "required": ["code"],
    },
    {
        "type": "object",
        "properties": {"email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.(com|org)$"}},
        "required": ["email"],
    },
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 5}}, "required": ["s"]},
    {
        "type": "object",
        "properties": {
            "inner": {
                "type": "object",
                "properties": {"deep": {"type": "object", "properties": {"z": _int}, "required": ["z"]}},
                "required": ["deep"],
            }
        },
        "required": ["inner"],
    },
    {"type": "object", "properties": {"id": {"anyOf": [_int, _str]}}, "required": ["id"]},
    {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "null"}, {"type": "number", "minimum": 0}]}},
        "required": ["v"],
    },
    {
        "type": "object",
        "properties": {"opt": _str, "req": {"type": "boolean"}},
        "required": ["req"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": _str, "qty": {"type": "integer", "minimum": 1}},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["items"],
    },
    {"type": "object", "properties": {"t": {"type": ["string", "null"]}}, "required": ["t"]},
    {"type": "string", "enum": ["yes", "no"]},
    {"type": "integer", "minimum": 100, "maximum": 999},
    {"type": "number"},
    {"type": "boolean"},
    {"type": "null"},
    {"type": "string", "maxLength": 8},
    {
        "$defs": {
            "pt": {
                "type": "object",
                "properties": {"x": _int, "y": _int},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
        "required": ["a", "b"],
    },
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "items": {"type": "array", "items": _int, "minItems": 2, "maxItems": 2},
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "required": ["matrix"],
    },
    {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "error"]},
            "detail": _str,
            "code": {"type": "integer", "minimum": 0, "maximum": 599},
        },
        "required": ["status", "code"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"a": {"type": "object"}, "b": {"type": "array"}}, "required": ["a", "b"]},
    {
        "type": "object",
        "properties": {
            "price": {"type": "number", "minimum": 0, "maximum": 1000},
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
        },
        "required": ["price", "currency"],
    },
    {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
            "ok": {"type": "boolean"},
        },
        "required": ["date", "ok"],
    },
    {
        "type": "object",
        "properties": {
            "ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 3, "maxItems": 3}
        },
        "required": ["ids"],
    },
]


def test_suite_has_at_least_30_schemas():
    assert len(SCHEMAS) >= 30
    for s in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(s)


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_every_schema_output_validates(llm, mode):
    """100 % of outputs validate, for every schema and 2 seeds, within a 512-token budget."""
    prompts, params, index = [], [], []
    for i, schema in enumerate(SCHEMAS):
        for seed in range(2):
            prompts.append("Reply in JSON:")
            params.append(SamplingParams(max_new_tokens=512, seed=seed, mode=mode, json_schema=schema, temperature=1.0))
            index.append(i)
    outs = llm.generate(prompts, params)
    for i, o in zip(index, outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (SCHEMAS[i], c.text, c.finish_reason)
        jsonschema.validate(json.loads(c.text), SCHEMAS[i])
        assert llm.engine.eos.isdisjoint(c.token_ids)


def test_json_object_and_schema_as_text(llm):
    o = llm.generate("x", SamplingParams(max_new_tokens=256, seed=0, json_object=True))[0].outputs[0]
    assert o.finish_reason == "stop" and isinstance(json.loads(o.text), dict)
    schema = {"type": "object", "properties": {"k": _int}, "required": ["k"]}
    o = llm.generate("x", SamplingParams(max_new_tokens=256, seed=0, json_schema=json.dumps(schema)))[0].outputs[0]
    jsonschema.validate(json.loads(o.text), schema)


REGEXES = [
    r"[a-z]+@[a-z]+\.com",
    r"20[0-9]{2}-[01][0-9]-[0-3][0-9]",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{2,6}( [A-Z][a-z]{2,6})?",
    r"\(\d{3}\) \d{3}-\d{4}",
    r"-?(0|[1-9][0-9]*)(\.[0-9]+)?",
    r"[0-9a-f]{8}",
    r"(ab|cd)+x",
]


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_regex_outputs_match(llm, mode):
    outs = llm.generate(
        ["re:"] * (2 * len(REGEXES)),
        [
            SamplingParams(max_new_tokens=96, seed=s, regex=rx, mode=mode, temperature=1.0)
            for rx in REGEXES
            for s in range(2)
        ],
    )
    for rx, o in zip([rx for rx in REGEXES for _ in range(2)], outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop" and re.fullmatch(rx, c.text), (rx, c.text)


def test_regex_shorthands_are_ascii(llm):
    """`\\d` in a regex is `[0-9]`: llguidance's Unicode tables are newer than Python's, so its Unicode `\\d` let a
    random model write a Sunuwar digit (U+11BF1) that Python's `re` does not call a digit. Checked on the grammar
    itself, whatever a model prefers."""
    guides = llm.engine.guides
    g = guides.guide(SamplingParams(regex=r"\d{2}\s\w").constraint())
    for text, ok in (("12 a", True), ("1\U00011bf1", False), ("\u0968\u0969", False), ("12\u2003", False)):
        ids = guides.tok.tokenize_str(text)
        assert (g.m.try_consume_tokens(ids) == len(ids)) == ok, text
        g.m.reset()


def test_choice_and_grammar(llm, beta_llm):
    choices = ["alpha", "beta", "gamma delta", "ε"]
    for s in range(8):
        c = llm.generate(f"pick {s * 37}:", SamplingParams(max_new_tokens=16, seed=s, choice=choices))[0].outputs[0]
        assert c.text in choices and c.finish_reason == "stop"
    # The model still chooses, not always the first option: one that prefers "beta" picks it wherever it is listed.
    # (Which option a random model picks is left to near-ties, so its preference is set through the weights.)
    for s, options in enumerate((choices, choices[::-1])):
        c = beta_llm.generate("pick:", SamplingParams(max_new_tokens=16, seed=s, choice=options))[0].outputs[0]
        assert c.text == "beta" and c.finish_reason == "stop"
    lark = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/\n'
    gbnf = 'root ::= "[" item ("," item)* "]"\nitem ::= [a-c]+\n'
    for grammar, rx in ((lark, r"\(\d{1,3}(,\d{1,3})*\)"), (gbnf, r"\[[a-c]+(,[a-c]+)*\]")):
        for s in range(3):
            c = llm.generate("g:", SamplingParams(max_new_tokens=128, seed=s, grammar=grammar))[0].outputs[0]
            assert c.finish_reason == "stop" and re.fullmatch(rx, c.text), (grammar, c.text)


def test_budget_too_small_says_length(llm):
    """When even the shortest completion does not fit, the answer is 'length', never a fake complete JSON."""
    schema = {
        "type": "object",
        "properties": {"a_very_long_required_key_name": _str, "another_long_required_key": _str},
        "required": ["a_very_long_required_key_name", "another_long_required_key"],
    }
    c = llm.generate("x", SamplingParams(max_new_tokens=6, seed=0, json_schema=schema))[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) <= 6
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


def test_constrained_rows_batch_with_free_rows(llm):
    """Constrained and unconstrained requests share batched steps; each keeps its own contract."""
    schema = {"type": "object", "properties": {"n": _int}, "required": ["n"]}
    outs = llm.generate(
        ["a", "b", "c"],
        [
            SamplingParams(max_new_tokens=40, seed=1, ignore_eos=True),
            SamplingParams(max_new_tokens=200, seed=2, json_schema=schema),
            SamplingParams(max_new_tokens=40, seed=3, regex="[0-9]{5}"),
        ],
    )
    jsonschema.validate(json.loads(outs[1].outputs[0].text), schema)
    assert re.fullmatch("[0-9]{5}", outs[2].outputs[0].text)
    free = outs[0].outputs[0]  # the free row generated its whole budget (ignore_eos: its length is not left to EOS)
    assert len(free.token_ids) == 40 and free.finish_reason == "length"


def test_parallelism_survives_forced_tokens(llm):
    """Tokens the grammar forces are placed without a forward: a schema of long required keys needs far fewer
    denoising steps than tokens."""
    schema = {
        "type": "object",
        "properties": {f"field_number_{i}": {"type": "boolean"} for i in range(6)},
        "required": [f"field_number_{i}" for i in range(6)],
        "additionalProperties": False,
    }
    o = llm.generate("x", SamplingParams(max_new_tokens=256, seed=0, json_schema=schema))[0]
    jsonschema.validate(json.loads(o.outputs[0].text), schema)
    # Whatever the model picks: compact JSON leaves only the six values free (the rest, ~100 tokens, is forced), and
    # each step samples at least one token or completes its canvas, so steps <= canvases + 6 and this holds with room.
    assert o.metrics["tokens_per_forward"] > 2.0, o.metrics


# -- the closing search -----------------------------------------------------------------------------------------
# Strings whose end the search must find: formats llguidance enforces (an e-mail's local part allows `}`, a closing
# bracket that closes nothing there), anchored and unanchored patterns, a counted pattern with a separator.
CLOSING_STRINGS = [
    {"format": "email"},
    {"format": "date-time"},
    {"format": "date"},
    {"format": "time"},
    {"format": "uuid"},
    {"format": "ipv4"},
    {"format": "ipv6"},
    {"format": "hostname"},
    {"format": "uri"},
    {"pattern": "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}"},
    {"pattern": "^[^@]+@[^@]+$"},
    {"pattern": r"^(\S+ ){4}\S+$"},
    {"pattern": "^all|tags$"},
    {"pattern": "^[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}$"},
]


def _random_prefix(g, rng, steps: int) -> list[int]:
    """Consume up to `steps` uniformly random allowed tokens (a random-weights model's worst case: it opens and
    wanders as it likes); returns them."""
    out: list[int] = []
    while len(out) < steps and not g.m.is_stopped():
        allowed = [t for t in g.allowed().nonzero().flatten().tolist() if t not in g.f.eos]
        if not allowed:
            break
        out.append(rng.choice(allowed))
        g.m.consume_token(out[-1])
    return out


@pytest.mark.parametrize("string", CLOSING_STRINGS, ids=lambda s: next(iter(s.values())))
def test_closing_search_finishes_formats_and_patterns(llm, string):
    """From anywhere a random walk leaves the matcher (inside the formatted string, between items of a required
    array, inside an object with required fields after it), the closing search finds a completion, the matcher is
    left where it was, and the whole output validates (with jsonschema's format checks where they agree with
    llguidance's formats: its `date` and `time` are stricter, e.g. no year 0000, no leap second)."""
    import random

    schema = {
        "type": "object",
        "properties": {
            "to": {"type": "array", "items": {"type": "string", **string}, "minItems": 1},
            "after": {"type": "object", "properties": {"n": _int}, "required": ["n"]},
        },
        "required": ["to", "after"],
    }
    formats = jsonschema.FormatChecker(["email", "ipv4", "ipv6", "uuid"])
    check = jsonschema.Draft202012Validator(schema, format_checker=formats)
    for seed in range(12):
        g = llm.engine.guides.guide(Constraint("json_schema", schema))
        prefix = _random_prefix(g, random.Random(seed), steps=[3, 8, 20, 60][seed % 4])
        mask = g.allowed()
        path = g.closing_path(400)
        assert path is not None, (string, seed, llm.tokenizer.decode(prefix))
        assert torch.equal(g.allowed(), mask)  # rolled back
        assert path[-1] in g.f.eos and g.m.consume_tokens(path[:-1]) and g.m.is_accepting()
        check.validate(json.loads(llm.tokenizer.decode(prefix + path[:-1])))


def test_unique_items_over_enumerations_are_enforced(llm):
    """`uniqueItems` over enumerated items is spelled out as the unique arrays (`schemas.unique_selections`): the
    grammar itself refuses a repeated item, so every output has distinct items whatever the model prefers. Other
    `uniqueItems` arrays (strings, too many values) are not enforced and say so in the warnings."""
    from dgemma.structured.schemas import MAX_UNIQUE_SELECTIONS, unique_selections

    roles = {"type": "array", "items": {"enum": ["admin", "editor", "viewer"]}, "uniqueItems": True, "minItems": 2}
    flags = {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True}
    schema = {"type": "object", "properties": {"roles": roles, "flags": flags}, "required": ["roles", "flags"]}
    assert len(unique_selections(roles)["anyOf"]) == 6 + 6 and len(unique_selections(flags)["anyOf"]) == 1 + 2 + 2
    guides = llm.engine.guides
    c = SamplingParams(json_schema=schema).constraint()
    assert not any("uniqueItems" in w for w in guides.warnings(c))
    g = guides.guide(c)
    for text, ok in (('{"roles":["viewer","admin"],"flags":[true,false]}', True), ('{"roles":["admin","admin"', False)):
        ids = guides.tok.tokenize_str(text)
        assert (g.m.try_consume_tokens(ids) == len(ids)) == ok, text
        g.m.reset()
    params = [SamplingParams(max_new_tokens=96, seed=s, json_schema=schema, temperature=1.0) for s in range(8)]
    for o in llm.generate(["x"] * 8, params):
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), schema)
    many = {"type": "array", "items": {"enum": list(range(8))}, "uniqueItems": True}  # 109 601 unique arrays
    for unenforced in (many, {"type": "array", "items": _str, "uniqueItems": True}):
        assert unique_selections(unenforced) is None and MAX_UNIQUE_SELECTIONS < 109_601
        assert any("uniqueItems" in w for w in guides.warnings(Constraint("json_schema", unenforced)))


# -- bad constraints ---------------------------------------------------------------------------------------------
def _deep(n: int) -> dict:
    s: dict = {"type": "integer"}
    for _ in range(n):
        s = {"type": "object", "properties": {"a": s}, "required": ["a"]}
    return s


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(json_schema=_deep(500)), "nests deeper"),
        (dict(json_schema={"enum": list(range(100_000))}), "enum"),
        (dict(json_schema={"type": "string", "pattern": "a" * 10_000}), "pattern"),
        (dict(json_schema={"type": "nonsense"}), "invalid json_schema"),
        (dict(json_schema="{not json"), "not valid JSON"),
        (dict(regex="(unclosed"), "invalid regex"),
        (dict(regex="(a{1000}){1000}"), "forces"),
        (dict(grammar="start: undefined_rule\n"), "invalid grammar"),
        (dict(choice=[]), "choice"),
        (dict(choice=["a"], regex="b"), "at most one"),
        (dict(json_schema={"type": "object"}, suffix="x"), "cannot be combined"),
        (dict(json_schema={"type": "object"}, template=[5, -1]), "cannot be combined"),
    ],
)
def test_bad_constraints_fail_fast_and_leave_the_engine_usable(llm, kwargs, match):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        llm.generate("x", SamplingParams(max_new_tokens=16, **kwargs))
    assert time.perf_counter() - t0 < 60  # each takes well under 3 s; a hang or an unbounded compile would not
    assert not llm.engine.has_unfinished()
    assert llm.generate("x", SamplingParams(max_new_tokens=4, seed=0, regex="[0-9]+"))[0].outputs[0].text.isdigit()


def test_constraint_errors_are_value_errors():
    assert issubclass(ConstraintError, ValueError)
    assert Constraint.from_fields() is None
    assert Constraint.from_fields(regex="a").kind == "regex"


def test_reference_mode_rejects_structured_output(llm):
    with pytest.raises(ValueError, match="structured output"):
        llm.generate("x", SamplingParams(max_new_tokens=8, regex="a+"), reference_sampling=True)


# -- infilling ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_new", [3, CANVAS + 2])  # one canvas; a middle spanning two, the suffix straddling
def test_infilling_places_the_suffix_and_returns_a_clean_middle(llm, max_new, monkeypatch):
    # The model never writes EOS or padding here, so the middle fills its room on any CPU and the last canvas is
    # the one holding the suffix (an early EOS would end the request a canvas earlier). Padding still comes from the
    # template after the suffix, which is what the test checks.
    force_canvas(monkeypatch, ban={0, 1})
    suffix = " return x"
    suffix_ids = llm.tokenizer.encode(suffix)
    drafts: list[list[int]] = []
    middle, reason = [], None
    params = SamplingParams(max_new_tokens=max_new, seed=4, suffix=suffix, ignore_eos=False)
    for d in llm.generate_stream("def f(x):", params, stream_drafts=True):
        if d.draft_token_ids is not None:
            drafts.append(d.draft_token_ids)
        middle += d.token_ids
        if d.finished:
            reason = d.finish_reason
    # The canvas holding the end of the middle's room holds (the start of) the suffix right after it, then pads.
    k = (max_new - 1) // CANVAS
    start = max_new - k * CANVAS
    seen = drafts[-1][start : start + len(suffix_ids)]
    assert seen == suffix_ids[: len(seen)] and len(seen) >= 1
    assert all(t == 0 for t in drafts[-1][start + len(suffix_ids) :])
    assert reason == "length" and len(middle) == max_new
    assert not ({0, 1} & set(middle))  # no EOS / padding inside the middle
    out = llm.generate("def f(x):", params)[0].outputs[0]
    assert out.token_ids == middle  # generate() is built on the stream
    # prefix + middle + suffix is exactly the text the three pieces make together
    assert (
        llm.tokenizer.decode(llm.tokenizer.encode("def f(x):") + middle + suffix_ids) == "def f(x):" + out.text + suffix
    )


def test_infilling_stops_at_eos_in_the_middle(llm, monkeypatch):
    """A middle shorter than its room ends at the model's EOS: nothing after it is returned."""
    force_canvas(monkeypatch, at={3: 1}, ban={0, 1})  # EOS at position 3 of every canvas, no EOS/padding before
    out = llm.generate("x", SamplingParams(max_new_tokens=8, seed=0, suffix=" end"))[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 3


def test_infilling_errors(llm):
    with pytest.raises(ValueError, match="suffix"):
        llm.generate("x", SamplingParams(max_new_tokens=8, suffix="y", mode="ar"))
    with pytest.raises(ValueError, match="suffix_token_ids"):
        llm.generate("x", SamplingParams(max_new_tokens=8, suffix_token_ids=[5, 300]))
    long = llm.generate("x", SamplingParams(max_new_tokens=4, seed=0, suffix_token_ids=[5] * (2 * CANVAS)))
    assert len(long[0].outputs[0].token_ids) <= 4  # a suffix longer than a canvas is fine
    with pytest.raises(ValueError, match="suffix"):
        llm.generate("x", SamplingParams(max_new_tokens=8, suffix=""))


def test_a_tokenizer_llguidance_cannot_read_gets_a_clear_error():
    llm = LLM("sudoku", max_batch=1)  # the bundled model's word-level tokenizer has no byte-level decoder
    with pytest.raises(ConstraintError, match="does not support structured output"):
        llm.generate("x", SamplingParams(max_new_tokens=8, regex="[1-9]+"))
    assert llm.generate({"prompt_token_ids": [2, 13]}, SamplingParams(max_new_tokens=4, seed=0))[0].outputs[0]


def test_a_constraint_failing_mid_generation_aborts_only_its_request(llm, monkeypatch):
    """A resource limit that trips while generating ends that request ('abort', with the error); the batch goes on."""
    from dgemma.structured.constraints import Guide

    real = Guide.consume
    calls = {"n": 0}

    def flaky(self, token):
        if self.m is not None and getattr(self, "_victim", False):
            calls["n"] += 1
            if calls["n"] > 3:
                raise ConstraintError("the constraint failed during generation: lexer limit")
        return real(self, token)

    real_guide = llm.engine.guides.guide

    def guide(c):
        g = real_guide(c)
        g._victim = c.kind == "regex"
        return g

    monkeypatch.setattr(Guide, "consume", flaky)
    monkeypatch.setattr(llm.engine.guides, "guide", guide)
    # The regex needs >= 20 letters and no token has more than 5, so the victim always reaches its 4th token (and
    # the failure), whatever the model writes.
    assert max(len(t) for i in range(300) if (t := llm.tokenizer.decode([i])).isalpha()) <= 5
    for mode in ("diffusion", "ar"):
        calls["n"] = 0
        outs = llm.generate(
            ["a", "b"],
            [
                SamplingParams(max_new_tokens=64, seed=1, mode=mode, regex="[a-z]{20,30}"),
                SamplingParams(max_new_tokens=64, seed=2, mode=mode, choice=["yes", "no"]),
            ],
        )
        assert outs[0].outputs[0].finish_reason == "abort" and "lexer limit" in outs[0].metrics["error"]
        assert outs[1].outputs[0].finish_reason == "stop" and outs[1].outputs[0].text in ("yes", "no")
    assert not llm.engine.has_unfinished()


def test_a_bug_in_a_constraint_is_not_taken_for_a_constraint_failure(llm, monkeypatch):
    """Only ConstraintError ends a request as a constraint failure; any other error (a bug) reaches the caller."""
    from dgemma.structured.constraints import Guide

    def broken(self, token):
        raise ValueError("a bug, not a limit")

    monkeypatch.setattr(Guide, "consume", broken)
    for mode in ("diffusion", "ar"):
        with pytest.raises(ValueError, match="a bug, not a limit"):
            llm.generate("x", SamplingParams(max_new_tokens=16, seed=0, mode=mode, regex="[a-z]{8}"))
        assert not llm.engine.has_unfinished()


def test_constraint_state_on_its_own(llm):
    """The engine's whole view of a constraint: `start_canvas`, `advance` (at least one validated token per call, the
    rest of the canvas EOS once the grammar is complete) and, in AR mode, `next_token`. Arbitrary logits."""
    from dgemma.structured.frontier import ConstraintState

    g = torch.Generator().manual_seed(0)
    digits = Constraint("regex", "[0-9]{5}")
    cs = ConstraintState(llm.engine.guides.guide(digits), 32, {1}, g)
    fixed = cs.start_canvas(CANVAS, "cpu")
    assert fixed.tolist() == [-1] * CANVAS and not cs.canvas_complete
    for _ in range(CANVAS):
        before = cs.frontier
        cs.advance(torch.randn(CANVAS, 300, generator=g), 1.0, 0.1, produced=0)
        assert cs.frontier > before
        if cs.canvas_complete:
            break
    assert cs.canvas_complete and cs.finished
    toks = fixed.tolist()
    end = toks.index(1)
    assert re.fullmatch("[0-9]{5}", llm.tokenizer.decode(toks[:end])) and set(toks[end:]) == {1}
    ar = ConstraintState(llm.engine.guides.guide(digits), 32, {1}, g)
    out: list[int] = []
    while not ar.finished and len(out) < 32:
        t = ar.next_token(torch.randn(300, generator=g), 1.0, len(out))
        out += [] if t == 1 else [t]
    assert ar.finished and re.fullmatch("[0-9]{5}", llm.tokenizer.decode(out))


def test_ignore_eos_does_not_return_the_fill_after_a_completed_grammar(llm):
    """A grammar that completes early fills the rest of its canvas with EOS; with ignore_eos that fill is still not
    output (it is not the model's EOS but the constraint's end)."""
    out = llm.generate("x", SamplingParams(max_new_tokens=24, seed=1, regex="([a-z][0-9]){5}", ignore_eos=True))[
        0
    ].outputs[0]
    assert out.finish_reason == "stop" and len(out.text) == 10
    assert len(out.token_ids) <= 10 and 1 not in out.token_ids
