"""Reference mode: generation exactly as transformers' `DiffusionGemmaForBlockDiffusion.generate` does it.

One left-padded batch, every row denoised at every step, transformers' kernels and masks (`transformers_kernels`,
`ReferenceCache`) and its random-number order: with the same seed on CPU in float32 the tokens are identical
(tests/test_reference.py). It is the oracle the fast path (the engine, sampler.sample_step) is measured against,
and what `LLM.generate(..., reference_sampling=True)` runs. Only the published recipe is supported: the default
strategies, no template, infilling or structured output.

Shapes: B rows, C canvas positions, V vocabulary.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from types import MethodType
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from dgemma.engine.params import SamplingParams
from dgemma.engine.request import EngineRequest, FinishReason, tokens_per_forward
from dgemma.engine.sampler import StableConfident, entropy_bound_accept
from dgemma.model.attention import Attention
from dgemma.model.blocks import MLP, RMSNorm
from dgemma.model.cache import CanvasView, KVCache
from dgemma.model.config import token_ids
from dgemma.model.experts import Experts, grouped_kernel
from dgemma.model.modeling import DiffusionGemma


def _never(self: nn.Module, *_: Any) -> bool:
    return False


def _separate_projections(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([m(x) for m in attn.projections], dim=-1)  # one matmul per projection


def _mlp(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x))  # torch's activation, separate matmuls


def _grouped_experts(ex: Experts, tokens: int, top_k: int) -> str:
    return grouped_kernel(ex.gate_up_proj)


# transformers' kernels, by the module methods of the fast path they replace: torch's rms_norm (not `rms_unit`),
# separate matmuls (no fused q/k/v or gate/up, so no fused FFN branches either), K/V repeated per query head under a
# mask (no folded GQA), torch's activations, the grouped expert matmul.
KERNELS: dict[type[nn.Module], dict[str, Callable]] = {
    RMSNorm: {"lean": _never},
    Attention: {"qkv": _separate_projections, "folds": _never},
    MLP: {"forward": _mlp},
    Experts: {"kernel": _grouped_experts},
}


@contextlib.contextmanager
def transformers_kernels(module: nn.Module) -> Iterator[None]:
    """Run `module` (a model or any of its parts) with the kernels transformers uses, bit for bit: the methods of
    `KERNELS` are bound onto its submodules for the duration, and the fast path's return afterwards."""
    bound = []
    for m in module.modules():
        for cls, methods in KERNELS.items():
            if isinstance(m, cls):
                for name, fn in methods.items():
                    bound.append((m, name, m.__dict__.get(name)))
                    setattr(m, name, MethodType(fn, m))
    try:
        yield
    finally:
        for m, name, old in reversed(bound):
            if old is None:
                delattr(m, name)
            else:
                setattr(m, name, old)


class ReferenceCache(KVCache):
    """The KV cache with transformers' masks for padding: a padding query sees nothing (SDPA gives it zeros), where
    the fast path lets it see itself, which keeps it finite on every kernel (a fully masked row is NaN on some)."""

    def view(self, n: int, rows: torch.Tensor | None = None, **how: Any) -> CanvasView:
        view = super().view(n, rows, **how)
        visible = how.get("visible")
        if how["causal"] and visible is not None:
            q = visible[:, None, :, None]  # (R, 1, n, 1)
            view.masks = {s: m if isinstance(m, str) else m & q for s, m in view.masks.items()}
        return view


# Knobs whose non-default values transformers' loop does not have.
DEFAULTS_ONLY = (
    ("mode", "diffusion"),
    ("schedule", "linear"),
    ("acceptance", "entropy_bound"),
    ("stopping", "stable_confident"),
    ("template", None),
    ("suffix_token_ids", None),
    ("n", 1),
    ("logprobs", None),
)


