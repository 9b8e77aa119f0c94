"""Chat requests with tools and thinking (text.chat), the output parser (text.chat_output) and constrained tool
calls (structured.tool_grammar), without a model: rendering through a Gemma-4-format template written for the tests,
field-naming validation errors, streaming == one-shot parsing at every split point, and random walks through the
tool-call grammar whose parsed arguments `jsonschema` validates."""

from __future__ import annotations

import json
import random
import pytest

from dgemma.text.chat import (
    GEMMA4,
    ChatRequestError,
    ToolChoice,
    check_tool_choice,
    check_tools,
    detect_format,
    render_chat,
)
from dgemma.text.chat_output import (
    ChatOutputParser,
    NativeSyntaxError,
    parse_call,
    parse_chat_output,
    parse_native,
    to_native,
)
from dgemma.structured.constraints import Constraint, ConstraintError, GuideFactory
from dgemma.text.tokenizer import Tokenizer
from dgemma.structured.schemas import prepare_schema, whole_string_regex
from dgemma.structured.tool_grammar import tool_call_grammar
from gemma4_chat import GEMMA4_TEMPLATE, build_gemma4_tokenizer

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
Q = '<|"|>'

# Five tool schemas of the kinds real tool definitions use; every constrained call must validate against them.
TOOL_SCHEMAS = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 12},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["city"],
    },
    "search_issues": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "pattern": "^[a-z][a-z0-9 ]*$", "maxLength": 20},
            "labels": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
            "state": {"enum": ["open", "closed", None]},
            "page": {"type": ["integer", "null"], "minimum": 1},
        },
        "required": ["query", "state"],
        "additionalProperties": False,
    },
    "create_event": {
        "type": "object",
        "$defs": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 10},
                    "email": {"type": "string", "format": "email"},
                },
                "required": ["name"],
            }
        },
        "properties": {
            "title": {"type": "string", "maxLength": 16},
            "date": {"type": "string", "format": "date"},
            "attendees": {"type": "array", "items": {"$ref": "#/$defs/person"}, "minItems": 1, "maxItems": 2},
            "all_day": {"type": "boolean"},
        },
        "required": ["title", "date", "attendees"],
    },
    "set_config": {
        "type": "object",
        "properties": {
            "settings": {"type": "object", "additionalProperties": {"type": ["number", "boolean"]}},
            "mode": {
                "anyOf": [
                    {"const": "fast"},
                    {
                        "type": "object",
                        "properties": {"level": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
                        "required": ["level"],
                    },
                ]
            },
        },
        "required": ["mode"],
    },
    "move": {
        "type": "object",
        "properties": {
            "to": {
                "type": "array",
                "prefixItems": [{"type": "integer"}, {"type": "integer"}],
                "items": False,
                "minItems": 2,
            },
            "id": {"type": "string", "format": "uuid"},
            "note": {"allOf": [{"type": "string"}, {"maxLength": 8}]},
        },
        "required": ["to", "id"],
    },
}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": s}} for n, s in TOOL_SCHEMAS.items()]


@pytest.fixture(scope="module")
def gemma_tok(tmp_path_factory) -> tuple[Tokenizer, dict[str, int]]:
    d, ids = build_gemma4_tokenizer(tmp_path_factory.mktemp("g4"))
    return Tokenizer.from_dir(d), ids


