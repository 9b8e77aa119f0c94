"""Tokenizer, chat templates and streaming detokenization for HF-format checkpoint directories.

This is a thin wrapper over the Rust `tokenizers` library: `tokenizer.json` carries the whole pipeline
(normalizer, pre-tokenizer, model, decoder), `tokenizer_config.json` names the special tokens and may carry the
chat template, and `chat_template.jinja` (newer checkpoints) overrides the latter. We deliberately do not depend
on `transformers` at runtime.

Chat templates are rendered in jinja2's `ImmutableSandboxedEnvironment`: a template comes with the checkpoint, so
it is untrusted code, and the sandbox refuses attribute access such as `''.__class__.__mro__`.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as _RustTokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_COPIED_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE, SPECIAL_TOKENS_MAP)

REPLACEMENT_CHAR = "\ufffd"

logger = logging.getLogger(__name__)
# transformers' tokenizer classes that rebuild their post-processor from tokenizer_config.json's `add_bos_token`;
# every other class (PreTrainedTokenizerFast, ...) takes the post-processor of tokenizer.json as it is.
BOS_FLAG_CLASSES = frozenset(
    {"GemmaTokenizer", "GemmaTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizerFast"}
)
_bos_warned: set[str] = set()

# Used when a checkpoint ships no chat template. Gemma turn format:
#   {bos}<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n{content}<end_of_turn>\n
# with the role "assistant" written as "model" (Gemma's name for it) and every other role written as-is, and
# "<start_of_turn>model\n" appended as the generation prompt. `bos_token` is "" when the tokenizer has none.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer file is unreadable/invalid, a chat template fails, or chat messages are malformed."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read as JSON: {e}") from e


def _token_content(value: Any, source: Path | str, key: str) -> str | None:
    """A special token in tokenizer_config.json is either a string or an AddedToken dict with "content"."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{source}: {key!r} must be a string or a dict with a string 'content', got {value!r}")


def _select_template(value: Any, source: Path) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} dicts from which we take "default"."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named: dict[str, str] = {}
        for item in value:
            if not (
                isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)
            ):
                raise TokenizerError(
                    f"{source}: 'chat_template' list entries must be {{'name': str, 'template': str}}, got {item!r}"
                )
            named[item["name"]] = item["template"]
        if "default" not in named:
            raise TokenizerError(
                f"{source}: 'chat_template' list has no template named 'default' (have {sorted(named)})"
            )
        return named["default"]
    raise TokenizerError(
        f"{source}: 'chat_template' must be a string or a list of named templates, got {type(value).__name__}"
    )


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot format (e.g. roles not alternating).
    raise TokenizerError(f"chat template error: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's builtin `tojson` HTML-escapes <, >, & and '; chat templates want plain JSON (as in transformers).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    # Some templates (e.g. Llama 3) print today's date; transformers exposes this helper, so do we.
    return datetime.now().strftime(fmt)


class _StrictSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute access fails at once.

    Stock jinja2 returns an Undefined for e.g. `messages.__class__`, which prints as "" and only raises when used
    further; we raise SecurityError immediately so a probing template fails loudly instead of half-rendering.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe."
        )


