"""Log-probabilities of tokens: what they are in each mode, how they are computed, and their OpenAI shapes.

Definitions (natural logs; never after top-k/top-p or a grammar mask, so the numbers describe the model):

- AR mode (`mode="ar"`): token t's log-probability under the encoder's raw next-token distribution at position
  t-1, `log_softmax(logits)` of the causal pass that chose it (no temperature, as vLLM reports by default).
- Diffusion mode: a committed token's log-probability under the distribution the sampler used at the **last
  denoising step of its canvas** (the step whose argmax canvas was committed), **temperature applied**: the
  schedule's temperature at that step (t_min plus a step's share of t_max - t_min). That distribution is what
  decided the token, and the engine has it at hand without keeping a copy of the raw logits. A canvas is decided
  jointly (every position sees every other through bidirectional attention and self-conditioning), so this is the
  model's confidence in each token given the final draft of the whole canvas, not a left-to-right factorisation:
  the values do not sum to the log-probability of the sequence.
- Prompt tokens (`echo` with `logprobs` on /v1/completions): one causal encoder pass over the prompt; token t's
  log-probability under the distribution at position t-1 (the first token has none). This is what
  lm-evaluation-harness's log-likelihood tasks read.

The model is the caller's; this module only reads logits (`prompt_logprobs` runs the encoder pass itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs (chat) and logprobs (completions: 5 there; vLLM allows 20)
PROMPT_CHUNK = 256  # positions per LM-head call when scoring a prompt: (chunk, V) float32 stays small


@dataclass
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its position (id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def from_logits(logits: torch.Tensor, tokens: Sequence[int] | torch.Tensor, top_k: int = 0) -> list[TokenLogprob]:
    """Log-probabilities of `tokens` (N,) under the distributions `logits` (N, V), each with its top `top_k`."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    ids = torch.as_tensor(tokens, dtype=torch.long, device=lp.device).reshape(-1, 1)
    chosen = lp.gather(-1, ids).squeeze(-1).tolist()
    if top_k > 0:
        vals, idx = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, c, top) for t, c, top in zip(ids.flatten().tolist(), chosen, tops)]


@torch.no_grad()
def prompt_logprobs(
    model: Any, token_ids: Sequence[int], top_k: int = 0, chunk: int = PROMPT_CHUNK
) -> list[TokenLogprob | None]:
    """Log-probabilities of a prompt's tokens from one causal encoder pass of `model` (a DiffusionGemma) in a
    fresh cache: entry t scores token t given tokens < t; entry 0 is None. The LM head runs `chunk` positions at
    a time, so a long prompt never materialises (T, V) logits."""
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=model.device)  # (1, T)
    n = ids.shape[1]
    if n == 0:
        return []
    hidden = model.encode(ids, model.new_cache(1, n))  # (1, T, hidden)
    out: list[TokenLogprob | None] = [None]
    for a in range(0, n - 1, chunk):
        b = min(a + chunk, n - 1)
        out.extend(from_logits(model.logits(hidden[0, a:b]), ids[0, a + 1 : b + 1], top_k))
    return out


def _entry(token_text: Callable[[int], str], tid: int, logprob: float) -> dict[str, Any]:
    text = token_text(tid)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, Any]:
    """The chat completion shape: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}."""
    return {
        "content": [
            {
                **_entry(token_text, e.token_id, e.logprob),
                "top_logprobs": [_entry(token_text, t, lp) for t, lp in e.top],
            }
            for e in entries
        ]
    }


def completion_logprobs(
    entries: Sequence[TokenLogprob | None], token_ids: Sequence[int], token_text: Callable[[int], str], offset: int = 0
) -> dict[str, Any]:
    """The legacy completions shape: parallel lists `tokens`, `token_logprobs`, `top_logprobs` ({text: logprob},
    None for a token without a distribution, i.e. the first prompt token) and `text_offset` (characters from the
    start of the returned text, counting from `offset`)."""
    texts = [token_text(t) for t in token_ids]
    offsets, at = [], offset
    for s in texts:
        offsets.append(at)
        at += len(s)
    return {
        "tokens": texts,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else {token_text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


__all__ = ["MAX_TOP_LOGPROBS", "TokenLogprob", "chat_logprobs", "completion_logprobs", "from_logits", "prompt_logprobs"]
