"""Which rows and columns of each weight a rank keeps (the shard plan), and whether a model splits N ways.

- Attention: rank r keeps query heads [r*h, (r+1)*h), h = heads / N (q_proj's rows, o_proj's columns), and the KV
  heads those queries read: a share of them when every rank holds whole KV groups, else the one KV head its queries
  share, the same head on several ranks (the full layers have fewer KV heads than a large N).
- Dense MLP (and the self-conditioning MLP): a slice of the intermediate width (gate/up rows, down columns).
- Experts: a contiguous range of whole experts per rank (expert parallelism); the router is replicated.
- Embedding and the tied LM head: a contiguous range of vocabulary rows per rank.
- Everything else (norms, router, layer scalars) is replicated.

Ranges are as even as can be: the first `total % N` ranks hold one more (a vocabulary of 129 splits 65 + 64).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from dgemma.model.config import TextConfig


class ShardError(ValueError):
    """A model that cannot be split the way asked; the message is one line that says why."""


def span(total: int, world: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s share [start, end) of `total` items split `world` ways, the first `total % world` one larger."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def spans(total: int, world: int) -> list[tuple[int, int]]:
    return [span(total, world, r) for r in range(world)]


def check(text: TextConfig, world: int) -> None:
    """ShardError (one line) unless the model splits `world` ways."""
    if world < 1:
        raise ShardError(f"tensor_parallel_size must be >= 1, got {world}")
    heads = text.num_attention_heads
    if heads % world:
        raise ShardError(f"tensor_parallel_size {world} does not divide the model's {heads} attention heads")
    h = heads // world
    for kv in sorted({text.layer_kv_heads(i) for i in range(text.num_hidden_layers)}):
        group = heads // kv
        if h % group and group % h:
            raise ShardError(
                f"tensor_parallel_size {world}: {h} query heads per rank neither hold whole groups of {group} "
                f"(one per KV head of {kv}) nor fit inside one"
            )
    for name, total in (
        ("experts", text.num_experts),
        ("intermediate size", text.intermediate_size),
        ("vocabulary", text.vocab_size),
    ):
        if total < world:
            raise ShardError(f"tensor_parallel_size {world} exceeds the model's {total} {name}")


@dataclass(frozen=True)
class Plan:
    """Rank `rank`'s share of a model split `world` ways."""

    text: TextConfig
    rank: int
    world: int

    def __post_init__(self) -> None:
        check(self.text, self.world)

    @property
    def q_heads(self) -> tuple[int, int]:
        h = self.text.num_attention_heads // self.world
        return self.rank * h, (self.rank + 1) * h

    def kv_heads(self, layer: int) -> tuple[int, int]:
        """The KV heads [start, end) this rank's query heads read on `layer`."""
        t = self.text
        group = t.num_attention_heads // t.layer_kv_heads(layer)
        q0, q1 = self.q_heads
        return q0 // group, (q1 - 1) // group + 1

    @property
    def vocab(self) -> tuple[int, int]:
        return span(self.text.vocab_size, self.world, self.rank)

    @property
    def vocab_sizes(self) -> list[int]:
        return [b - a for a, b in spans(self.text.vocab_size, self.world)]

    @property
    def experts(self) -> tuple[int, int]:
        return span(self.text.num_experts, self.world, self.rank)

    @property
    def dense(self) -> tuple[int, int]:
        """This rank's slice of the dense MLP's (and the self-conditioning MLP's) intermediate width."""
        return span(self.text.intermediate_size, self.world, self.rank)

    def local_text(self) -> TextConfig:
        """The text config of this rank's shard geometry: its query and KV head counts (what its KV cache holds)."""
        t = self.text
        full = [i for i in range(t.num_hidden_layers) if not t.is_sliding(i)]
        sliding = [i for i in range(t.num_hidden_layers) if t.is_sliding(i)]
        kv = {i: self.kv_heads(i)[1] - self.kv_heads(i)[0] for i in full + sliding}
        q0, q1 = self.q_heads
        return dataclasses.replace(
            t,
            num_attention_heads=q1 - q0,
            num_key_value_heads=kv[sliding[0]] if sliding else kv[full[0]],
            num_global_key_value_heads=kv[full[0]],
        )

    def slice_of(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, end) of parameter `name` (our names) that this rank keeps; None: the whole tensor."""
        m = _LAYER.match(name)
        layer, rest = (int(m.group(1)), m.group(2)) if m else (None, name)
        rule = next((kind for pattern, kind in _RULES if pattern.fullmatch(rest)), None)
        if rule is None:
            return None
        if rule == "vocab":
            return (0, *self.vocab)
        if rule in ("dense_out", "dense_in"):
            return (0 if rule == "dense_out" else 1, *self.dense)
        if rule == "experts":
            return (0, *self.experts)
        d = self.text.layer_head_dim(layer)
        a, b = self.q_heads if rule in ("q", "o") else self.kv_heads(layer)
        return (1 if rule == "o" else 0, a * d, b * d)


_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# parameter name (within a layer, or the model's own) -> how it splits; weight_scale follows its FP8 weight's rows
_RULES = [
    (re.compile(r"embed_tokens\.weight"), "vocab"),
    (re.compile(r"self_attn\.q_proj\.(weight|bias|weight_scale)"), "q"),
    (re.compile(r"self_attn\.[kv]_proj\.(weight|bias|weight_scale)"), "kv"),
    (re.compile(r"self_attn\.o_proj\.weight"), "o"),
    (re.compile(r"(mlp|self_conditioning)\.(gate_proj|up_proj)\.(weight|bias|weight_scale)"), "dense_out"),
    (re.compile(r"(mlp|self_conditioning)\.down_proj\.weight"), "dense_in"),
    (re.compile(r"experts\.(gate_up_proj|down_proj)(_scale)?"), "experts"),
]