@dataclass
class ReferenceOutput:
    """One prompt's result: token ids without EOS or padding, why it ended, and what it cost."""

    token_ids: list[int]
    finish_reason: FinishReason
    decoder_passes: int
    wall_s: float  # the whole batch's generation time

    def metrics(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The request's metrics, for `completion_tokens` returned (fewer than `token_ids` after a stop string)."""
        passes = self.decoder_passes
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "decoder_passes": passes,
            "denoising_steps": passes,
            "tokens_per_forward": tokens_per_forward(completion_tokens, passes),
            "wall_s": self.wall_s,
        }


def generate(
    model: DiffusionGemma,
    requests: list[EngineRequest],
    generation_config: dict[str, Any] | None,
    eos: Iterable[int],
) -> list[ReferenceOutput]:
    """Generate a batch of requests the engine validated (`entrypoints.inputs`), once `_check` found them within
    what reference mode runs (ValueError naming what it does not support). `eos`: the model's EOS ids
    (`stop_token_ids` and `ignore_eos` apply)."""
    sp = _check(requests)
    gen = torch.Generator(device=model.device)
    gen.manual_seed(sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    pad = token_ids(model.config.text, generation_config).pad
    stop = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(eos))
    t0 = time.perf_counter()
    res = reference_generate(model, [r.prompt_ids for r in requests], sp, pad, sorted(stop), gen)
    wall = time.perf_counter() - t0
    return [ReferenceOutput(toks, reason, passes, wall) for toks, reason, passes in res]


def _check(requests: list[EngineRequest]) -> SamplingParams:
    """The batch's one SamplingParams; ValueError for what reference mode cannot run: different parameters per
    prompt, a strategy transformers' loop does not have, structured output."""
    sp = requests[0].params
    if any(r.params != sp for r in requests):
        raise ValueError("reference_sampling needs the same SamplingParams for every prompt (one batch)")
    odd = [f for f, default in DEFAULTS_ONLY if getattr(sp, f) != default]
    if any(r.constraint is not None for r in requests):
        odd.append("structured output")
    if odd:
        raise ValueError(
            f"reference_sampling runs transformers' exact algorithm; it does not support non-default {', '.join(odd)}"
        )
    return sp