# -- rendering ------------------------------------------------------------------------------------------------------
def test_render_tools_calls_and_results(gemma_tok):
    tok, _ = gemma_tok
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"days": 2, "city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
    ]
    p = render_chat(tok, msgs, [WEATHER])
    decl = (
        f"<|tool>declaration:get_weather{{description:{Q}Current weather{Q},parameters:{{properties:{{city:"
        f"{{type:{Q}string{Q}}},days:{{type:{Q}integer{Q}}}}},required:[{Q}city{Q}],type:{Q}object{Q}}}}}"
        "<tool|>"
    )
    assert p.text == (
        f"<bos><|turn>system\nBe brief.{decl}<turn|>\n<|turn>user\nParis?<turn|>\n<|turn>model\n"
        f"<|tool_call>call:get_weather{{city:{Q}Paris{Q},days:2}}<tool_call|>"  # arguments parsed, keys sorted
        f"<|tool_response>response:get_weather{{value:{Q}sunny{Q}}}<tool_response|>"  # name found by tool_call_id
        "Sunny.<turn|>\n<|turn>user\nThanks<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert p.format == GEMMA4 and p.choice == ToolChoice("auto") and p.parallel and not p.in_reasoning


def test_render_thinking_switch(gemma_tok):
    tok, _ = gemma_tok
    msgs = [{"role": "user", "content": "Hi"}]
    on = render_chat(tok, msgs, chat_template_kwargs={"enable_thinking": True})
    off = render_chat(tok, msgs)
    assert on.text == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    assert off.text == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert on.thinking and not off.thinking and not on.in_reasoning
    # a prompt that ends inside an open channel makes the output start in reasoning
    tok2 = Tokenizer(tok.backend, tok.config, "{{ bos_token }}<|tool_call><tool_call|><|channel>thought\n")
    assert render_chat(tok2, msgs).in_reasoning


def test_chat_template_kwargs_pass_through(gemma_tok):
    tok, _ = gemma_tok
    t = Tokenizer(tok.backend, tok.config, "{{ greeting }}|{{ messages[0]['content'] }}")
    assert render_chat(t, [{"role": "user", "content": "x"}], chat_template_kwargs={"greeting": "hey"}).text == "hey|x"


@pytest.mark.parametrize(
    "tools,choice,param",
    [
        ("nope", None, "tools"),
        ([{"type": "retrieval"}], None, "tools[0].type"),
        ([{"type": "function"}], None, "tools[0].function"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "f", "description": 3}}], None, "tools[0].function.description"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools[0].function.parameters"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            None,
            "tools[0].function.parameters.type",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": 3}}}}],
            None,
            "tools[0].function.parameters.properties.a",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"required": "a"}}}],
            None,
            "tools[0].function.parameters.required",
        ),
        ([WEATHER, WEATHER], None, "tools[1].function.name"),
        ([WEATHER], "sometimes", "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "other"}}, "tool_choice.function.name"),
        (None, "required", "tool_choice"),
    ],
)
def test_bad_tool_declarations_name_the_field(gemma_tok, tools, choice, param):
    tok, _ = gemma_tok
    with pytest.raises(ChatRequestError) as e:
        render_chat(tok, [{"role": "user", "content": "x"}], tools, choice)
    assert e.value.param == param, str(e.value)


@pytest.mark.parametrize(
    "msg,param",
    [
        ({"role": "assistant", "content": None, "tool_calls": {"id": "x"}}, "messages[1].tool_calls"),
        (
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]},
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {"role": "assistant", "content": None, "tool_calls": [{"id": 3, "function": {"name": "f"}}]},
            "messages[1].tool_calls[0].id",
        ),
        ({"role": "tool", "content": "r", "tool_call_id": 7}, "messages[1].tool_call_id"),
        ({"role": "assistant", "content": "a", "reasoning_content": ["x"]}, "messages[1].reasoning_content"),
    ],
)
def test_bad_tool_messages_name_the_field(gemma_tok, msg, param):
    tok, _ = gemma_tok
    with pytest.raises(ChatRequestError) as e:
        render_chat(tok, [{"role": "user", "content": "x"}, msg], [WEATHER])
    assert e.value.param == param, str(e.value)


def test_template_kwargs_and_formatless_templates_are_checked(gemma_tok):
    tok, _ = gemma_tok
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatRequestError) as e:
        render_chat(tok, msgs, chat_template_kwargs={"messages": []})
    assert e.value.param == "chat_template_kwargs"
    with pytest.raises(ChatRequestError) as e:
        render_chat(tok, msgs, chat_template_kwargs=["enable_thinking"])
    assert e.value.param == "chat_template_kwargs"
    plain = Tokenizer(tok.backend, tok.config, None)  # the Gemma-3-style default template: no tool-call syntax
    assert detect_format(plain.chat_template) is None and detect_format(GEMMA4_TEMPLATE) == GEMMA4
    with pytest.raises(ChatRequestError) as e:
        render_chat(plain, msgs, [WEATHER])
    assert e.value.param == "tools"
    assert render_chat(plain, msgs, [WEATHER], "none").choice.mode == "none"  # tools unused: fine


def test_tool_choice_defaults():
    tools = check_tools([WEATHER])
    assert check_tool_choice(None, tools) == ToolChoice("auto")
    assert check_tool_choice(None, []) == ToolChoice("none")
    assert check_tool_choice("auto", []) == ToolChoice("none")
    assert check_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools) == ToolChoice(
        "function", "get_weather"
    )


# -- parsing the output ---------------------------------------------------------------------------------------------
def _ids():
    n = iter(range(100))
    return lambda: f"call_{next(n)}"


