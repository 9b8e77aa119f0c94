"""The block-diffusion sampler: denoise one canvas with entropy-bound acceptance, uniform re-noising,
self-conditioning and adaptive stopping (the published DiffusionGemma recipe).

The sampler only needs a `denoise(canvas, self_cond) -> logits` callable; it knows nothing about the model,
the cache or requests. Its three strategies (temperature schedule, acceptance rule, stop rule) are small classes
picked by name from registries, so new ones can be added without touching the loop.

Shapes: B rows, C canvas positions, V vocabulary. Logits are float32 (B, C, V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


# -- strategies ---------------------------------------------------------------------------------------------------
def linear_schedule(n, N, t_min, t_max):
    return t_min + (t_max - t_min) * (n / N)


def cosine_schedule(n, N, t_min, t_max):
    return t_min + (t_max - t_min) * 0.5 * (1 - torch.cos(math.pi * n / N))


SCHEDULES: dict[str, Callable] = {"linear": linear_schedule, "cosine": cosine_schedule}


def entropy_bound_accept(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Accept the lowest-entropy positions whose (cumulative entropy - its largest entropy) <= bound.

    entropy (R, C), bound (R,) -> accept mask (R, C). The lowest-entropy position is always accepted.
    """
    s, order = torch.sort(entropy, dim=-1)
    keep = (torch.cumsum(s, dim=-1) - s) <= bound[:, None]
    return torch.zeros_like(keep).scatter(-1, order, keep)


