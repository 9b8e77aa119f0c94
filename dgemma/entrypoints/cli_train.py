"""`dgemma train`: its flags, derived from `TrainConfig` (`TRAIN_FLAGS`; `RECIPE_FLAGS` for the task recipes), and
the run."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from dgemma.entrypoints.flags import CLIError
from dgemma.entrypoints.flags import positive_int as _positive_int

from dgemma.entrypoints.cli import EXIT_OK, register, training_placement

if TYPE_CHECKING:  # imported lazily at run time: `dgemma --help` should not wait for torch more than needed
    pass


# -- train ------------------------------------------------------------------------------------------------------------
PRECISIONS = ("auto", "float32", "bfloat16")
PRECISION_HELP = (
    "bfloat16: autocast matmuls with float32 master weights; auto: bfloat16 on a GPU with native bf16, float32 "
    "elsewhere"
)

# `dgemma train`'s flags: one per TrainConfig field named here (type, default and choices come from the field).
TRAIN_FLAGS: dict[str, dict[str, Any]] = {
    "objective": {
        "group": "objective",
        "help": "diffusion: the published block-diffusion SFT loss (+ the encoder's AR loss); ar: a plain causal LM, "
        "the baseline",
    },
    "steps": {"group": "optimisation", "ge": 1, "help": "optimizer steps"},
    "batch_size": {"group": "optimisation", "ge": 1, "help": "global examples per step, over all processes"},
    "grad_accum": {"group": "optimisation", "ge": 1, "help": "micro-batches per step per process"},
    "lr": {"group": "optimisation", "help": "peak learning rate (cosine decay after the warm-up)"},
    "warmup_steps": {"group": "optimisation", "help": "steps of linear learning-rate warm-up"},
    "weight_decay": {"group": "optimisation", "help": "AdamW weight decay of the matrices"},
    "clip_norm": {"group": "optimisation", "help": "gradient-norm clipping; 0 turns it off"},
    "ar_weight": {"group": "objective", "help": "weight of the encoder AR loss"},
    "prompt_loss": {"group": "objective", "help": "next-token loss on prompt tokens too"},
    "self_cond_prob": {"group": "objective", "help": "probability of training with self-conditioning"},
    "template_prob": {
        "group": "objective",
        "help": "examples with a 'fixed' list keep those response positions uncorrupted with this probability, to "
        "train for inference with templates",
    },
    "lora_rank": {"group": "optimisation", "help": "LoRA rank; 0 trains every weight"},
    "lora_alpha": {"group": "optimisation", "help": "LoRA scale: the adapters' update is multiplied by alpha / rank"},
    "lora_targets": {
        "group": "optimisation",
        "help": "comma-separated linear layer names (default: all attention and MLP projections)",
    },
    "precision": {"group": "optimisation", "help": PRECISION_HELP + " (float32 stays the CPU default)"},
    "seed": {"group": "run", "help": "seed of the batch order, the corruption and new LoRA weights"},
    "save_every": {"group": "run", "help": "checkpoint every N steps (default: end only)"},
    "log_every": {"group": "run", "ge": 1, "help": "log the loss to train_log.jsonl every N steps"},
    "strategy": {
        "group": "processes and memory",
        "help": "single: one process; ddp: data parallel, every process holds the whole model and gradients are "
        "all-reduced; fsdp: FSDP2, parameters, gradients and optimizer state sharded over the processes (bf16 "
        "weights with float32 gradient reduction at --precision bfloat16); ddp and fsdp run under torchrun; auto: "
        "ddp under torchrun with several processes, else single",
    },
    "activation_checkpointing": {
        "group": "processes and memory",
        "help": "recompute each layer's feed-forward block in the backward pass instead of keeping its activations",
    },
    "dist_timeout": {
        "group": "processes and memory",
        "metavar": "SECONDS",
        "help": "how long a collective waits for the other processes: a process that died or hung ends the run with "
        "an error after at most this",
    },
}


# The task recipes' flags (`dgemma sudoku train`, `dgemma code train`) for the fields that both recipes have.
RECIPE_FLAGS: dict[str, dict[str, Any]] = {
    "out_dir": {
        "flag": "--output",
        "short": "-o",
        "metavar": "DIR",
        "help": "where data/, init/ and one checkpoint directory per objective go; re-running resumes",
    },
    "hidden": {"ge": 1, "help": "hidden size of the model"},
    "layers": {"ge": 1, "help": "transformer layers"},
    "steps": {"ge": 1, "help": "optimizer steps per objective"},
    "batch_size": {"ge": 1, "help": "examples per optimizer step"},
    "lr": {"help": "peak learning rate"},
    "threads": {"ge": 1, "help": "torch threads per process"},
    "precision": {"choices": PRECISIONS, "help": PRECISION_HELP},
    "device": {"help": "auto (this process's GPU if there is one, else the CPU), cpu, cuda or cuda:N"},
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """`dgemma train`'s flags: the data and output paths, then `TRAIN_FLAGS`, then how the run goes."""
    from dgemma.entrypoints.flags import add_flags
    from dgemma.training.config import TrainConfig

    p.add_argument("--model", "-m", required=True, metavar="PATH", help="checkpoint to start from (HF format)")
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help='JSONL training data: {"prompt": ..., "completion": ...}, {"messages": [...]} (the last '
        'turn, an assistant one, is learned) or {"prompt_ids": [...], "completion_ids": [...]}',
    )
    p.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="DIR",
        help="where checkpoint-N/, final/, train_log.jsonl and loss.svg go; re-running resumes from "
        "the newest checkpoint-N/ there",
    )
    g = add_flags(p, TrainConfig, TRAIN_FLAGS)["run"]
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="torch threads per process")
    g.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda or cuda:N (default: auto: this process's GPU if there is one, under torchrun the "
        "LOCAL_RANK-th, else the CPU)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint-N/ in OUTPUT, and fail if there is none (without --resume or "
        "--no-resume: continue when there is one)",
    )
    g.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has checkpoints")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dgemma.entrypoints.flags import from_args
    from dgemma.model.device import dtype_name
    from dgemma.training.checkpoints import latest_checkpoint
    from dgemma.training.config import TrainConfig
    from dgemma.training.train import run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume and args.no_resume:
        raise CLIError("--resume and --no-resume contradict each other")
    if args.resume and latest_checkpoint(Path(args.output)) is None:
        raise CLIError(f"--resume: {args.output} has no complete checkpoint-N/ to continue from")
    where = training_placement(args.device, args.precision)
    cfg = from_args(TrainConfig, args, TRAIN_FLAGS, precision=dtype_name(where.dtype))
    final = run_training(
        args.model, args.data, args.output, cfg, resume=not args.no_resume, progress=not args.quiet, device=where.device
    )
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"wrote {final}")
    return EXIT_OK


register(
    "train",
    "fine-tune a checkpoint (block-diffusion SFT or the AR baseline; LoRA; torchrun)",
    add_train_arguments,
    run_train,
    "Fine-tune a DiffusionGemma checkpoint on JSONL data with the published block-diffusion objective\n"
    "(or --objective ar). Writes HF-format checkpoints; re-running the same command resumes.\n"
    "Several processes: torchrun --nproc-per-node N -m dgemma.entrypoints.cli train ... [--strategy fsdp]\n"
    "(data parallel by default, FSDP2-sharded with --strategy fsdp; gloo on CPU, nccl on GPU).",
)