OUTPUTS = [
    "Plain answer.",
    "<|channel>thought\nLet me think.\n<channel|>The answer is 4.",
    f"<|channel>thought\nNeed weather.\n<channel|><|tool_call>call:get_weather{{city:{Q}Paris, <FR>{Q},days:3}}"
    f"<tool_call|><|tool_call>call:search{{q:{Q}a:b{Q},opts:{{exact:true,n:null,list:[1,-2.5e3,{Q}x{Q}]}}}}"
    "<tool_call|>",
    f"I will check.<|tool_call>call:get_weather{{city:{Q}Rome{Q}}}<tool_call|>",
    "<|channel>thought\nno close, tool call ends it<|tool_call>call:f{}<tool_call|>",
    "Broken <|tool_call>call:f{a:<tool_call|> after",  # malformed: stays content
    "Unclosed <|tool_call>call:f{a:1}",  # never closed: content
    "<|channel>thou",  # a channel that ends before its label is complete
    "a < b <|tool and <channel| are not markers",
]


@pytest.mark.parametrize("text", OUTPUTS)
def test_streaming_equals_one_shot_at_every_split(text):
    whole = parse_chat_output(text, GEMMA4, new_id=_ids())
    for cut in range(len(text) + 1):
        for cut2 in (cut, min(len(text), cut + 3)):
            p = ChatOutputParser(GEMMA4, new_id=_ids())
            deltas = [p.push(text[:cut]), p.push(text[cut:cut2]), p.push(text[cut2:]), p.finish()]
            content = "".join(d.content for d in deltas)
            reasoning = "".join(d.reasoning for d in deltas)
            calls = [c for d in deltas for c in d.tool_calls]
            assert (content or None, calls) == (whole.content, whole.tool_calls), (cut, cut2)
            assert reasoning == (whole.reasoning or "")


