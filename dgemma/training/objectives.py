"""The training objectives: the published block-diffusion SFT loss and the autoregressive baseline.

The diffusion objective (DESIGN.md, "Training facts"), per example:

- the response (plus EOS, padded to whole canvases) is cut into canvases of `canvas_length` tokens;
- t ~ U(eps, 1); every supervised canvas position is replaced by a uniformly random token with probability t;
- the model runs exactly as at inference: the encoder reads the clean prompt, then for each canvas k the decoder
  denoises the corrupted canvas k against the cache (prompt + clean canvases < k), and the encoder appends the clean
  canvas k (block-causal over multi-canvas targets);
- loss = mean cross-entropy of the clean token over all supervised canvas positions (corrupted or not)
  + `ar_weight` x the encoder's next-token cross-entropy on the clean sequence;
- with probability `self_cond_prob` per example the decoder first runs without self-conditioning, and its detached
  logits condition a second pass, which is the one that is trained.

`objective="ar"` trains the same checkpoint as a plain causal LM (the encoder pass only): the baseline. Losses are
returned as sums with their token counts, normalised by the *global* counts by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dgemma.model.cache import KVCache
from dgemma.model.modeling import DiffusionGemma
from dgemma.training.config import TrainConfig
from dgemma.training.data import Batch


@dataclass
class LossParts:
    """Summed (not averaged) losses and their token counts, so that they can be combined across processes."""

    diffusion_sum: torch.Tensor
    diffusion_count: int
    ar_sum: torch.Tensor
    ar_count: int


def counts(batch: Batch, cfg: TrainConfig) -> tuple[int, int]:
    """Supervised canvas positions and next-token targets of a batch (the global normalisers)."""
    n_diff = int(batch.supervised.sum()) if cfg.objective == "diffusion" else 0
    n_ar = int(_ar_targets(batch, cfg)[1].sum()) if cfg.uses_ar_loss else 0
    return n_diff, n_ar


def _ar_targets(batch: Batch, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets (B, P + K*C) over the encoder's sequence [prompt (right-padded), canvases] and their mask.

    Position j of a row predicts its next real token; prompt padding sits between prompt and canvases in the padded
    layout, so targets are built per row."""
    B, P = batch.prompt.shape
    K, C = batch.canvases.shape[1:]
    T = P + K * C
    dev = batch.prompt.device
    tgt = torch.zeros(B, T, dtype=torch.long, device=dev)
    mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    flat = batch.canvases.reshape(B, -1)
    sup = batch.supervised.reshape(B, -1)
    for b in range(B):
        n = int(batch.prompt_len[b])
        m = int(sup[b].sum())
        seq = torch.cat([batch.prompt[b, :n], flat[b, :m]])
        # Hidden state at layout position of token i predicts token i + 1.
        layout = torch.cat([torch.arange(n, device=dev), P + torch.arange(m, device=dev)])
        tgt[b, layout[:-1]] = seq[1:]
        keep = torch.ones(len(seq) - 1, dtype=torch.bool, device=dev)
        if not cfg.prompt_loss:
            keep[: n - 1] = False
        mask[b, layout[:-1]] = keep
    return tgt, mask


def loss_parts(
    model: DiffusionGemma,
    batch: Batch,
    cfg: TrainConfig,
    compute_dtype: torch.dtype | None = None,
    same_calls: bool = False,
) -> LossParts:
    """Run the model as at inference over one (micro-)batch and return summed losses.

    `compute_dtype`: the dtype the layers compute in when it is not the weights' (FSDP's bf16 gathered weights),
    which the KV cache takes. `same_calls`: make the same model calls whatever the rows hold (FSDP gathers each
    layer's weights per call, a collective, so every process must call alike): no pass is skipped for a canvas
    without supervised positions or without self-conditioned rows. The losses are the same."""
    B, K, C = batch.canvases.shape
    P = batch.prompt.shape[1]
    cache = KVCache(model.text, B, P + K * C, dtype=compute_dtype or model.dtype, device=model.device)
    hidden = [model.encode(batch.prompt, cache, n_new=batch.prompt_len)]  # (B, P, H)
    diff_sum = torch.zeros((), device=model.device)
    # With ar_weight 0 the diffusion objective needs no next-token logits, so the last clean canvas (context for
    # nothing after it) is not encoded: a third less compute per single-canvas example.
    for k in range(K):
        if cfg.objective == "diffusion":
            diff_sum = diff_sum + _canvas_loss(model, batch, cache, k, same_calls, cfg.self_cond_prob > 0)
        if cfg.uses_ar_loss or k < K - 1:
            hidden.append(model.encode(batch.canvases[:, k], cache))  # the clean canvas joins the context
    if not cfg.uses_ar_loss:
        return LossParts(diff_sum, int(batch.supervised.sum()), diff_sum * 0, 0)
    tgt, mask = _ar_targets(batch, cfg)
    h = torch.cat(hidden, dim=1)[mask]  # (N, H)
    if h.shape[0] or same_calls:
        ar_sum = F.cross_entropy(model.logits(h), tgt[mask], reduction="sum")
    else:
        ar_sum = diff_sum * 0
    return LossParts(diff_sum, int(batch.supervised.sum()), ar_sum, int(mask.sum()))


def _canvas_loss(
    model: DiffusionGemma, batch: Batch, cache: Any, k: int, same_calls: bool = False, self_conditions: bool = False
) -> torch.Tensor:
    """Canvas k's summed cross-entropy. `same_calls`: run the passes even with no supervised position, and with
    `self_conditions` (some rows of some process may be self-conditioned) the first pass even with no
    self-conditioned row here (a signal that every row masks adds exactly zero)."""
    noisy, sup = batch.noisy[:, k], batch.supervised[:, k]
    if not (same_calls or bool(sup.any())):
        return torch.zeros((), device=model.device)
    # Not in place: a canvas written into the cache's future slots would be overwritten by the clean canvas's
    # encoder pass below, which autograd needs as it was.
    masks = cache.decoder_masks(noisy.shape[1], in_place=False)
    sc = batch.self_cond
    self_cond = None
    if sc is not None and ((same_calls and self_conditions) or bool(sc.any())):
        with torch.no_grad():
            self_cond = model.denoise(noisy, cache, masks=masks).detach()  # first pass, no signal
    logits = model.denoise(
        noisy, cache, self_cond=self_cond, self_cond_mask=sc if self_cond is not None else None, masks=masks
    )
    return F.cross_entropy(logits[sup], batch.canvases[:, k][sup], reduction="sum")
