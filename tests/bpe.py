"""Test helper: a tiny byte-level BPE tokenizer trained in-process (no downloads), written as a checkpoint dir."""

from __future__ import annotations

import json
import random
from pathlib import Path

from dgemma.text.build import byte_bpe, save_tokenizer


# Order matters: other tests rely on <pad>=0, <eos>=1, <bos>=2, <start_of_turn>=3, <end_of_turn>=4.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]

_WORDS = (
    "the quick brown fox jumps over lazy dog model user answer question name value true false null "
    "hello world diffusion block token canvas sample step number list object array string key data "
    "city price count item result error status ok yes no please thank you what where when why how "
    "café naïve résumé"
).split()
_KEYS = ("name", "age", "city", "items", "id", "value", "ok", "tags", "score", "price")


def _corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic mix of English-like sentences, JSON-ish objects and digit strings."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
            out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
        elif kind == 1:
            obj = {
                rng.choice(_KEYS): rng.choice(
                    [rng.randint(-999, 99999), rng.choice(_WORDS), True, None, [rng.randint(0, 9) for _ in range(3)]]
                )
                for _ in range(rng.randint(1, 4))
            }
            out.append(json.dumps(obj, separators=rng.choice([(",", ":"), (", ", ": ")])))
        elif kind == 2:
            out.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 8))) for _ in range(rng.randint(2, 8))))
        else:
            out.append(
                f'[{{"{rng.choice(_KEYS)}": "{rng.choice(_WORDS)}"}}, {rng.randint(0, 1000)}] '
                + " ".join(rng.choice(_WORDS) for _ in range(3))
            )
    return out


def build_bpe_tokenizer(dir: Path, vocab_size: int = 300, chat_template: str | None = None) -> Path:
    """Train a byte-level BPE of `vocab_size` tokens and write tokenizer.json + tokenizer_config.json into `dir`.

    Special tokens <pad>, <eos>, <bos>, <start_of_turn>, <end_of_turn> get ids 0..4. Every byte is in the initial
    alphabet, so any UTF-8 text round-trips (multi-byte characters may span several tokens). Returns `dir`.
    """
    tok = byte_bpe(_corpus(), vocab_size, list(SPECIAL_TOKENS))
    extra = {} if chat_template is None else {"chat_template": chat_template}
    return save_tokenizer(tok, dir, 4096, **extra)