def _reassemble(deltas: list) -> list[tuple[str, str, str]]:
    """(id, name, arguments) per index from the `tool_calls` pieces of streamed deltas, as a client adds them up."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for piece in d.to_openai().get("tool_calls", []):
            c = calls.setdefault(piece["index"], ["", "", ""])
            c[0] += piece.get("id") or ""
            c[1] += piece["function"].get("name") or ""
            c[2] += piece["function"]["arguments"]
    return [tuple(c) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("text", OUTPUTS[2:5])
def test_calls_stream_in_pieces_that_add_up(text):
    """A call streams as vLLM's do: its id and name once `call:NAME{` is written, then its arguments as members
    complete; at any split the pieces add up to the one-shot calls."""
    whole = [(c.id, c.name, c.arguments) for c in parse_chat_output(text, GEMMA4, new_id=_ids()).tool_calls]
    p = ChatOutputParser(GEMMA4, new_id=_ids())
    by_char = [p.push(ch) for ch in text] + [p.finish()]
    assert _reassemble(by_char) == whole
    for cut in range(0, len(text) + 1, 5):
        p = ChatOutputParser(GEMMA4, new_id=_ids())
        assert _reassemble([p.push(text[:cut]), p.push(text[cut:]), p.finish()]) == whole, cut
    first = [i for i, d in enumerate(by_char) if any(pc.index == 0 for pc in d.pieces)]
    closed = text.index("<tool_call|>")
    assert by_char[first[0]].pieces[0].name and first[0] < closed  # the name before the call closes
    if whole[0][2] != "{}" and "," in whole[0][2]:
        assert len(first) >= 3  # name, then at least one completed member, then the rest at the close


def test_parsed_fields():
    m = parse_chat_output(OUTPUTS[2], GEMMA4, new_id=_ids())
    assert m.content is None and m.reasoning == "Need weather."
    assert [(c.id, c.name, json.loads(c.arguments)) for c in m.tool_calls] == [
        ("call_0", "get_weather", {"city": "Paris, <FR>", "days": 3}),
        ("call_1", "search", {"q": "a:b", "opts": {"exact": True, "n": None, "list": [1, -2500.0, "x"]}}),
    ]
    assert m.tool_calls[1].to_openai(with_index=True)["index"] == 1
    m = parse_chat_output(OUTPUTS[1], GEMMA4)
    assert (m.content, m.reasoning, m.tool_calls) == ("The answer is 4.", "Let me think.", [])
    assert parse_chat_output(OUTPUTS[0], GEMMA4).reasoning is None
    m = parse_chat_output(OUTPUTS[4], GEMMA4)
    assert m.reasoning == "no close, tool call ends it" and m.tool_calls[0].name == "f"
    assert parse_chat_output(OUTPUTS[5], GEMMA4).content == OUTPUTS[5]
    assert parse_chat_output(OUTPUTS[6], GEMMA4).content == OUTPUTS[6]
    assert parse_chat_output(OUTPUTS[8], GEMMA4).content == OUTPUTS[8]
    m = parse_chat_output("<|tool_call>call:f{}<tool_call|>", GEMMA4, parse_tools=False)
    assert m.content == "<|tool_call>call:f{}<tool_call|>" and not m.tool_calls
    m = parse_chat_output("still thinking\n<channel|>done", GEMMA4, in_reasoning=True)
    assert (m.reasoning, m.content) == ("still thinking", "done")


def test_numbers_keep_their_digits():
    _, args = parse_call("call:f{n:12345678901234567890123,e:1e999}", GEMMA4)
    assert args == '{"n": 12345678901234567890123, "e": 1e999}'  # valid JSON, nothing rounded or infinite


def test_native_syntax_round_trip():
    rng = random.Random(0)

    def value(depth=0):
        kind = rng.randrange(7 if depth < 3 else 4)
        if kind == 0:
            return "".join(rng.choice("ab :,{}[]\"'\n\\é<|>") for _ in range(rng.randrange(6)))
        if kind == 1:
            return rng.choice([0, -3, 17, 2.5, -1e-3])
        if kind == 2:
            return rng.choice([True, False])
        if kind == 3:
            return None
        if kind in (4, 5):
            return {rng.choice(["a", "b_1", "key", "x-y"]): value(depth + 1) for _ in range(rng.randrange(3))}
        return [value(depth + 1) for _ in range(rng.randrange(3))]

    for _ in range(300):
        v = value()
        assert parse_native(to_native(v, GEMMA4), GEMMA4) == v
    for bad in ("{a:1", "{a 1}", "[1,,2]", f"{Q}open", "{:1}", "{a:1} x"):
        with pytest.raises(NativeSyntaxError):
            parse_native(bad, GEMMA4)


# -- constrained calls ----------------------------------------------------------------------------------------------
def _factory(tok: Tokenizer, ids: dict[str, int]) -> GuideFactory:
    f = GuideFactory(tok.backend.to_str(), tok.vocab_size, [tok.eos_token_id])
    f.tok  # noqa: B018 - builds the closing alphabet
    marks = [ids[Q], ids["<tool_call|>"], ids["<channel|>"]]
    f.single_chars[:0] = marks  # the closing search may place the format's markers (strings and calls end there)
    f.closers |= set(marks)
    return f


def _walk(f: GuideFactory, c: Constraint, rng: random.Random, steps: int, budget: int = 400) -> list[int]:
    """A random-weights stand-in: uniformly random allowed tokens for `steps` tokens, then the closing search."""
    g, out = f.guide(c), []
    while not g.finished and len(out) < steps:
        forced = g.forced() or [rng.choice(g.allowed().nonzero().flatten().tolist())]
        for t in forced:
            g.consume(t)
            out.append(t)
    if not g.finished:
        path = g.closing_path(budget)
        assert path is not None
        for t in path:
            g.consume(t)
        out += path
    return out


@pytest.mark.parametrize("choice", [ToolChoice("required")] + [ToolChoice("function", n) for n in TOOL_SCHEMAS])
def test_constrained_calls_validate(gemma_tok, choice):
    """Every call a random walk through the grammar writes parses and validates against its tool's schema."""
    tok, ids = gemma_tok
    tg = tool_call_grammar(check_tools(TOOLS), choice, GEMMA4, tok.token_to_id)
    assert tg.trigger is None and tg.warnings == []
    f = _factory(tok, ids)
    c = Constraint("grammar", tg.lark)
    rng = random.Random(1)
    names = set()
    for _ in range(24 if choice.mode == "required" else 8):
        out = _walk(f, c, rng, steps=rng.choice([5, 20, 60]))
        text = tok.decode([t for t in out if t != tok.eos_token_id], skip_special_tokens=False)
        msg = parse_chat_output(text, GEMMA4)
        assert msg.content is None and msg.tool_calls, text
        assert choice.mode == "required" or len(msg.tool_calls) == 1  # a named function is called once
        for call in msg.tool_calls:
            jsonschema.validate(json.loads(call.arguments), TOOL_SCHEMAS[call.name])
            names.add(call.name)
    assert names == {choice.name} if choice.name else len(names) >= 3, names


