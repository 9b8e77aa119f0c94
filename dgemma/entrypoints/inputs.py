"""One input processor for every entry point: a prompt becomes token ids, its sampling parameters a validated request.

`LLM` (and through it the CLI), the server and reference mode all go through `InputProcessor`:

- prompts: a text prompt is its tokens with the tokenizer's BOS first, once; a conversation is rendered by the
  checkpoint's own chat template (`text.chat.render_chat`: one chat path, the template writes BOS itself) and
  tokenized as it is; `{"prompt_token_ids": [...]}` is taken as sent. A client that asks for special tokens on a
  token-id prompt (the server's `add_special_tokens`) gets BOS when tokenizer_config.json says `add_bos_token`.
- parameters: the text-level fields become token ids (`suffix`), a chat request's tools become its constraint, and
  the engine's `validate` checks everything once against its limits. The `EngineRequest` it returns is what
  `Engine.submit` and reference mode take, unchecked again.

Every error is a ValueError; `error_field` names the field it is about.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Union

from dgemma.engine.params import SamplingParamError, SamplingParams
from dgemma.engine.request import EngineRequest
from dgemma.text.chat import ChatPrompt, render_chat

if TYPE_CHECKING:
    from dgemma.engine.core import Engine
    from dgemma.text.tokenizer import Tokenizer

Prompt = Union[str, list[dict[str, Any]], dict[str, Any]]
# `error_field` of a constraint that did not compile (or cannot: no tokenizer); the server names the request's
# `tools` or `response_format` / `structured_outputs` field instead.
CONSTRAINT = "constraint"
_SENTINEL = "dgemma-end-of-turn-probe"  # an assistant message's content, found again in the rendered text


@dataclass
class PromptInput:
    """A tokenized prompt: its text (None when it was given as token ids) and its token ids."""

    text: str | None
    ids: list[int]


def error_field(e: ValueError) -> str:
    """The field a validation error is about: "prompt", a SamplingParams field, or CONSTRAINT (a ConstraintError
    carries no field: it is always the constraint's)."""
    return getattr(e, "param", None) or CONSTRAINT


def _prompt_token_ids(prompt: dict[str, Any]) -> list[int]:
    if "prompt_token_ids" not in prompt:
        raise ValueError("a dict prompt must have 'prompt_token_ids'")
    ids = prompt["prompt_token_ids"]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError("prompt_token_ids must be a list of integers")
    return list(ids)


class InputProcessor:
    """Prompts and sampling parameters -> requests for one engine. `source` names the checkpoint in errors."""

    def __init__(self, tokenizer: Tokenizer | None, engine: Engine, source: str) -> None:
        self.tokenizer, self.engine, self.source = tokenizer, engine, source

    def _tokenizer(self, need: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.source} has no tokenizer.json: {need}")
        return self.tokenizer

    # -- prompts ----------------------------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt, add_special_tokens: bool = True) -> PromptInput:
        """A string, a chat message list, or {"prompt_token_ids": [...]} -> its text and token ids. A string gets
        the tokenizer's BOS first (unless `add_special_tokens` is false); token ids are taken as sent."""
        if isinstance(prompt, dict):
            return PromptInput(None, _prompt_token_ids(prompt))
        if not isinstance(prompt, (str, list)):
            raise ValueError(f"unsupported prompt type {type(prompt).__name__}")
        tok = self._tokenizer("pass {'prompt_token_ids': [...]} instead of text")
        if isinstance(prompt, list):
            chat = self.render_chat(prompt)
            return PromptInput(chat.text, self.chat_ids(chat))
        ids = tok.encode(prompt)
        return PromptInput(prompt, self._bos(ids, add_special_tokens) + ids)

    def _bos(self, ids: list[int], wanted: bool) -> list[int]:
        """[BOS] when it is wanted and `ids` does not start with it; else []."""
        bos = self.tokenizer.bos_token_id if self.tokenizer is not None and wanted else None
        return [bos] if bos is not None and (not ids or ids[0] != bos) else []

    def bos_for_ids(self, ids: list[int]) -> list[int]:
        """The BOS to put before a token-id prompt whose client asked for special tokens: [BOS] when the
        checkpoint's tokenizer_config.json says `add_bos_token: true` (its prompts start with BOS, as text prompts
        here do) and `ids` is not empty, else []."""
        adds = self.tokenizer is not None and self.tokenizer.config.get("add_bos_token") is True
        return self._bos(ids, adds) if ids else []

    def render_chat(
        self,
        messages: Any,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Any = None,
        add_generation_prompt: bool = True,
    ) -> ChatPrompt:
        """A conversation rendered by the checkpoint's chat template, with its tools and template kwargs
        (text.chat.render_chat: ChatRequestError naming the field for a malformed request)."""
        tok = self._tokenizer("chat needs one")
        return render_chat(
            tok, messages, tools, tool_choice, parallel_tool_calls, chat_template_kwargs, add_generation_prompt
        )

    def chat_ids(self, prompt: ChatPrompt, add_special_tokens: bool = False) -> list[int]:
        """A rendered conversation's token ids: the template wrote BOS; `add_special_tokens` also runs the
        tokenizer's post-processor."""
        return self._tokenizer("chat needs one").encode(prompt.text, add_special_tokens=add_special_tokens)

    def end_of_turn_ids(self) -> list[int]:
        """The token the chat template ends an assistant turn with (e.g. Gemma's <end_of_turn>), as a stop token:
        the first token after an assistant message's content, when it is a special token. [] when the template
        writes none (or there is no tokenizer)."""
        tok = self.tokenizer
        if tok is None:
            return []
        msgs = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=False)
        except ValueError:  # a template that cannot render this conversation marks no end of turn
            return []
        after = text.partition(_SENTINEL)[2]
        ids = tok.encode(after) if after else []
        special = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
        return ids[:1] if ids and ids[0] in special and ids[0] < self.engine.vocab_size else []

    # -- parameters -------------------------------------------------------------------------------------------------
    def params(self, params: SamplingParams | None, chat: ChatPrompt | None = None) -> SamplingParams:
        """`params` with its text-level fields as token ids (`suffix`) and the tool-call constraint `chat` asks for
        (none without tools); not yet validated."""
        from dgemma.structured.tool_grammar import prompt_grammar

        sp = params or SamplingParams()
        if isinstance(sp.suffix, str) and sp.suffix:
            if self.tokenizer is None:
                why = f"{self.source} has no tokenizer.json (pass suffix_token_ids)"
                raise SamplingParamError("suffix", sp.suffix, why)
            sp = replace(sp, suffix_token_ids=self.tokenizer.encode(sp.suffix))
        grammar = prompt_grammar(chat, self.tokenizer.token_to_id) if chat is not None else None
        return sp if grammar is None else replace(sp, tool_constraint=grammar.constraint())

    def request(
        self, prompt_ids: list[int], params: SamplingParams | None, chat: ChatPrompt | None = None
    ) -> EngineRequest:
        """The request's one validation: `params` above, then the engine's checks against its limits (prompt ids,
        parameters, context budget, constraint compiled). Raises ValueError; `error_field` names the field."""
        return self.engine.validate(prompt_ids, self.params(params, chat))


__all__ = ["CONSTRAINT", "InputProcessor", "Prompt", "PromptInput", "error_field"]
