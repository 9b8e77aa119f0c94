"""Training checkpoints: the optimizer's state as safetensors, and finding the newest checkpoint of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def optimizer_tensors(
    opt: torch.optim.Optimizer, named: dict[str, nn.Parameter], values: bool
) -> dict[str, torch.Tensor]:
    """The optimizer's state as `<param name>::<key>` tensors, plus `<name>::value` (the parameters) if `values`."""
    index = {id(p): n for n, p in named.items()}
    tensors = {
        f"{index[id(p)]}::{k}": torch.as_tensor(v).detach().contiguous().cpu()
        for p, st in opt.state.items()
        for k, v in st.items()
    }
    if values:
        tensors.update({f"{n}::value": p.detach().contiguous().cpu() for n, p in named.items()})
    return tensors


def restore_optimizer(
    opt: torch.optim.Optimizer, named: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]
) -> None:
    """The inverse of `optimizer_tensors` (parameter values aside)."""
    opt.zero_grad(set_to_none=False)
    for n, p in named.items():
        st = {
            k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == n and not k.endswith("::value")
        }
        if st:
            # moments on the parameter's device; AdamW keeps its step counter on the CPU
            opt.state[p] = {k: (v.to(p.device) if k != "step" else v.float()) for k, v in st.items()}


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete `checkpoint-*` directory under `out_dir` (one with a train state), if any."""
    found = sorted(
        p
        for p in Path(out_dir).glob("checkpoint-*")
        if (p / "train_state" / "state.json").is_file() and not p.name.endswith(".tmp")
    )
    return found[-1] if found else None


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