def test_auto_grammar_is_triggered_by_the_opening_marker(gemma_tok):
    tok, ids = gemma_tok
    tools = check_tools(TOOLS[:2])
    tg = tool_call_grammar(tools, ToolChoice("auto"), GEMMA4, tok.token_to_id, parallel=False)
    assert tg.trigger == ids["<|tool_call>"] and tg.lark.startswith("start: call_")
    f = _factory(tok, ids)
    c = Constraint("grammar", tg.lark)
    rng = random.Random(2)
    for _ in range(8):
        out = _walk(f, c, rng, steps=15)
        text = "<|tool_call>" + tok.decode([t for t in out if t != tok.eos_token_id], skip_special_tokens=False)
        calls = parse_chat_output(text, GEMMA4).tool_calls
        assert len(calls) == 1
        jsonschema.validate(json.loads(calls[0].arguments), TOOL_SCHEMAS[calls[0].name])


def test_required_call_may_think_first(gemma_tok):
    tok, ids = gemma_tok
    tg = tool_call_grammar(check_tools([WEATHER]), ToolChoice("required"), GEMMA4, tok.token_to_id, reasoning=True)
    f = _factory(tok, ids)
    g = f.guide(Constraint("grammar", tg.lark))
    for t in tok.encode('<|channel>thought\nhm<channel|><|tool_call>call:get_weather{city:<|"|>x<|"|>}<tool_call|>'):
        assert g.allowed()[t], tok.decode([t], skip_special_tokens=False)
        g.consume(t)
    assert g.m.is_accepting()


def test_grammar_warnings_and_errors(gemma_tok):
    tok, _ = gemma_tok
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "string", "format": "binary"},
                    "b": {"type": "array", "uniqueItems": True},
                    "c": {"not": {"type": "string"}},
                },
            },
        },
    }
    tg = tool_call_grammar(check_tools([tool]), ToolChoice("required"), GEMMA4, tok.token_to_id)
    assert len(tg.warnings) == 3 and "format 'binary'" in tg.warnings[0]
    bad = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"$ref": "http://x"}}}}}
    with pytest.raises(ConstraintError, match="only local"):
        tool_call_grammar(check_tools([bad]), ToolChoice("required"), GEMMA4, tok.token_to_id)
    with pytest.raises(ConstraintError, match="one token"):
        tool_call_grammar(check_tools([WEATHER]), ToolChoice("required"), GEMMA4, lambda s: None)


def test_unique_enumerated_items_are_enforced_in_calls(gemma_tok):
    """A tool parameter with `uniqueItems` over an enum is spelled out as its unique arrays: no warning, and every
    call a random walk writes has distinct items."""
    tok, ids = gemma_tok
    schema = {
        "type": "object",
        "properties": {
            "roles": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "uniqueItems": True}
        },
        "required": ["roles"],
    }
    tools = check_tools([{"type": "function", "function": {"name": "set_roles", "parameters": schema}}])
    tg = tool_call_grammar(tools, ToolChoice("required"), GEMMA4, tok.token_to_id, parallel=False)
    assert tg.warnings == []
    f, rng, seen = _factory(tok, ids), random.Random(3), set()
    for _ in range(16):
        out = _walk(f, Constraint("grammar", tg.lark), rng, steps=rng.choice([4, 10, 30]))
        text = tok.decode([t for t in out if t != tok.eos_token_id], skip_special_tokens=False)
        args = json.loads(parse_chat_output(text, GEMMA4).tool_calls[0].arguments)
        jsonschema.validate(args, schema)
        seen.add(len(args["roles"]))
    assert len(seen) >= 2, seen  # the walks wrote arrays of several lengths, not only the shortest


def test_one_of_is_warned_about_unless_its_branches_are_exclusive(gemma_tok):
    """`oneOf` becomes alternatives; a value matching two branches is not excluded, so the caller is warned unless
    the branches cannot overlap (distinct types, distinct literal values)."""
    tok, _ = gemma_tok

    def warnings(one_of: list) -> list[str]:
        schema = {"type": "object", "properties": {"x": {"oneOf": one_of}}}
        tools = check_tools([{"type": "function", "function": {"name": "f", "parameters": schema}}])
        return tool_call_grammar(tools, ToolChoice("required"), GEMMA4, tok.token_to_id).warnings

    assert warnings([{"type": "string"}, {"type": "integer"}]) == []
    assert warnings([{"const": "a"}, {"enum": ["b", "c"]}]) == []
    assert "enforced as 'anyOf'" in warnings([{"type": "integer"}, {"type": "number"}])[0]
    assert warnings([{"type": "string"}, {"type": "string", "maxLength": 2}])