def confidence_accept(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """A simpler rule: accept every position whose own entropy is below the bound (at least the best one)."""
    keep = entropy <= bound[:, None]
    best = entropy.argmin(dim=-1, keepdim=True)
    return keep.scatter(-1, best, True)


ACCEPTANCE: dict[str, Callable] = {"entropy_bound": entropy_bound_accept, "confidence": confidence_accept}
RULE_IDS = {name: i for i, name in enumerate(ACCEPTANCE)}  # a step's acceptance rules travel as these ids


def rule_ids(names: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """The acceptance rules of R rows as data for the step: (R,) long ids into `ACCEPTANCE`."""
    return torch.tensor([RULE_IDS[n] for n in names], dtype=torch.long, device=device)


def accept_mask(entropy: torch.Tensor, bound: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
    """Each row's accepted positions under its own rule: entropy (R, C), bound (R,), rule (R,) ids -> (R, C).
    Every rule is evaluated (a sort over C: cheap next to the LM head) and each row keeps its own, so a batch
    mixing rules is one step with no data-dependent branch."""
    mask = torch.zeros_like(entropy, dtype=torch.bool)
    for i, fn in enumerate(ACCEPTANCE.values()):
        mask = torch.where((rule == i)[:, None], fn(entropy, bound), mask)
    return mask


class StableConfident:
    """Stop a row when its argmax canvas is unchanged for `stability` steps and mean entropy < `confidence`.

    One object serves many rows (per-row thresholds, histories indexed by row), so a batched step costs a few
    tensor operations whatever the batch size.
    """

    def __init__(self, rows: int, canvas: int, stability: torch.Tensor, confidence: torch.Tensor, device):
        self.stability = stability.to(device=device, dtype=torch.long).clone()  # (rows,)
        self.confidence = confidence.to(device=device, dtype=torch.float32).clone()  # (rows,)
        depth = max(1, int(self.stability.max().item()) if self.stability.numel() else 1)
        self.history = torch.full((depth, rows, canvas), -1, dtype=torch.long, device=device)

    def reset(self, rows: torch.Tensor, stability: int, confidence: float) -> None:
        """Start new canvases on `rows` with the given thresholds."""
        depth = self.history.shape[0]
        if stability > depth:  # deeper history needed: older entries are empty (-1)
            pad = self.history.new_full((stability - depth, *self.history.shape[1:]), -1)
            self.history = torch.cat([pad, self.history])
        self.history[:, rows] = -1
        self.stability[rows] = stability
        self.confidence[rows] = confidence

    def __call__(self, rows: torch.Tensor, argmax: torch.Tensor, mean_entropy: torch.Tensor) -> torch.Tensor:
        hist = self.history[:, rows]  # (depth, R, C)
        same = (hist == argmax[None]).all(dim=-1)  # (depth, R)
        depth = hist.shape[0]
        # A row with threshold s looks at its last s argmax canvases (the newest are at the end).
        use = torch.arange(depth, device=argmax.device)[:, None] >= (depth - self.stability[rows])[None, :]
        stable = (same | ~use).all(dim=0)
        hist = torch.roll(hist, -1, dims=0)
        hist[-1] = argmax
        self.history[:, rows] = hist
        return stable & (mean_entropy < self.confidence[rows])


class NeverStop:
    """Fixed number of steps: the canvas runs all max_denoising_steps."""

    def __init__(self, rows, canvas, stability, confidence, device):
        pass

    def reset(self, rows, stability, confidence) -> None:
        pass

    def __call__(self, rows, argmax, mean_entropy):
        return torch.zeros_like(mean_entropy, dtype=torch.bool)


STOPPING: dict[str, type] = {"stable_confident": StableConfident, "none": NeverStop}


# -- one denoising step on a batch of rows --------------------------------------------------------------------------
@dataclass
class StepOut:
    canvas: torch.Tensor  # (R, C) next canvas (accepted tokens kept, the rest redrawn)
    argmax: torch.Tensor  # (R, C) current draft
    probs: torch.Tensor  # (R, C, V) softmax of temperature-scaled logits: the next step's self-conditioning
    accepted: torch.Tensor  # (R,) number of accepted positions
    mean_entropy: torch.Tensor  # (R,)


def draw_uniforms(generators: list[torch.Generator | None], canvas: int, device: torch.device | str) -> torch.Tensor:
    """The random numbers of one sampler step: (R, 2C) float64 uniforms, each row from its own generator, so a
    request's tokens do not depend on its batch neighbours."""
    return torch.stack([torch.rand(2 * canvas, generator=g, dtype=torch.float64, device=device) for g in generators])


def max_argmax(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., V) -> the max (..., 1) and the first index holding it (...,), as `x.max(-1)` returns them.

    Index-returning reductions over V are slow on CPU (not vectorised: 0.4 ms at (64, 8192), 15x `amax`), so the
    index is found in two short steps: the first block of `block` entries whose `amax` is the max, then the first
    maximal entry inside it."""
    V = x.shape[-1]
    if V % block or V == block:
        top, idx = x.max(dim=-1, keepdim=True)
        return top, idx.squeeze(-1)
    blocks = x.unflatten(-1, (V // block, block))  # (..., V/block, block)
    top, first = blocks.amax(dim=-1).max(dim=-1, keepdim=True)  # (..., 1) each: the first block reaching the max
    inside = blocks.gather(-2, first[..., None].expand(*first.shape, block)).squeeze(-2).argmax(dim=-1)  # (...,)
    return top, first.squeeze(-1) * block + inside


CDF_BLOCK = 256  # inverse_cdf's block: a cumulative sum over V is sequential on a CPU (92 ms at (256, 32768))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token at each position's uniform: probs (R, C, V), u (R, C) in [0, 1) -> ids (R, C), the first id whose
    cumulative probability exceeds u times the total. Two short levels when V is a multiple of `CDF_BLOCK`: block
    sums and their cumulative sum locate the block, a cumulative sum inside that block the id (fixed shapes: no
    host synchronisation; 6.6 ms at (256, 32768) on one core, against 92 ms for one cumulative sum over V)."""
    R, C, V = probs.shape
    B = CDF_BLOCK
    if V % B or V == B:
        cdf = probs.cumsum(-1)  # (R, C, V)
        return torch.searchsorted(cdf, u[..., None] * cdf[..., -1:], right=True).squeeze(-1).clamp_(max=V - 1)
    blocks = probs.unflatten(-1, (V // B, B))  # (R, C, V/B, B)
    ends = blocks.sum(-1).cumsum(-1)  # (R, C, V/B) cumulative mass at each block's end
    target = u[..., None] * ends[..., -1:]  # (R, C, 1)
    block = torch.searchsorted(ends, target, right=True).clamp_(max=V // B - 1)  # (R, C, 1)
    start = torch.where(block > 0, ends.gather(-1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    inside = blocks.gather(-2, block[..., None].expand(R, C, 1, B)).squeeze(-2).cumsum(-1)  # (R, C, B)
    return (block * B + torch.searchsorted(inside, target - start, right=True).clamp_(max=B - 1)).squeeze(-1)


def sample_step(
    logits: torch.Tensor,
    canvas: torch.Tensor,
    temperature: torch.Tensor,
    bound: torch.Tensor,
    rule: torch.Tensor,
    uniforms: torch.Tensor,
    vocab_size: int,
    fixed: torch.Tensor | None = None,
    probs_out: torch.Tensor | None = None,
) -> StepOut:
    """One sampler step. logits (R, C, V) float32 (consumed: scaled in place), canvas (R, C), temperature/bound (R,),
    rule (R,) acceptance-rule ids (`rule_ids`).

    `uniforms` (R, 2C) from `draw_uniforms`: C for the re-noising, C for inverse-CDF samples. Every position is
    sampled from its uniform (`inverse_cdf`) and the accepted ones are kept with `torch.where`: no data-dependent
    shape or host synchronisation, so the step can be captured as a CUDA graph (each position's draw depends only
    on its own probabilities and uniform, so sampling only the accepted positions would give the same tokens).
    `fixed` (R, C) holds fixed token ids (-1 where free): fixed positions are always accepted and never redrawn.
    `probs_out` (R, C, V) float32 receives the probabilities (a reusable buffer).
    """
    C = logits.shape[1]
    top, argmax = max_argmax(logits)  # (R, C, 1), (R, C): a positive temperature keeps the order
    x, probs = unnormalised(logits, top, temperature, probs_out)
    z = probs.sum(dim=-1)  # (R, C) partition function (relative to the max)
    dot = torch.einsum("rcv,rcv->rc", probs, x)  # sum_v e^(x-m) (x-m)
    probs.div_(z[..., None])
    entropy = z.log() - dot / z  # -sum p log p
    mask = accept_mask(entropy, bound, rule)
    drawn = inverse_cdf(probs, uniforms[:, C:].float())
    return next_canvas(mask, drawn, uniforms, vocab_size, argmax, fixed, probs, entropy)


def unnormalised(
    logits: torch.Tensor, top: torch.Tensor, temperature: torch.Tensor, probs_out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x = (logits - max) / T written over the logits (R, C, V) in one pass, and exp(x) (into `probs_out` if
    given): every exp is at most 1, so none overflows. `top` (R, C, 1) is the max over the whole vocabulary."""
    inv = temperature.reciprocal()[:, None, None]  # (R, 1, 1)
    x = torch.addcmul(-top * inv, logits, inv, out=logits)
    return x, (torch.exp(x, out=probs_out) if probs_out is not None else x.exp())


def next_canvas(
    mask: torch.Tensor,
    drawn: torch.Tensor,
    uniforms: torch.Tensor,
    vocab_size: int,
    argmax: torch.Tensor,
    fixed: torch.Tensor | None,
    probs: torch.Tensor,
    entropy: torch.Tensor,
) -> StepOut:
    """The step's result: accepted positions (mask (R, C)) keep their draw, the others are re-noised from the first C
    uniforms; fixed positions (-1 free) count as accepted and hold their id in the canvas and the argmax."""
    C = mask.shape[1]
    noise = (uniforms[:, :C] * vocab_size).long().clamp_(max=vocab_size - 1)  # uniform noise tokens
    nxt = torch.where(mask, drawn, noise)
    if fixed is not None:
        keep = fixed >= 0
        mask = mask | keep
        nxt = torch.where(keep, fixed, nxt)
        argmax = torch.where(keep, fixed, argmax)
    return StepOut(nxt, argmax, probs, mask.sum(-1), entropy.mean(-1))
