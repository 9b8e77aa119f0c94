"""The denoising step: one function for every row, on every device.

`denoise_step` is the decoder pass over R canvases, the LM head and the sampler. Everything a request chooses is
data for it: temperatures and entropy bounds (R,), acceptance-rule ids (R,), fixed positions (R, C) (templates,
infilling suffixes, a constraint's validated frontier; -1 where free) and each row's own uniforms (R, 2C). It has
no data-dependent shape and no host synchronisation of its own, so the runner calls it eagerly on exact shapes and
`graphs.StepGraphs` replays it from static, bucket-padded buffers (captured as a CUDA graph on CUDA): the same
function object either way.

The one host hook is `frontier`: a constrained row's validated frontier grows from this step's logits (llguidance
runs on the host), so a step with constrained rows passes `frontier(logits) -> fixed` and runs uncaptured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from dgemma.engine.sampler import SCHEDULES, STOPPING, StepOut, sample_step
from dgemma.model.cache import CanvasView, KVCache
from dgemma.model.modeling import DiffusionGemma

Frontier = Callable[[torch.Tensor], torch.Tensor]  # logits (R, C, V) -> fixed positions (R, C)


@dataclass
class StepInputs:
    """One denoising step's per-row inputs (R rows)."""

    canvas: torch.Tensor  # (R, C) token ids
    soft: torch.Tensor | None  # (R, C, hidden) self-conditioning input; None: no row has one yet
    uniforms: torch.Tensor  # (R, 2C) float64, from each row's own generator
    temperature: torch.Tensor  # (R,) float32
    bound: torch.Tensor  # (R,) float32 entropy bounds
    rule: torch.Tensor  # (R,) long acceptance-rule ids (sampler.rule_ids)
    fixed: torch.Tensor  # (R, C) long fixed ids, -1 free
    rows: torch.Tensor | None = None  # (R,) cache rows; None: all cache rows in order


@dataclass
class StepBuffers:
    """Reusable (R, C, V) workspaces of the LM head and the sampler; None fields are allocated by the step."""

    logits: torch.Tensor | None = None  # float32
    lowp: torch.Tensor | None = None  # the model dtype's head output (bf16 models)
    probs: torch.Tensor | None = None  # float32


def denoise_step(
    model: DiffusionGemma,
    cache: KVCache,
    x: StepInputs,
    masks: CanvasView,
    buffers: StepBuffers | None = None,
    frontier: Frontier | None = None,
    sampler: Callable | None = None,
) -> StepOut:
    """Decoder pass, LM head and sampler for R rows. `masks` from `cache.decoder_masks(C, rows, in_place=True)`
    (the canvas's keys/values go into their future cache slots, so no per-layer copy of the cache). `sampler`:
    `sample_step`'s stand-in for a model whose vocabulary is split over ranks (dgemma/parallel); None: `sample_step`."""
    b = buffers or StepBuffers()
    hidden = model.denoise(x.canvas, cache, soft=x.soft, rows=x.rows, masks=masks, hidden_only=True)
    logits = model.logits(hidden, out=b.logits, scratch=b.lowp)  # (R, C, V) float32
    fixed = x.fixed if frontier is None else frontier(logits)
    V = model.config.vocab_size
    sample = sample_step if sampler is None else sampler
    return sample(logits, x.canvas, x.temperature, x.bound, x.rule, x.uniforms, V, fixed, probs_out=b.probs)


def temperatures(steps_left: list[int], params: list[Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row temperature from each row's schedule at its remaining-step count, and entropy bound: (R,), (R,)."""
    N = torch.tensor([p.max_denoising_steps for p in params], dtype=torch.float32)
    n = torch.tensor(steps_left, dtype=torch.float32)
    t_min = torch.tensor([p.t_min for p in params], dtype=torch.float32)
    t_max = torch.tensor([p.t_max for p in params], dtype=torch.float32)
    temp = torch.empty(len(params))
    for name in {p.schedule for p in params}:  # one call per schedule (usually one)
        sel = torch.tensor([i for i, p in enumerate(params) if p.schedule == name])
        temp[sel] = SCHEDULES[name](n[sel], N[sel], t_min[sel], t_max[sel])
    return temp.to(device), torch.tensor([p.entropy_bound for p in params], device=device)


class StopRules:
    """The stop rules in use: one object per rule over all cache rows (built on first use)."""

    def __init__(self, rows: int, canvas: int, device: torch.device):
        self.rows, self.canvas, self.device = rows, canvas, device
        self._rules: dict[str, Any] = {}

    def rule(self, name: str) -> Any:
        if name not in self._rules:
            n = self.rows
            self._rules[name] = STOPPING[name](
                n, self.canvas, torch.ones(n, dtype=torch.long), torch.zeros(n), self.device
            )
        return self._rules[name]

    def reset(self, row: int, name: str, stability: int, confidence: float) -> None:
        """A new canvas on cache row `row`, under rule `name` and its thresholds."""
        self.rule(name).reset(torch.tensor([row], device=self.device), stability, confidence)

    def converged(self, rows: list[int], names: list[str], out: StepOut) -> torch.Tensor:
        """Which rows' canvases their rules call converged after a step: (R,) bool on the host, one call per rule."""
        done = torch.zeros(len(rows), dtype=torch.bool)
        for name in set(names):
            idx = [i for i, n in enumerate(names) if n == name]
            sel = torch.tensor(idx, device=out.argmax.device)
            at = torch.tensor([rows[i] for i in idx], device=out.argmax.device)
            done[idx] = self.rule(name)(at, out.argmax[sel], out.mean_entropy[sel]).cpu()
        return done