def test_patterns_are_narrowed_to_match_from_the_start():
    assert whole_string_regex("^abc$") == "(?:abc)"
    assert whole_string_regex("abc") == "(?:abc)(?s:.)*"  # unanchored: a subset that starts with the match
    assert whole_string_regex("^all|tags$") == "(?:(?:all)(?s:.)*)|(?:(?:tags))"
    assert whole_string_regex("tags$", min_length=True) == "(?s:.)*(?:tags)"  # a prefix may be needed for the length
    assert whole_string_regex(r"^a\\$") == r"(?:a\\)"  # an escaped backslash before '$'
    assert whole_string_regex(r"^a\$") == r"(?:a\$)(?s:.)*"  # '\$' is a literal dollar
    assert whole_string_regex("^(a|b)$") == "(?:(a|b))"
    schema = {"properties": {"pattern": {"type": "string", "pattern": "x"}}, "enum": [{"pattern": "keep"}]}
    assert prepare_schema(schema) == {
        "properties": {"pattern": {"type": "string", "pattern": "^(?:(?:x)(?s:.)*)$"}},
        "enum": [{"pattern": "keep"}],
    }
    re = pytest.importorskip("re")
    for pat, samples in {"[0-9]{2}-x": ["12-x", "12-xyz"], "^all|tags$": ["all", "allx", "tags"]}.items():
        for text in samples:
            assert re.fullmatch(whole_string_regex(pat), text) and re.search(pat, text)
        assert not re.fullmatch(whole_string_regex(pat), "q" + samples[0])  # narrowed: must start with the match


def test_recursive_schema(gemma_tok):
    tok, ids = gemma_tok
    tree = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "maxLength": 3},
            "children": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2},
        },
        "required": ["label"],
    }
    tg = tool_call_grammar(
        check_tools([{"type": "function", "function": {"name": "t", "parameters": tree}}]),
        ToolChoice("required"),
        GEMMA4,
        tok.token_to_id,
        parallel=False,
    )
    f = _factory(tok, ids)
    rng = random.Random(3)
    for _ in range(6):
        out = _walk(f, Constraint("grammar", tg.lark), rng, steps=40)
        text = tok.decode([t for t in out if t != tok.eos_token_id], skip_special_tokens=False)
        call = parse_chat_output(text, GEMMA4).tool_calls[0]
        jsonschema.validate(json.loads(call.arguments), tree)


def test_decoder_keeps_only_the_markers(gemma_tok):
    from dgemma.text.chat import output_decoder

    tok, ids = gemma_tok
    dec = output_decoder(tok, GEMMA4)
    out = tok.encode('<bos>hi<|channel>x<channel|><turn|><|tool_call>call:f{a:<|"|>b<|"|>}<tool_call|><eos>')
    text = "".join(dec.push([t]) for t in out) + dec.flush()
    assert text == 'hi<|channel>x<channel|><|tool_call>call:f{a:<|"|>b<|"|>}<tool_call|>'


def test_openai_shapes_of_parsed_output():
    m = parse_chat_output(OUTPUTS[2], GEMMA4, new_id=_ids())
    msg = m.to_openai()
    assert msg["role"] == "assistant" and msg["content"] is None and msg["reasoning_content"] == "Need weather."
    assert msg["tool_calls"][0] == {
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris, <FR>", "days": 3}'},
    }
    p = ChatOutputParser(GEMMA4, new_id=_ids())
    assert p.push("<|channel>thought\nab").to_openai() == {"reasoning_content": "ab"}
    d = p.push("<channel|>hi<|tool_call>call:f{}<tool_call|>").to_openai()
    assert d == {
        "content": "hi",
        "tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }


def test_prompt_grammar(gemma_tok):
    from dgemma.structured.tool_grammar import prompt_grammar

    tok, ids = gemma_tok
    msgs = [{"role": "user", "content": "x"}]
    assert prompt_grammar(render_chat(tok, msgs), tok.token_to_id) is None
    assert prompt_grammar(render_chat(tok, msgs, [WEATHER], "none"), tok.token_to_id) is None
    assert prompt_grammar(render_chat(tok, msgs, [WEATHER]), tok.token_to_id).trigger == ids["<|tool_call>"]
    g = prompt_grammar(
        render_chat(tok, msgs, [WEATHER], "required", chat_template_kwargs={"enable_thinking": True}), tok.token_to_id
    )
    assert g.trigger is None and f"<[{ids['<|channel>']}]>" in g.lark
