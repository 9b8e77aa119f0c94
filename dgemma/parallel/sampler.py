"""The denoising step's sampler over vocabulary shards: the same step as `engine.sampler.sample_step`, with every
reduction over the vocabulary split into a local part and a small exchange, so that no rank ever holds
(rows, canvas, vocab) in full.

Each rank holds the logits of its vocabulary range, (R, C, V_r). Across the ranks travel only (R, C) statistics:

1. max and argmax: each rank's max and its first index (`max_argmax`), all-gathered; the highest max wins, the
   lowest rank among equals (the first index overall, as `Tensor.max` picks it).
2. partition function and entropy: each rank's sum of exp(x - max) and of exp(x - max) * (x - max), all-gathered;
   their sums are the whole vocabulary's, and each rank's first sum is also its shard's share of the mass.
3. the inverse-CDF draw: the target u * Z falls in one shard (the cumulative shard masses say which); that rank
   draws inside its shard with the local two-level `inverse_cdf`, and one all-reduce of (R, C) ids (zero from every
   other rank) hands the id to all.

Acceptance, noise and fixed positions see only (R, C) data, identical on every rank, so every rank returns the same
canvas, argmax, acceptance counts and entropies, and its own shard of the probabilities.
"""

from __future__ import annotations

import torch

from dgemma.engine.sampler import StepOut, accept_mask, inverse_cdf, max_argmax, next_canvas, unnormalised
from dgemma.parallel.comm import Comm


class ShardSampler:
    """`sample_step` for one rank of a vocabulary split over `comm`: its vocabulary starts at `start`, and the ranks
    hold `sizes` ids each (in rank order)."""

    def __init__(self, comm: Comm, start: int, sizes: list[int]):
        self.comm, self.start, self.sizes = comm, start, sizes

    def max_argmax(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole vocabulary's max (R, C, 1) and first argmax (R, C) from this rank's logits (R, C, V_r)."""
        top, idx = max_argmax(logits)
        both = self.comm.all_gather(torch.stack([top.squeeze(-1).double(), (idx + self.start).double()]))
        tops = both[:, 0]  # (N, R, C), exact in float64 (float32 maxima, ids below 2^53)
        best = tops.max(dim=0).values
        first = (tops == best).int().argmax(dim=0, keepdim=True)  # the lowest rank holding the max
        return best.to(logits.dtype)[..., None], both[:, 1].gather(0, first).squeeze(0).long()

    def draw(self, probs: torch.Tensor, u: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF ids (R, C) over the whole vocabulary: probs (R, C, V_r) this rank's normalised shard, u (R, C)
        uniforms, mass (N, R, C) every shard's unnormalised mass in rank order."""
        ends = mass.cumsum(0)  # (N, R, C)
        target = u * ends[-1]
        last = (mass.shape[0] - 1) - (mass > 0).flip(0).int().argmax(dim=0)  # the last shard with mass
        shard = torch.minimum((ends <= target).sum(0), last)  # the first shard whose cumulative mass exceeds it
        start = torch.where(shard > 0, ends.gather(0, (shard - 1).clamp(min=0)[None]).squeeze(0), 0.0)
        own = mass.gather(0, shard[None]).squeeze(0).clamp(min=torch.finfo(mass.dtype).tiny)
        local = ((target - start) / own).clamp_(0.0, 1.0)  # the target's place inside its shard, as a uniform
        ids = inverse_cdf(probs, local) + self.start
        return self.comm.all_reduce(torch.where(shard == self.comm.rank, ids, 0))

    def __call__(
        self,
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
        """As `engine.sampler.sample_step`, on this rank's logits (R, C, V_r); `probs` of the result is its shard."""
        C = logits.shape[1]
        top, argmax = self.max_argmax(logits)
        x, probs = unnormalised(logits, top, temperature, probs_out)  # against the global max
        stats = self.comm.all_gather(torch.stack([probs.sum(dim=-1), torch.einsum("rcv,rcv->rc", probs, x)]))
        z, dot = stats.sum(dim=0).unbind(0)  # (R, C) each, over the whole vocabulary
        probs.div_(z[..., None])
        entropy = z.log() - dot / z
        mask = accept_mask(entropy, bound, rule)
        drawn = self.draw(probs, uniforms[:, C:].float(), stats[:, 0])
        return next_canvas(mask, drawn, uniforms, vocab_size, argmax, fixed, probs, entropy)
