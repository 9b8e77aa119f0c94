"""`run_training`: load a checkpoint and its data, fine-tune it (one process or under `torchrun`), write the result."""

from __future__ import annotations

from pathlib import Path

import torch

from dgemma.model.checkpoint import load_generation_config, load_model
from dgemma.model.device import training_device
from dgemma.training.checkpoints import latest_checkpoint
from dgemma.training.config import TrainConfig
from dgemma.training.data import Example, load_examples
from dgemma.training.distributed import init_distributed
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
    `cfg.precision`, whose "auto" picks bfloat16 autocast on GPUs). Returns the `final/` directory."""
    from dgemma.text.tokenizer import Tokenizer

    info = init_distributed()
    torch.manual_seed(cfg.seed)
    model_path = Path(model_path)
    model = load_model(model_path, dtype=dtype, device=training_device(device))
    tok_dir = model_path if (model_path / "tokenizer.json").is_file() else None
    examples = data if isinstance(data, list) else load_examples(data, Tokenizer.from_dir(model_path))
    trainer = Trainer(
        model,
        examples,
        cfg,
        Path(out_dir),
        generation_config=load_generation_config(model_path),
        tokenizer_dir=tok_dir,
        dist=info,
    )
    if resume and (ck := latest_checkpoint(Path(out_dir))) is not None:
        trainer.resume(ck)
    return trainer.train(progress=progress)
