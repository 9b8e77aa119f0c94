"""Loading one rank's shard of a checkpoint: each rank reads only its rows and columns of each tensor from the
safetensors files (`safe_open(...).get_slice`), so no rank ever holds the whole checkpoint.

The checks of `checkpoint.load_model` apply (config, quantization, missing, unexpected and misshapen tensors, float
dtypes), against the full model's shapes; the encoder, decoder and LM-head copies of a tied weight are not compared
(that would read them whole): the first copy found is used. FP8 shards the same way: a saved FP8 checkpoint's
weights and their per-output-channel scales are sliced together; a bf16 checkpoint is quantized after slicing
(row-parallel shards then scale each output row over their own columns).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dgemma.model.checkpoint import (
    SKIPPED,
    CheckpointError,
    checked_config,
    saved_in_fp8,
    weight_files,
    hf_to_ours,
    ours_to_hf,
)
from dgemma.model.modeling import DiffusionGemma
from dgemma.model.quant import quantize_fp8
from dgemma.parallel.comm import Comm
from dgemma.parallel.layers import shard_modules, wire
from dgemma.parallel.plan import Plan


def load_shard(
    path: str | Path,
    rank: int,
    world: int,
    comm: Comm | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantization: str | None = None,
) -> DiffusionGemma:
    """Rank `rank`'s shard of the checkpoint at `path`, split `world` ways, wired to `comm` (None: unwired, for tests
    that only inspect the weights). Raises CheckpointError as `load_model` does, ShardError if it cannot split."""
    path = Path(path)
    config, quantization = checked_config(path, quantization, dtype)
    saved_fp8 = saved_in_fp8(config)
    plan = Plan(config.text, rank, world)
    with torch.device("meta"):
        model = DiffusionGemma(config)
    full = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    shard_modules(model, plan)
    model = model.to_empty(device=device).to(dtype)
    model.init_buffers()
    if saved_fp8:  # the FP8 layout first (its values are overwritten by the checkpoint's)
        quantize_fp8(model)
    _fill(model, plan, path, full)
    if quantization == "fp8" and not saved_fp8:
        quantize_fp8(model)
    if comm is not None:
        wire(model, plan, comm)
    return model.eval()


def _full_shape(name: str, full: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The whole tensor's shape of parameter `name`: an FP8 scale has one per output row of its weight."""
    if name in full:
        return full[name]
    if name.endswith(".weight_scale") and name[: -len("_scale")] in full:
        return full[name[: -len("_scale")]][:1]
    if name.endswith("_proj_scale") and name[: -len("_scale")] in full:  # experts: (E, out)
        return full[name[: -len("_scale")]][:2]
    return None


def _index(path: Path) -> dict[str, tuple[Path, str]]:
    """Our parameter name -> (file, checkpoint key) of its first copy; vision weights skipped."""
    index: dict[str, tuple[Path, str]] = {}
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    name = None if key.startswith(SKIPPED) else hf_to_ours(key)
                    if name is not None:
                        index.setdefault(name, (f, key))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f} is truncated or corrupt: {e}") from None
    return index


def _scalars(index: dict[str, tuple[Path, str]], layers: int) -> dict[str, tuple[Path, str] | None]:
    """The layer scalars as `load_model` reads them: one of the encoder's and decoder's serves both; none: ones."""
    out: dict[str, tuple[Path, str] | None] = {}
    for i in range(layers):
        dec, enc = f"layers.{i}.layer_scalar", f"layers.{i}.encoder_layer_scalar"
        found = index.get(dec) or index.get(enc)
        out[dec], out[enc] = index.get(dec, found), index.get(enc, found)
    return out


def _fill(model: DiffusionGemma, plan: Plan, path: Path, full: dict[str, tuple[int, ...]]) -> None:
    """Copy this rank's slice of every tensor from the checkpoint into `model` (see the module docstring)."""
    index = _index(path)
    sources = {**index, **_scalars(index, plan.text.num_hidden_layers)}
    expected = model.state_dict(keep_vars=True)
    unexpected = sorted(n for n in index if _full_shape(n, full) is None)
    if unexpected:
        raise CheckpointError(f"{path}: tensors not in the model described by config.json: {unexpected[:8]}")
    missing = sorted(n for n in expected if n not in sources)
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    with ExitStack() as files, torch.no_grad():
        handles: dict[Path, object] = {}
        for name, target in expected.items():
            src = sources[name]
            if src is None:  # a layer scalar the checkpoint does not carry
                target.fill_(1.0)
                continue
            f, key = src
            if f not in handles:
                handles[f] = files.enter_context(safe_open(str(f), framework="pt"))
            target.copy_(_read(handles[f], key, name, plan, _full_shape(name, full), path).to(target.dtype))


def _read(fh, key: str, name: str, plan: Plan, shape: tuple[int, ...] | None, path: Path) -> torch.Tensor:
    """This rank's slice of checkpoint tensor `key` (our `name`), after checking its full shape and dtype."""
    sl = fh.get_slice(key)
    got = tuple(sl.get_shape())
    if shape is not None and got != shape:
        raise CheckpointError(f"{path}: tensor {ours_to_hf(name)} has shape {got} but config.json implies {shape}")
    part = plan.slice_of(name)
    if part is None:
        t = sl[:]
    else:
        dim, a, b = part
        t = sl[a:b] if dim == 0 else sl[:, a:b]
    if not t.is_floating_point():
        raise CheckpointError(f"{path}: tensor {ours_to_hf(name)} has non-float dtype {t.dtype}")
    return t
