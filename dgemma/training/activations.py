"""Activation checkpointing: each layer's feed-forward block (the dense MLP and the experts, whose hidden
activations are the largest a layer keeps for backward) runs without keeping its activations, and is run again in
the backward pass.

The block is checkpointed rather than the whole layer because attention reads and writes the KV cache: recomputing
it in the backward pass would read the cache as it is then (later canvases written into it), not as it was. The
feed-forward block is a function of its input alone, so its recomputation is exact.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from dgemma.model.modeling import DiffusionGemma


def checkpoint_feed_forward(model: DiffusionGemma) -> None:
    """Make every layer's `feed_forward` recompute its activations in the backward pass (an instance attribute
    over the method, so the model's parameters and their names stay as they are)."""
    for layer in model.layers:
        layer.feed_forward = _recomputed(layer.feed_forward)


def _recomputed(block: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # (no backward will follow: nothing to save)
            return block(x)
        return checkpoint(block, x, use_reentrant=False)

    return run
