"""Tests for dgemma.text.tokenizer against a tiny in-process byte-level BPE (tests/bpe.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from dgemma.text.tokenizer import DEFAULT_CHAT_TEMPLATE, IncrementalDecoder, Tokenizer, TokenizerError

from bpe import build_bpe_tokenizer

TEXTS = [
    "Hello world, the quick brown fox.",
    '{"name": "café", "items": [1, 2, 3], "ok": true}',
    "naïve résumé — Ünïcödé ß ø 中文字符 日本語",
    "emoji: 😀🎉👍🏽 and flags 🇫🇷 zwj 👩‍💻",
    "  leading and trailing spaces  \n\ttabs\n",
    "",
]

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bpe_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    t = Tokenizer.from_dir(tok_dir)
    assert t is not None
    return t


def _with_config(tmp_path: Path, src: Path, **cfg_update) -> Path:
    """Copy the tokenizer in `src` to tmp_path with tokenizer_config.json keys updated."""
    (tmp_path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.update(cfg_update)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


# -- encode / decode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens(tok: Tokenizer) -> None:
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.token_to_id("<start_of_turn>") == 3 and tok.token_to_id("<end_of_turn>") == 4
    assert tok.id_to_token(1) == "<eos>"
    assert tok.token_to_id("<definitely-not-a-token>") is None
    assert tok.id_to_token(10**6) is None
    assert tok.vocab_size == 300
    # Literal special tokens in text map to their ids; decode skips them unless asked not to.
    ids = tok.encode("<bos>hi<eos>")
    assert ids[0] == 2 and ids[-1] == 1
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>hi<eos>"


def test_special_tokens_as_dicts_and_absent(tmp_path: Path, tok_dir: Path) -> None:
    d = _with_config(tmp_path, tok_dir, bos_token={"content": "<bos>", "lstrip": False}, eos_token=None)
    del_cfg = json.loads((d / "tokenizer_config.json").read_text())
    del del_cfg["pad_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(del_cfg))
    t = Tokenizer.from_dir(d)
    assert t is not None
    assert t.bos_token_id == 2 and t.eos_token_id is None and t.pad_token_id is None


def test_matches_transformers_oracle(tok: Tokenizer, tok_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    for text in TEXTS + ["<start_of_turn>user\nhi<end_of_turn>"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), text


# -- loading errors -----------------------------------------------------------------------------------------


def test_from_dir_without_tokenizer_returns_none(tmp_path: Path) -> None:
    assert Tokenizer.from_dir(tmp_path) is None
    assert Tokenizer.from_dir(tmp_path / "missing") is None


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{ this is not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"valid": "json but not a tokenizer"}')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_config(tmp_path: Path, tok_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    cfg = tmp_path / "tokenizer_config.json"
    for bad in [
        "{not json",
        "[1, 2]",
        json.dumps({"chat_template": 5}),
        json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}),
        json.dumps({"eos_token": 7}),
    ]:
        cfg.write_text(bad)
        with pytest.raises(TokenizerError, match="tokenizer_config.json"):
            Tokenizer.from_dir(tmp_path)


def test_tokenizer_error_is_value_error() -> None:
    assert issubclass(TokenizerError, ValueError)


# -- chat templates -----------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


def test_template_from_tokenizer_config(tmp_path: Path) -> None:
    t = Tokenizer.from_dir(build_bpe_tokenizer(tmp_path, chat_template=TEMPLATE))
    assert t is not None and t.has_chat_template
    with_prompt = t.apply_chat_template(MESSAGES)
    assert with_prompt == (
        "<bos>[system]Be brief.<eos>\n[user]Hi<eos>\n[assistant]Hello<eos>\n[user]Bye<eos>\n[assistant]"
    )
    without = t.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert without == with_prompt[: -len("[assistant]")]


def test_template_named_list_takes_default(tmp_path: Path, tok_dir: Path) -> None:
    d = _with_config(
        tmp_path,
        tok_dir,
        chat_template=[
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT {{ messages|length }}"},
        ],
    )
    t = Tokenizer.from_dir(d)
    assert t is not None and t.apply_chat_template(MESSAGES) == "DEFAULT 4"


def test_template_from_jinja_file_overrides_config(tmp_path: Path) -> None:
    d = build_bpe_tokenizer(tmp_path, chat_template="from config")
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}\n"
        "<{{ m.role }}>{{ m.content }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "<model>\n"
        "{% endif %}\n"
    )
    t = Tokenizer.from_dir(d)
    assert t is not None
    # trim_blocks/lstrip_blocks: the block tags' own lines leave no blank lines behind.
    assert t.apply_chat_template(MESSAGES[1:3]) == "<user>Hi\n<assistant>Hello\n<model>\n"
    assert t.apply_chat_template(MESSAGES[1:3], add_generation_prompt=False) == "<user>Hi\n<assistant>Hello\n"


def test_default_template_when_none(tok: Tokenizer) -> None:
    assert not tok.has_chat_template
    out = tok.apply_chat_template(MESSAGES[1:3])
    assert out == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>model\n"
    )
    assert (
        tok.apply_chat_template(MESSAGES[1:2], add_generation_prompt=False)
        == "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    )
    # The turn markers are single special tokens in the encoded prompt.
    ids = tok.encode(out)
    assert ids[:2] == [2, 3] and ids.count(3) == 3 and ids.count(4) == 2
    assert "start_of_turn" in DEFAULT_CHAT_TEMPLATE


def test_content_parts_joined(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<bos><start_of_turn>user\na\nb<end_of_turn>\n"


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": 3, "content": "hi"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        ["user: hi"],
    ],
)
def test_bad_messages(tok: Tokenizer, messages) -> None:
    with pytest.raises(TokenizerError):
        tok.apply_chat_template(messages)


def test_raise_exception_and_tojson(tmp_path: Path, tok_dir: Path) -> None:
    tpl = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{{ messages | tojson }}|{{ {'k': '<&>é'} | tojson }}"
    )
    t = Tokenizer.from_dir(_with_config(tmp_path, tok_dir, chat_template=tpl))
    assert t is not None
    with pytest.raises(TokenizerError, match="first must be user"):
        t.apply_chat_template(MESSAGES)
    out = t.apply_chat_template(MESSAGES[1:2])
    rendered, obj = out.split("|")
    assert json.loads(rendered) == [{"role": "user", "content": "Hi"}]
    assert obj == '{"k": "<&>é"}'  # plain JSON, not HTML-escaped


@pytest.mark.parametrize(
    "tpl",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{% set x = messages.append(1) %}{{ x }}",  # immutable sandbox: no mutating builtins
    ],
)
def test_hostile_template_is_refused(tmp_path: Path, tok_dir: Path, tpl: str) -> None:
    t = Tokenizer.from_dir(_with_config(tmp_path, tok_dir, chat_template=tpl))
    assert t is not None
    with pytest.raises(TokenizerError, match="unsafe") as info:
        t.apply_chat_template(MESSAGES)
    assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)


def test_template_syntax_error(tmp_path: Path, tok_dir: Path) -> None:
    t = Tokenizer.from_dir(_with_config(tmp_path, tok_dir, chat_template="{% for %}"))
    assert t is not None  # loading still works: plain generation needs no template
    assert t.decode(t.encode("ok")) == "ok"
    with pytest.raises(TokenizerError, match="chat template"):
        t.apply_chat_template(MESSAGES)


# -- incremental decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS + ["<bos>x 😀<eos> y"])
def test_incremental_decoder_token_by_token(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    for skip in (True, False):
        dec = IncrementalDecoder(tok, skip_special_tokens=skip)
        pieces = [dec.push([i]) for i in ids]
        pieces.append(dec.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_holds_back_partial_characters(tok: Tokenizer) -> None:
    ids = tok.encode("a😀")
    assert len(ids) >= 3  # the emoji's 4 bytes span several tokens in this tiny vocab
    dec = tok.incremental_decoder()
    assert dec.push(ids[:1]) == "a"
    for i in ids[1:-1]:
        assert dec.push([i]) == ""  # incomplete UTF-8: held back rather than emitted as U+FFFD
    assert dec.push(ids[-1:]) == "😀"
    assert dec.flush() == ""


def test_incremental_decoder_chunks_and_flush(tok: Tokenizer) -> None:
    text = TEXTS[2] + TEXTS[3]
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    out = "".join(dec.push(ids[k : k + 3]) for k in range(0, len(ids), 3)) + dec.flush()
    assert out == text
    # A stream cut mid-character: flush surrenders the partial bytes as U+FFFD, like a one-shot decode.
    partial = tok.encode("é😀")[:-1]
    dec = IncrementalDecoder(tok)
    assert dec.push(partial) + dec.flush() == tok.decode(partial)
    assert tok.decode(partial).endswith("\ufffd")


# -- save ---------------------------------------------------------------------------------------------------


def test_save_round_trip(tmp_path: Path) -> None:
    src = build_bpe_tokenizer(tmp_path / "src", chat_template=TEMPLATE)
    (src / "chat_template.jinja").write_text("J{{ messages|length }}")
    t = Tokenizer.from_dir(src)
    assert t is not None
    out = t.save(tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    t2 = Tokenizer.from_dir(out)
    assert t2 is not None
    assert t2.encode(TEXTS[1]) == t.encode(TEXTS[1])
    assert t2.apply_chat_template(MESSAGES) == "J4"
    t.save(src)  # saving onto its own directory is a no-op, not an error