def reference_generate(
    model: DiffusionGemma,
    prompts: list[list[int]],
    params: SamplingParams,
    pad_id: int,
    eos_ids: Iterable[int],
    generator: torch.Generator | None = None,
) -> list[tuple[list[int], FinishReason, int]]:
    """Generate as transformers' `generate` does: one left-padded batch, every row denoised at every step, the same
    random-number order. Returns per prompt (token ids without EOS/padding, finish reason, decoder passes)."""
    dev, C, V = model.device, model.config.canvas_length, model.config.vocab_size
    ids, visible = _left_pad(prompts, pad_id, dev)
    B, T = ids.shape
    n_canvases = -(-params.max_new_tokens // C)
    cache = ReferenceCache(model.text, B, T + n_canvases * C, dtype=model.dtype, device=model.device)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=dev)
    outputs: list[list[int]] = [[] for _ in range(B)]
    reasons: list[FinishReason] = ["length"] * B
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    passes = torch.zeros(B, dtype=torch.long, device=dev)
    with torch.inference_mode(), transformers_kernels(model):
        model.encode(ids, cache, visible=visible)
        for _ in range(n_canvases):
            masks = cache.decoder_masks(C)
            argmax, p = reference_denoise(
                lambda c, sc: model.denoise(c, cache, self_cond=sc, masks=masks),
                B,
                C,
                V,
                params,
                dev,
                model.dtype,
                generator,
                skip=done,
            )
            passes += p
            committed = _take_canvas(argmax, eos, pad_id, done, outputs, reasons)
            if bool(done.all()):
                break
            model.encode(committed, cache)
    limit = params.max_new_tokens
    return [
        (toks[:limit], "length" if len(toks) >= limit else reason, int(n))
        for toks, reason, n in zip(outputs, reasons, passes)
    ]


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded, as the reference expects (pads still take a position): ids and visibility (B, T)."""
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    visible = torch.zeros(B, T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        visible[i, T - len(p) :] = True
    return ids, visible


def _take_canvas(
    argmax: torch.Tensor,
    eos: torch.Tensor,
    pad_id: int,
    done: torch.Tensor,
    outputs: list[list[int]],
    reasons: list[FinishReason],
) -> torch.Tensor:
    """Append each unfinished row's canvas (B, C) to its output up to its first EOS (which finishes the row);
    returns the canvas to encode: finished rows commit padding, and the reference pads after EOS."""
    committed = argmax.clone()
    for i in range(len(outputs)):
        if done[i]:  # finished rows keep running (same random numbers) but commit padding
            committed[i] = pad_id
            continue
        toks = argmax[i].tolist()
        hit = torch.isin(argmax[i], eos).nonzero() if eos.numel() else []
        if len(hit):
            toks = toks[: int(hit[0])]
            committed[i, int(hit[0]) + 1 :] = pad_id
            done[i] = True
            reasons[i] = "stop"
        outputs[i].extend(toks)
    return committed


def reference_denoise(
    denoise: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    batch: int,
    canvas: int,
    vocab_size: int,
    p: SamplingParams,
    device,
    sc_dtype: torch.dtype,
    generator: torch.Generator | None = None,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise one canvas exactly as transformers' `generate` does (same random-number order, all rows every step).

    `denoise(canvas, self_cond_logits)` returns logits (B, C, V). Returns the argmax canvas (B, C) and the number of
    decoder passes each row needed (B,), not counting rows in `skip` (already finished sequences).
    """
    N = p.max_denoising_steps
    current = torch.randint(0, vocab_size, (batch, canvas), device=device, generator=generator)
    argmax = current
    sc = None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    passes = torch.zeros(batch, dtype=torch.long, device=device)
    stop = (
        None
        if p.fixed_steps
        else StableConfident(
            batch,
            canvas,
            torch.full((batch,), p.stability_threshold, device=device),
            torch.full((batch,), float(p.confidence_threshold), device=device),
            device,
        )
    )
    for n in range(N, 0, -1):
        passes += ~(finished | skip) if skip is not None else ~finished
        temp = p.t_min + (p.t_max - p.t_min) * (torch.tensor(n, dtype=torch.int32) / N)
        logits = denoise(current, sc) / temp
        new_current, new_argmax = _reference_step(logits, current, p, vocab_size, device, generator)
        if stop is not None:
            if finished.any():  # finished rows keep their canvas, draft and self-conditioning
                new_argmax = torch.where(finished[:, None], argmax, new_argmax)
                new_current = torch.where(finished[:, None], current, new_current)
                logits = torch.where(finished[:, None, None], sc, logits)
            mean_ent = torch.distributions.Categorical(logits=logits).entropy().mean(-1)
            finished |= stop(torch.arange(batch, device=device), new_argmax, mean_ent)
        sc = logits.to(sc_dtype)
        current, argmax = new_current, new_argmax
        if bool(finished.all()):
            break
    return argmax, passes


def _reference_step(
    logits: torch.Tensor,
    current: torch.Tensor,
    p: SamplingParams,
    vocab_size: int,
    device,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler step on temperature-scaled logits (B, C, V): the next canvas and the argmax draft (B, C). Every
    position is sampled, then the accepted ones kept and the rest redrawn from uniform noise (in this order)."""
    B, C = current.shape
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    draw = torch.multinomial(probs.view(-1, vocab_size), 1, generator=generator).view(B, C)
    argmax = logits.argmax(dim=-1)
    ent = torch.distributions.Categorical(logits=logits).entropy()
    mask = entropy_bound_accept(ent, torch.full((B,), float(p.entropy_bound), device=device))
    accepted = torch.where(mask, draw, current)
    noise = torch.randint(0, vocab_size, (B, C), device=device, generator=generator)
    return torch.where(~mask, noise, accepted), argmax
