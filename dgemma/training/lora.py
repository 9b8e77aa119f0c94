"""LoRA: low-rank adapters beside the frozen linears of a model."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from dgemma.model.modeling import DiffusionGemma
from dgemma.training.config import TrainError


class LoRA(nn.Module):
    """Low-rank adapters beside frozen linears: y = W x + (alpha / r) * B A x. Kept outside the model (forward hooks),
    so the model's parameter names stay the checkpoint's; `merge` folds them into the weights for saving."""

    def __init__(self, model: DiffusionGemma, rank: int, alpha: float, targets: Iterable[str], seed: int = 0):
        super().__init__()
        targets = tuple(targets)
        self.scale = alpha / rank
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self._modules_by_key: dict[str, nn.Linear] = {}
        self._hooks = []
        g = torch.Generator().manual_seed(seed)  # the same adapters in every process, whatever ran before
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                key, dev = name.replace(".", "__"), mod.weight.device
                a = torch.randn(rank, mod.in_features, generator=g) / math.sqrt(mod.in_features)
                self.A[key] = nn.Parameter(a.to(dev))
                self.B[key] = nn.Parameter(torch.zeros(mod.out_features, rank, device=dev))  # starts as no change
                self._modules_by_key[key] = mod
                self._hooks.append(mod.register_forward_hook(self._hook(key)))
        if not self.A:
            raise TrainError(f"no linear layer matches the LoRA targets {list(targets)}")
        for p in model.parameters():
            p.requires_grad_(False)

    def _hook(self, key: str) -> Callable:
        def hook(mod: nn.Linear, inputs: tuple[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            return out + (x.to(self.A[key].dtype) @ self.A[key].t() @ self.B[key].t() * self.scale).to(out.dtype)

        return hook

    def merged(self, weight_name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight`, the model weight named `weight_name` (e.g. "layers.0.self_attn.q_proj.weight"), with its
        adapters' change added (as `merge` adds it, to the bit), or as it is when it has no adapters."""
        key = weight_name.removesuffix(".weight").replace(".", "__")
        if not weight_name.endswith(".weight") or key not in self.A:
            return weight
        return weight.add((self.B[key] @ self.A[key]).to(weight.dtype), alpha=self.scale)

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        """Add (sign=1) or remove (sign=-1) the adapters' product from the base weights."""
        for key, mod in self._modules_by_key.items():
            mod.weight.add_((self.B[key] @ self.A[key]).to(mod.weight.dtype), alpha=sign * self.scale)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
