"""The sharded modules of a tensor-parallel rank, and how a model is cut into them.

`shard_modules` gives a full-size model (on the meta device) its shard's shapes: the column-parallel linears (q/k/v,
the MLPs' gate/up) and the experts simply become smaller modules of the same classes, so every kernel choice of the
single-device path (fused projections, expert kernels, FP8) applies to the shard as it is. `wire` then adds the
communication, after the weights are in: the row-parallel linears (o_proj, the MLPs' down_proj) and the experts sum
their partial outputs over the ranks (`Reduced`, `ExpertShard`), the embedding looks up its own vocabulary rows and
sums (`VocabEmbedding`). The vocabulary-sharded sampler (`sampler.ShardSampler`) is the shard runner's.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.model.blocks import MLP
from dgemma.model.config import TextConfig
from dgemma.model.experts import Experts
from dgemma.model.modeling import DiffusionGemma
from dgemma.parallel.comm import Comm
from dgemma.parallel.plan import Plan


class Reduced(nn.Module):
    """A row-parallel linear: this rank's columns of the weight (`inner`, an nn.Linear or an FP8 linear) times its
    slice of the input, summed over the ranks. A bias lives on rank 0 only."""

    def __init__(self, inner: nn.Module, comm: Comm):
        super().__init__()
        self.inner, self.comm = inner, comm

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.inner(x))


class ExpertShard(nn.Module):
    """Experts [start, start + E_local) of the router's E (`inner`: `Experts` or FP8 experts of E_local experts).

    Every rank routes every token (the router is replicated) and runs its own experts' share: an assignment to
    another rank's expert keeps its slot with weight zero on the first local expert (fixed shapes, no host
    synchronisation), so it adds nothing; the ranks' sums add up to the whole mixture."""

    def __init__(self, inner: nn.Module, start: int, comm: Comm):
        super().__init__()
        self.inner, self.start, self.comm = inner, start, comm
        self.count = inner.gate_up_proj.shape[0]

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self.inner.gate_up_proj

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, hidden); weights/idx (N, K) over all experts -> every rank's experts' sum (N, hidden)."""
        local = idx - self.start
        mine = (local >= 0) & (local < self.count)
        out = self.inner(x, torch.where(mine, weights, 0.0), torch.where(mine, local, 0))
        return self.comm.all_reduce(out)


class VocabEmbedding(nn.Module):
    """The embedding rows [start, start + V_local) of the vocabulary (`weight`, also this rank's tied LM head)."""

    def __init__(self, weight: nn.Parameter, start: int, comm: Comm):
        super().__init__()
        self.weight, self.start, self.comm = weight, start, comm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) -> embeddings (..., hidden): each rank looks up the ids it holds (zero elsewhere), then sum."""
        local = tokens - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(torch.where(mine, local, 0), self.weight)
        return self.comm.all_reduce(torch.where(mine[..., None], rows, 0.0))


def _linear(old: nn.Linear, out_features: int | None = None, in_features: int | None = None, bias: bool = True):
    """A meta-device nn.Linear shaped like `old` but with the given widths (a bias only where `old` has one)."""
    return nn.Linear(
        old.in_features if in_features is None else in_features,
        old.out_features if out_features is None else out_features,
        bias=bias and old.bias is not None,
        device="meta",
    )


def _shard_mlp(mlp: MLP, plan: Plan) -> None:
    a, b = plan.dense
    mlp.gate_proj = _linear(mlp.gate_proj, out_features=b - a)
    mlp.up_proj = _linear(mlp.up_proj, out_features=b - a)
    mlp.down_proj = _linear(mlp.down_proj, in_features=b - a, bias=plan.rank == 0)


def shard_modules(model: DiffusionGemma, plan: Plan) -> None:
    """Give `model` (full-size, on the meta device) this rank's shapes, in place (no communication yet: `wire`)."""
    text, local = plan.text, plan.local_text()
    v0, v1 = plan.vocab
    model.embed_tokens = nn.Embedding(v1 - v0, text.hidden_size, device="meta")
    _shard_mlp(model.self_conditioning, plan)
    e0, e1 = plan.experts
    q0, q1 = plan.q_heads
    for i, layer in enumerate(model.layers):
        attn, d = layer.self_attn, text.layer_head_dim(i)
        k0, k1 = plan.kv_heads(i)
        attn.n_heads, attn.n_kv = q1 - q0, k1 - k0
        attn.q_proj = _linear(attn.q_proj, out_features=(q1 - q0) * d)
        attn.k_proj = _linear(attn.k_proj, out_features=(k1 - k0) * d)
        if attn.v_proj is not None:
            attn.v_proj = _linear(attn.v_proj, out_features=(k1 - k0) * d)
        attn.o_proj = _linear(attn.o_proj, in_features=(q1 - q0) * d, bias=plan.rank == 0)
        _shard_mlp(layer.mlp, plan)
        with torch.device("meta"):
            layer.experts = Experts(_with_experts(text, e1 - e0))
    model.text = local  # the shard's geometry: its KV cache holds only its KV heads


def _with_experts(text: TextConfig, n: int) -> TextConfig:
    """`text` with `n` experts (the shape of a rank's expert shard)."""
    return dataclasses.replace(text, num_experts=n, top_k_experts=min(text.top_k_experts, n))


def wire(model: DiffusionGemma, plan: Plan, comm: Comm) -> None:
    """Add the communication to a loaded shard (see the module docstring); its weights stay where they are."""
    model.embed_tokens = VocabEmbedding(model.embed_tokens.weight, plan.vocab[0], comm)
    for mlp in [model.self_conditioning] + [layer.mlp for layer in model.layers]:
        mlp.down_proj = Reduced(mlp.down_proj, comm)
    for layer in model.layers:
        layer.self_attn.o_proj = Reduced(layer.self_attn.o_proj, comm)
        layer.experts = ExpertShard(layer.experts, plan.experts[0], comm)
