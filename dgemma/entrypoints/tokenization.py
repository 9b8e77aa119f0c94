"""POST /tokenize and POST /detokenize, as vLLM has them: the token ids the server would give a prompt (text or
chat messages), and the text of token ids. They use the tokenizer only, never the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dgemma.entrypoints.errors import APIError, json_response
from dgemma.entrypoints.request_io import parse_request, read_json

if TYPE_CHECKING:
    from dgemma.entrypoints.serving import ServerState


def _tokenizer(srv: ServerState) -> Any:
    if srv.llm.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: /tokenize and /detokenize are unavailable")
    return srv.llm.tokenizer


def _ids(srv: ServerState, req: Any) -> list[int]:
    """The prompt's token ids, as the completion or chat endpoint would make them."""
    _tokenizer(srv)  # the error when there is none
    if hasattr(req, "messages"):
        return srv.encode_chat(srv.render_chat(req), req.add_special_tokens)
    return srv.encode_completion_prompt(req.prompt, req.add_special_tokens)


async def tokenize(request: Any) -> Any:
    from dgemma.entrypoints import protocol as P

    srv: ServerState = request.app.state.dgemma
    body = await read_json(request, srv.max_body_bytes)
    cls = P.TokenizeChatRequest if "messages" in body else P.TokenizeCompletionRequest
    req = parse_request(cls, body, srv.model_name)
    ids = _ids(srv, req)
    strs = [_tokenizer(srv).id_to_token(t) or "" for t in ids] if req.return_token_strs else None
    return json_response(P.tokenize_response(ids, srv.llm.engine.max_model_len, strs))


async def detokenize(request: Any) -> Any:
    from dgemma.entrypoints import protocol as P

    srv: ServerState = request.app.state.dgemma
    req = parse_request(P.DetokenizeRequest, await read_json(request, srv.max_body_bytes), srv.model_name)
    vocab = srv.llm.engine.vocab_size
    if not all(0 <= t < vocab for t in req.tokens):
        raise APIError(400, f"tokens must be integers in [0, {vocab})", param="tokens")
    text = _tokenizer(srv).decode(req.tokens, skip_special_tokens=False)  # as vLLM: special tokens kept
    return json_response({"prompt": text})


__all__ = ["detokenize", "tokenize"]