def _make_env() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the OpenAI-style message list and flatten list-of-text-parts content into one string.

    Text parts are joined with "\\n" (as vLLM does). Keys other than role/content are passed through unchanged so
    templates can use them (e.g. "name", "tool_calls").
    """
    if not isinstance(messages, list):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise TokenizerError(f"messages[{i}] must be a dict, got {type(msg).__name__}")
        role = msg.get("role")
        if not isinstance(role, str):
            raise TokenizerError(f"messages[{i}]['role'] must be a string, got {role!r}")
        if "content" not in msg:
            raise TokenizerError(f"messages[{i}] has no 'content'")
        content = msg["content"]
        if isinstance(content, list):
            texts: list[str] = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise TokenizerError(
                        f"messages[{i}]['content'][{j}] must be {{'type': 'text', 'text': str}}, got {part!r}"
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise TokenizerError(
                f"messages[{i}]['content'] must be a string or a list of text parts, got {type(content).__name__}"
            )
        out.append({**msg, "role": role, "content": content})
    return out


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, special-token ids and chat-template rendering."""

    def __init__(
        self,
        tokenizer: _RustTokenizer,
        config: dict[str, Any] | None = None,
        chat_template: str | None = None,
        source_dir: str | Path | None = None,
    ) -> None:
        self._tok = tokenizer
        self.config: dict[str, Any] = dict(config or {})
        # None means "no template shipped": apply_chat_template then uses DEFAULT_CHAT_TEMPLATE.
        self.chat_template: str | None = chat_template
        self.source_dir: Path | None = Path(source_dir) if source_dir is not None else None
        src = self.source_dir / TOKENIZER_CONFIG if self.source_dir is not None else TOKENIZER_CONFIG
        self.bos_token: str | None = _token_content(self.config.get("bos_token"), src, "bos_token")
        self.eos_token: str | None = _token_content(self.config.get("eos_token"), src, "eos_token")
        self.pad_token: str | None = _token_content(self.config.get("pad_token"), src, "pad_token")
        self._compiled: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """Load from a checkpoint directory; None when it has no tokenizer.json.

        Raises TokenizerError naming the offending file when tokenizer.json, tokenizer_config.json or
        chat_template.jinja cannot be parsed.
        """
        path = Path(path)
        tok_file = path / TOKENIZER_JSON
        if not tok_file.is_file():
            return None
        try:
            rust = _RustTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust binding raises a bare Exception on malformed files
            raise TokenizerError(f"{tok_file}: invalid tokenizer file: {e}") from e

        config: dict[str, Any] = {}
        # special_tokens_map.json is the older place for bos/eos/pad; tokenizer_config.json wins where both exist.
        stm_file = path / SPECIAL_TOKENS_MAP
        if stm_file.is_file():
            stm = _read_json(stm_file)
            if not isinstance(stm, dict):
                raise TokenizerError(f"{stm_file}: expected a JSON object, got {type(stm).__name__}")
            config.update({k: v for k, v in stm.items() if k in ("bos_token", "eos_token", "pad_token")})
        cfg_file = path / TOKENIZER_CONFIG
        template: str | None = None
        if cfg_file.is_file():
            cfg = _read_json(cfg_file)
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
            config.update(cfg)
            template = _select_template(cfg.get("chat_template"), cfg_file)
            for key in ("bos_token", "eos_token", "pad_token"):  # validate here so the error names the file
                _token_content(cfg.get(key), cfg_file, key)
        tpl_file = path / CHAT_TEMPLATE_FILE
        if tpl_file.is_file():
            try:
                template = tpl_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{tpl_file}: cannot read chat template: {e}") from e
        tok = cls(rust, config, template, source_dir=path)
        tok.check_bos_policy()
        return tok

    def transformers_adds_bos(self) -> bool:
        """Whether transformers' AutoTokenizer on this checkpoint puts BOS first when encoding text with its
        special tokens (its default): `add_bos_token` for the classes that read it, else tokenizer.json's
        post-processor."""
        if self.config.get("tokenizer_class") in BOS_FLAG_CLASSES and "add_bos_token" in self.config:
            return bool(self.config["add_bos_token"])
        ids = self._tok.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id

    def check_bos_policy(self) -> None:
        """Warn (once per checkpoint) when transformers would tokenize a text prompt without the BOS dgemma puts
        first (or with one dgemma does not): ids a client tokenizes itself would then differ from dgemma's."""
        ours = self.bos_token_id is not None
        theirs = self.transformers_adds_bos()
        key = str(self.source_dir)
        if ours == theirs or key in _bos_warned:
            return
        _bos_warned.add(key)
        fix = (
            "add a TemplateProcessing post-processor that puts BOS first to tokenizer.json (and add_bos_token: true "
            "to tokenizer_config.json)"
            if ours
            else "make tokenizer.json's post-processor and add_bos_token agree that there is no BOS"
        )
        logger.warning(
            "%s: dgemma puts %s before a text prompt but transformers' AutoTokenizer %s: clients that tokenize "
            "prompts themselves (e.g. lm-evaluation-harness) would send other ids; %s",
            key,
            self.bos_token or "no BOS",
            "adds no BOS" if ours else "adds one",
            fix,
        )

    # -- encoding -------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for `text`. Special tokens written literally in the text (e.g. "<eos>") are recognised.

        `add_special_tokens` only controls the tokenizer.json post-processor (e.g. a BOS prepended); chat templates
        usually include BOS themselves, hence the default False.
        """
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`; invalid/incomplete UTF-8 byte sequences come out as U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def _special_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id(self.pad_token)

    @property
    def backend(self) -> _RustTokenizer:
        """The underlying `tokenizers.Tokenizer` (for callers needing e.g. offsets)."""
        return self._tok

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat templates -------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def _template(self) -> jinja2.Template:
        # Compiled lazily: a template using syntax we cannot handle should not stop plain-text generation.
        if self._compiled is None:
            source = self.chat_template if self.chat_template is not None else DEFAULT_CHAT_TEMPLATE
            try:
                self._compiled = _make_env().from_string(source)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"invalid chat template: {e}") from e
        return self._compiled

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_vars: Any
    ) -> str:
        """Render `messages` ([{"role": str, "content": str | [{"type": "text", "text": str}, ...]}]) to a prompt.

        Uses the checkpoint's template (chat_template.jinja, else tokenizer_config.json's chat_template), or
        DEFAULT_CHAT_TEMPLATE (Gemma turns) when it has none. Extra keyword arguments (e.g. `tools`) become
        template variables. Raises TokenizerError for malformed messages or any template failure, including the
        sandbox refusing unsafe code.
        """
        msgs = _normalize_messages(messages)
        template = self._template()
        context = {
            **template_vars,
            "messages": msgs,
            "add_generation_prompt": bool(add_generation_prompt),
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
        }
        try:
            return template.render(**context)
        except TokenizerError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise TokenizerError(f"chat template attempted an unsafe operation: {e}") from e
        except Exception as e:  # template code is arbitrary: any failure is the template's (or the input's) fault
            raise TokenizerError(f"chat template rendering failed: {type(e).__name__}: {e}") from e

    # -- saving ---------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and (if any) chat_template.jinja into directory `path`.

        Files are copied byte-for-byte from the directory we were loaded from; a tokenizer built in memory is
        serialised instead.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.source_dir is not None and (self.source_dir / TOKENIZER_JSON).is_file():
            for name in _COPIED_FILES:
                src = self.source_dir / name
                if src.is_file() and src.resolve() != (path / name).resolve():
                    shutil.copyfile(src, path / name)
            return path
        self._tok.save(str(path / TOKENIZER_JSON))
        (path / TOKENIZER_CONFIG).write_text(
            json.dumps(self.config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        # A template kept in the config is already saved above; otherwise give it its own file.
        if self.chat_template is not None and self.config.get("chat_template") is None:
            (path / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
        return path


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text deltas, in time linear in the stream's length.

    Decoding tokens one at a time is wrong for byte-level and SentencePiece vocabularies: a multi-byte character
    can span several tokens, and some decoders strip or add a leading space depending on context. As in vLLM/TGI,
    we decode a window `ids[prefix_offset:]` and subtract the text of `ids[prefix_offset:read_offset]` (the
    already-emitted part of the same window). A trailing U+FFFD (an incomplete UTF-8 sequence that later bytes may
    complete) is held back, while the complete text before it is emitted at once. The concatenation of all `push`
    results plus `flush()` equals `tokenizer.decode(all_ids)`. `tokenizer` needs only `decode(ids,
    skip_special_tokens=...)`.

    A character spans at most 4 bytes, so a U+FFFD still trailing after `MAX_HELD` tokens is invalid bytes (a model
    emitting garbage), not a character in progress: it is emitted, so the window and each step's cost stay bounded.
    """

    MAX_HELD = 16

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # ids before this have been emitted as text
        self.early = 0  # characters after the window's prefix already emitted (complete text before a partial one)

    def _window_texts(self) -> tuple[str, str]:
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens)
        full = dec(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        return prefix, full

    def _step(self) -> str:
        prefix, full = self._window_texts()
        start = len(prefix) + self.early
        held = len(self.ids) - self.read_offset
        if full.endswith(REPLACEMENT_CHAR) and held <= self.MAX_HELD:  # emit what is complete, keep the partial char
            delta = full.rstrip(REPLACEMENT_CHAR)[start:]
            self.early += len(delta)
            return delta
        if len(full) > len(prefix):
            # Slide the window: the new prefix is what we just emitted, so context (spaces) stays correct.
            self.prefix_offset, self.read_offset, self.early = self.read_offset, len(self.ids), 0
            return full[start:]
        return ""

    def push(self, ids: Iterable[int]) -> str:
        """Append `ids`; return the text they complete (an incomplete trailing character is held back)."""
        out: list[str] = []
        # One step per token so that complete text before a trailing partial character is not held back.
        for i in ids:
            self.ids.append(int(i))
            out.append(self._step())
        return "".join(out)

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character comes out as U+FFFD) and end the window."""
        prefix, full = self._window_texts()
        delta = full[len(prefix) + self.early :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.early = 0
        return delta


__all__ = ["Tokenizer", "TokenizerError", "IncrementalDecoder", "DEFAULT_CHAT_TEMPLATE"]
