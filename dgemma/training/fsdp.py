"""FSDP2 (`torch.distributed.fsdp.fully_shard`): the model's parameters, gradients and optimizer state sharded over
the processes, one FSDP unit per layer and one at the root (embeddings, final norm, self-conditioning MLP).

- Each layer's weights are all-gathered just before the layer runs and freed after it (forward and backward), so a
  process holds its 1/N shard plus about one layer in full at a time.
- Gradients are reduce-scattered as sums: losses are normalised by global token counts (see `trainer.py`), so the
  sum over processes is the gradient of the global batch, as in one process.
- Mixed precision where the device has bf16 (`precision` bfloat16): parameters gathered and computed in bfloat16,
  gradients reduced and applied to float32 shards. With float32 nothing is cast (the CPU tests compare exactly).
- The model runs through `encode`, `denoise` and `logits`, not `forward`, so those are registered as forward
  methods (the root's weights are gathered around them).
- A sharded model is built on the meta device and filled from the HF checkpoint one tensor at a time, each process
  keeping its shard, so no process ever holds the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from dgemma.model.checkpoint import CheckpointError, hf_to_ours, load_config, weight_files
from dgemma.model.modeling import DiffusionGemma
from dgemma.training.config import TrainError

FORWARD_METHODS = ("encode", "denoise", "logits")


def shard_model(model: DiffusionGemma, bf16: bool) -> None:
    """Apply FSDP2 in place: every layer, then the root. `bf16`: gather and compute in bfloat16, reduce in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw: dict[str, Any] = {"mp_policy": policy} if policy is not None else {}
    for layer in model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)
    for unit in (model, *model.layers):
        unit.set_gradient_divide_factor(1.0)  # a sum, not a mean over the processes
        unit.set_force_sum_reduction_for_comms(True)  # (a plain sum: gloo has no pre-multiplied sum)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t` (all of it when `t` is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of `t`, gathered from every process when sharded (a collective: every process must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def shard_sizes(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> dict[str, int]:
    """Elements of the parameters and of the optimizer's moments: held here, and in the whole model."""
    states = [v for st in opt.state.values() for k, v in st.items() if k != "step" and torch.is_tensor(v)]
    return {
        "params_local": sum(local(p).numel() for p in params),
        "params_total": sum(p.numel() for p in params),
        "optim_local": sum(local(v).numel() for v in states),
        "optim_total": sum(v.numel() for v in states),
    }


def layer_groups(model: nn.Module) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """The model's state dict in FSDP units: ("root", the tensors outside the layers), then ("layers.i", ...)."""
    state = model.state_dict()
    n = len(model.layers)  # type: ignore[arg-type]
    yield "root", {k: v for k, v in state.items() if not k.startswith("layers.")}
    for i in range(n):
        yield f"layers.{i}", {k: v for k, v in state.items() if k.startswith(f"layers.{i}.")}


# -- building a sharded model from an HF checkpoint -------------------------------------------------------------------
def load_sharded(path: str | Path, device: torch.device, dtype: torch.dtype, bf16: bool) -> DiffusionGemma:
    """The checkpoint at `path` as an FSDP2 model with `dtype` shards on `device`, built on the meta device and
    filled one tensor at a time (each process reads a tensor, keeps its shard and drops the rest)."""
    path = Path(path)
    config = load_config(path)
    if (config.extra.get("quantization_config") or {}).get("quant_method"):
        raise TrainError(f"{path}: a quantized checkpoint cannot be fine-tuned; start from its bf16 or fp32 weights")
    with torch.device("meta"):
        model = DiffusionGemma(config).to(dtype)
    shard_model(model, bf16)
    model.to_empty(device=device)
    model.init_buffers()
    _fill(model, path)
    return model


def _fill(model: DiffusionGemma, path: Path) -> None:
    """Copy the checkpoint's tensors into `model`'s shards (tied copies are read once; a layer scalar present only
    for the encoder or the decoder serves both)."""
    from torch.distributed.tensor import distribute_tensor

    targets = model.state_dict()
    seen: set[str] = set()
    with torch.no_grad():
        for f in weight_files(path):
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    name = hf_to_ours(key)
                    if name is None or name in seen:
                        continue
                    if name not in targets:
                        raise CheckpointError(f"{path}: tensor {key} is not in the model described by config.json")
                    t, target = fh.get_tensor(key), targets[name]
                    if tuple(t.shape) != tuple(target.shape):
                        raise CheckpointError(f"{path}: tensor {key} has shape {tuple(t.shape)}, not {target.shape}")
                    t = t.to(device=target.device, dtype=target.dtype)
                    if is_sharded(target):
                        t = distribute_tensor(t, target.device_mesh, target.placements, src_data_rank=None).to_local()
                    local(target).copy_(t)
                    seen.add(name)
        _pair_scalars(model, targets, seen)
    missing = sorted(set(targets) - seen)
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}")


def _pair_scalars(model: DiffusionGemma, targets: dict[str, torch.Tensor], seen: set[str]) -> None:
    for i in range(len(model.layers)):
        dec, enc = f"layers.{i}.layer_scalar", f"layers.{i}.encoder_layer_scalar"
        if dec in seen and enc not in seen:
            targets[enc].copy_(targets[dec])
        elif enc in seen and dec not in seen:
            targets[dec].copy_(targets[enc])
        seen.update((dec, enc))  # neither: both stay 1 (init_buffers)
