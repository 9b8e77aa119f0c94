"""Resumable training state, written with `torch.distributed.checkpoint` (DCP) under `<checkpoint>/train_state/`:

- `dcp/`: the trainable weights (the model's, or the LoRA adapters) and the optimizer's state, each process
  writing its own shards (in one process, or replicated under ddp, the whole). DCP reshards on load, so a run
  resumes with another number of processes, or another strategy;
- `rng/rank-NNNNN.safetensors`: each process's torch random-number state (restored where the process exists);
- `state.json`, written last: the step, the data position, the config, the log and the fingerprints of the model
  and the data. Resuming refuses a checkpoint from another model, other data or another recipe.

The whole checkpoint directory is written under `<name>.tmp` and renamed when complete (see `Trainer.save`), so a
process killed while saving leaves no half-written checkpoint behind: `latest_checkpoint` skips `.tmp` directories
and ones without `state.json`. Under several machines the output directory must be shared.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from dgemma.training.config import TrainError
from dgemma.training.data import Example

if TYPE_CHECKING:
    from dgemma.training.trainer import Trainer

STATE_DIR = "train_state"
# Config fields a resumed run must share with the checkpoint (others, such as steps, lr or save_every, may change)
RECIPE_KEYS = ("objective", "batch_size", "lora_rank", "lora_alpha", "lora_targets", "seed")


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete `checkpoint-*` directory under `out_dir` (one with a train state), if any."""
    found = sorted(
        p
        for p in Path(out_dir).glob("checkpoint-*")
        if (p / STATE_DIR / "state.json").is_file() and not p.name.endswith(".tmp")
    )
    return found[-1] if found else None


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """The architecture: the config and every tensor's name and (whole, unsharded) shape."""
    shapes = [(n, list(t.shape)) for n, t in model.state_dict().items()]
    return _digest([model.config.to_hf_dict(), shapes])  # type: ignore[operator]


def data_fingerprint(examples: list[Example]) -> str:
    return _digest([[e.prompt, e.response, e.fixed] for e in examples])


def _stateful(tr: Trainer) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The module whose weights train, and DCP's view of it and of the optimizer (sharded tensors under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    module = tr.lora if tr.lora is not None else tr.model
    weights, optim = get_state_dict(module, tr.opt)
    return module, {"weights": weights, "optim": optim}


def save_train_state(tr: Trainer, directory: Path) -> None:
    """Write `directory/train_state/` (a collective under several processes: every process calls it)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    state = directory / STATE_DIR
    _, tensors = _stateful(tr)
    with _one_process_quietly():
        dcp.save(tensors, checkpoint_id=str(state / "dcp"), no_dist=not dist.is_initialized())
    (state / "rng").mkdir(parents=True, exist_ok=True)
    save_file(_rng_state(), str(state / "rng" / f"rank-{tr.dist.rank:05d}.safetensors"))
    if tr.dist.main:
        meta = {
            "step": tr.step,
            "data": {"examples_seen": tr.step * tr.cfg.batch_size, "examples": len(tr.examples)},
            "fingerprint": {"model": model_fingerprint(tr.model), "data": data_fingerprint(tr.examples)},
            "processes": tr.dist.world,
            "strategy": tr.dist.strategy,
            "config": jsonable(asdict(tr.cfg)),
            "log": tr.log,
        }
        (state / "state.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_train_state(tr: Trainer, path: Path) -> None:
    """Restore the trainable weights, the optimizer, the random-number state, the step and the log from `path`."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = path / STATE_DIR
    meta = json.loads((state / "state.json").read_text())
    check_compatible(tr, meta, path)
    if not (state / "dcp").is_dir():
        raise TrainError(f"cannot resume {path}: it has no {STATE_DIR}/dcp (start over with --no-resume)")
    module, tensors = _stateful(tr)
    with _one_process_quietly():
        dcp.load(tensors, checkpoint_id=str(state / "dcp"), no_dist=not dist.is_initialized())
    set_state_dict(module, tr.opt, model_state_dict=tensors["weights"], optim_state_dict=tensors["optim"])
    rng = state / "rng" / f"rank-{tr.dist.rank:05d}.safetensors"
    if rng.is_file():  # (a process the checkpoint did not have keeps its own: no step draws from it)
        _set_rng_state(load_file(str(rng)))
    tr.step = int(meta["step"])
    tr.log = list(meta.get("log", []))


def check_compatible(tr: Trainer, meta: dict[str, Any], path: Path) -> None:
    """TrainError unless the checkpoint comes from this model, these data and this recipe."""
    saved, now = meta["config"], jsonable(asdict(tr.cfg))
    for key in RECIPE_KEYS:
        if saved.get(key) != now[key]:
            raise TrainError(f"cannot resume {path}: it was trained with {key}={saved.get(key)!r}, now {now[key]!r}")
    prints = meta.get("fingerprint", {})
    if prints.get("model") != model_fingerprint(tr.model):
        raise TrainError(
            f"cannot resume {path}: it was trained from another model (another config or tensor shapes); "
            "start over with --no-resume or another --output"
        )
    if prints.get("data") != data_fingerprint(tr.examples):
        raise TrainError(
            f"cannot resume {path}: it was trained on other data ({meta['data']['examples']} examples, now "
            f"{len(tr.examples)}); start over with --no-resume or another --output"
        )


@contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns on every save and load in a single process (no process group) that it assumes one process: it does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(saved: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(saved["cpu"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
