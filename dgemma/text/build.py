"""Small tokenizers built from scratch for the task models and the tests: a byte-level BPE trained on texts, and the
HF files (tokenizer.json + tokenizer_config.json) that `Tokenizer` and transformers' `AutoTokenizer` read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable


def byte_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Any:
    """A byte-level BPE of `vocab_size` tokens trained on `texts`; the special tokens get the first ids, in order.
    Every byte is in the initial alphabet, so any UTF-8 text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Any, out_dir: str | Path, model_max_length: int, **config: Any) -> Path:
    """Write `tok` as tokenizer.json and a tokenizer_config.json naming <bos>, <eos> and <pad> (plus `config`) into
    `out_dir` (created if needed); returns the directory."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "model_max_length": model_max_length,
        **config,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return d
