"""Shared helpers of the fast-path tests: a tiny random model, and engine runs with canvases frozen after the
sampler, so that two engines feed the same canvases and their logits can be compared step by step."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import dgemma.engine.step as E
from dgemma import DiffusionGemma
from dgemma.engine.core import Engine
from dgemma.engine.params import SamplingParams
from dgemma.engine.sampler import entropy_bound_accept
from dgemma.model.config import tiny_config


def tiny_model(dtype=torch.float32, seed: int = 0, **over) -> DiffusionGemma:
    torch.manual_seed(seed)
    m = DiffusionGemma(tiny_config(**over))
    m.reset_parameters(0.2)
    return m.to(dtype).eval()


def frozen_runs(monkeypatch, engines: list[Engine], requests: list, steps: int) -> list[list[dict]]:
    """Run each engine `steps` steps on the same `requests` ((prompt, params) pairs) with canvases frozen after the
    sampler, so every run feeds the same canvases; per run, per sampler call, the logits by canvas."""
    real, seen = E.sample_step, []

    def frozen(logits, canvas, *a, **k):
        seen[-1].append({bytes(c.numpy()): lg.clone() for c, lg in zip(canvas, logits)})
        out = real(logits, canvas, *a, **k)
        out.canvas = canvas.clone()
        return out

    monkeypatch.setattr(E, "sample_step", frozen)
    for eng in engines:
        seen.append([])
        for prompt, params in requests:
            eng.add_request(prompt, params)
        for _ in range(steps):
            eng.step()
    return seen


def same_steps(a: list[dict], b: list[dict]) -> None:
    """Two runs' logits agree to rounding step by step, and self-conditioning changed the second step."""
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=1e-4, msg=f"step {step}")
    first = next(iter(a[0]))
    assert (a[1][first] - a[0][first]).abs().max() > 1e-2


def fixed_steps(seed: int, new: int) -> SamplingParams:
    return SamplingParams(seed=seed, max_new_tokens=new, max_denoising_steps=3, fixed_steps=True, ignore_eos=True)


def accepted_only(logits, canvas, temp, bound, u, V, fixed=None):
    """The sampler drawing only at accepted positions (one CDF per accepted position, found with `nonzero`): a
    second, data-dependent way to the same tokens, the oracle of the all-position sampler."""
    R, C, _ = logits.shape
    # the entropies by the sampler's own arithmetic: flat positions are near-ties that another formula may reorder
    top = logits.amax(-1, keepdim=True)
    inv = temp.reciprocal()[:, None, None]
    x = torch.addcmul(-top * inv, logits, inv)
    probs = x.exp()
    z = probs.sum(-1)
    entropy = z.log() - torch.einsum("rcv,rcv->rc", probs, x) / z
    probs = probs / z[..., None]
    mask = entropy_bound_accept(entropy, bound)
    if fixed is not None:
        mask = mask | (fixed >= 0)
    nxt = (u[:, :C] * V).long().clamp(max=V - 1)
    r, c = mask.nonzero(as_tuple=True)
    cdf = probs[r, c].cumsum(-1)
    target = u[r, C + c].float()[:, None] * cdf[:, -1:]
    nxt[r, c] = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=V - 1)
    argmax = probs.argmax(-1)
    if fixed is not None:
        nxt, argmax = torch.where(fixed >= 0, fixed, nxt), torch.where(fixed >= 0, fixed, argmax)
    return SimpleNamespace(canvas=nxt, argmax=argmax, accepted=mask.sum(-1))
