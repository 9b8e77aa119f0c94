"""`run_training`: load a checkpoint and its data, fine-tune it (one process, or under `torchrun` data parallel or
FSDP-sharded), write the result."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from dgemma.model.checkpoint import load_generation_config, load_model
from dgemma.model.device import resolve_training, training_device
from dgemma.model.modeling import DiffusionGemma
from dgemma.training.checkpoints import latest_checkpoint
from dgemma.training.config import TrainConfig
from dgemma.training.data import Example, load_examples
from dgemma.training.distributed import DistInfo, check_batch, process_group, resolve_strategy
from dgemma.training.fsdp import load_sharded
from dgemma.training.trainer import Trainer


def run_training(
    model_path: str | Path,
    data: list[Example] | str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    resume: bool = True,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "auto",
) -> Path:
    """Load a checkpoint, fine-tune it on `data` (examples or a JSONL path) and write HF checkpoints to `out_dir`.

    With `resume`, continues from the newest `checkpoint-*` in `out_dir`. `device` "auto" (or None): this process's
    GPU when there is one, else the CPU. `dtype` is the master weights' dtype: float32 (bf16 compute is
    `cfg.precision`, whose "auto" picks bfloat16 on GPUs). `cfg.strategy` says how the processes that torchrun
    started share the work (see `TrainConfig`); a launch that cannot work is refused before any model is loaded.
    Returns the `final/` directory."""
    from dgemma.text.tokenizer import Tokenizer

    cfg.validate()
    check_batch(cfg, resolve_strategy(cfg.strategy)[1])
    dev = training_device(device)
    if cfg.precision == "auto":  # (FSDP's mixed-precision policy is fixed when the model is sharded)
        cfg = replace(cfg, precision="bfloat16" if resolve_training(dev, "auto").dtype == torch.bfloat16 else "float32")
    with process_group(cfg.strategy, cfg.dist_timeout) as info:
        torch.manual_seed(cfg.seed)
        model_path = Path(model_path)
        model = _load(model_path, dtype, dev, info, cfg)
        examples = data if isinstance(data, list) else load_examples(data, Tokenizer.from_dir(model_path))
        trainer = Trainer(
            model,
            examples,
            cfg,
            Path(out_dir),
            generation_config=load_generation_config(model_path),
            tokenizer_dir=model_path if (model_path / "tokenizer.json").is_file() else None,
            dist=info,
        )
        if resume and (ck := latest_checkpoint(Path(out_dir))) is not None:
            trainer.resume(ck)
        return trainer.train(progress=progress)


def _load(path: Path, dtype: torch.dtype, device: torch.device, info: DistInfo, cfg: TrainConfig) -> DiffusionGemma:
    """The model to train: sharded as it is read under fsdp (no process holds it whole), else whole."""
    if info.sharded:
        return load_sharded(path, device, dtype, bf16=cfg.precision == "bfloat16")
    return load_model(path, dtype=dtype, device=device)
