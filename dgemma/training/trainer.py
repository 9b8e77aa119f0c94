"""The training loop: `Trainer` owns the model, optional LoRA, the optimizer and the step counter.

Losses are normalised by global token counts, so 1 process and N `torchrun` processes (or N accumulation
micro-batches) compute the same update, data parallel (ddp) or sharded (fsdp). Checkpoints hold the HF model
(`export.py`) and the resumable state (`checkpoints.py`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dgemma.model.config import token_ids
from dgemma.model.device import resolve_training
from dgemma.model.modeling import DiffusionGemma
from dgemma.training.activations import checkpoint_feed_forward
from dgemma.training.checkpoints import load_train_state, save_train_state
from dgemma.training.config import TrainConfig, TrainError
from dgemma.training.data import Batch, Example, batch_indices, collate, corrupt, take
from dgemma.training.distributed import DistInfo, all_reduce, barrier, check_batch, peers_watched
from dgemma.training.export import export_model
from dgemma.training.fsdp import full, is_sharded, shard_model, shard_sizes
from dgemma.training.lora import LoRA
from dgemma.training.objectives import counts, loss_parts
from dgemma.training.report import log_entry, write_loss_plot


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine down to `lr * final_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.final_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))


@dataclass
class Trainer:
    """Owns model, optional LoRA, optimizer and the step counter; `train` runs the loop with checkpoints and logs.

    Under `dist.strategy` "fsdp" the model is sharded with FSDP2 (see `fsdp.py`) unless it already is."""

    model: DiffusionGemma
    examples: list[Example]
    cfg: TrainConfig
    out_dir: Path
    generation_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    dist: DistInfo = field(default_factory=DistInfo)
    step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cfg.validate()
        if self.cfg.precision == "auto":  # the concrete choice is what checkpoints record
            prec = resolve_training(self.model.device, "auto").dtype
            self.cfg = replace(self.cfg, precision="bfloat16" if prec == torch.bfloat16 else "float32")
        check_batch(self.cfg, self.dist.world)
        ids = token_ids(self.model.config.text)
        if not ids.eos:
            raise TrainError("the model config has no eos_token_id: training appends EOS to every response")
        self.pad_id, self.eos_id = ids.pad, ids.eos[0]
        if self.cfg.activation_checkpointing:
            checkpoint_feed_forward(self.model)
        if self.dist.sharded and not is_sharded(self.model.embed_tokens.weight):
            shard_model(self.model, self.bf16_params)
        cfg = self.cfg
        self.lora = (
            LoRA(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed) if cfg.lora_rank else None
        )
        self.opt = _adamw(self.trainable(), self.cfg)
        self.out_dir = Path(self.out_dir)

    @property
    def bf16_params(self) -> bool:
        """FSDP's mixed precision: bfloat16 gathered weights (float32 shards and reductions); else autocast."""
        return self.dist.sharded and self.cfg.precision == "bfloat16"

    def trainable(self) -> list[nn.Parameter]:
        if self.lora is not None:
            return list(self.lora.parameters())
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- one step ----------------------------------------------------------------------------------------------
    def global_batch(self, step: int) -> Batch:
        """The examples of `step` (an epoch-wise permutation seeded by seed and epoch), corrupted."""
        idx = batch_indices(len(self.examples), self.cfg.batch_size, step, self.cfg.seed)
        text = self.model.config.text
        batch = collate(
            [self.examples[i] for i in idx], self.model.config.canvas_length, self.pad_id, self.eos_id, text.vocab_size
        )
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + 1_000_000_007 * (step + 1))
        return corrupt(batch, text.vocab_size, self.cfg, g)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch: this process's share, in `grad_accum` micro-batches."""
        cfg = self.cfg
        self.model.train()
        batch = self.global_batch(self.step)
        n_diff, n_ar = counts(batch, cfg)
        lr = lr_at(self.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=False)
        per_rank = cfg.batch_size // self.dist.world
        per_micro = per_rank // cfg.grad_accum
        sums = torch.zeros(2)
        for m in range(cfg.grad_accum):
            start = self.dist.rank * per_rank + m * per_micro
            sums += self._backward(take(batch, slice(start, start + per_micro)).to(self.model.device), n_diff, n_ar)
        gnorm = self._reduce_and_clip(sums)
        self.opt.step()
        self.step += 1
        diff = float(sums[0]) / max(n_diff, 1)
        ar = float(sums[1]) / max(n_ar, 1)
        return {
            "step": self.step,
            "loss": diff + cfg.ar_weight * ar if cfg.objective == "diffusion" else ar,
            "diffusion_loss": diff if cfg.objective == "diffusion" else None,
            "ar_loss": ar if cfg.uses_ar_loss else None,
            "lr": lr,
            "grad_norm": gnorm,
        }

    def _backward(self, micro: Batch, n_diff: int, n_ar: int) -> torch.Tensor:
        """Backpropagate one micro-batch's share of the global mean loss; its (diffusion, AR) loss sums (2,)."""
        cfg, model = self.cfg, self.model
        with torch.autocast(
            "cpu" if model.device.type == "cpu" else model.device.type,
            dtype=torch.bfloat16,
            enabled=cfg.precision == "bfloat16" and not self.bf16_params,
        ):
            parts = loss_parts(model, micro, cfg, torch.bfloat16 if self.bf16_params else None, self.dist.sharded)
        loss = (parts.ar_sum / max(n_ar, 1)) * (cfg.ar_weight if cfg.objective == "diffusion" else 1.0)
        if cfg.objective == "diffusion":
            loss = loss + parts.diffusion_sum / max(n_diff, 1)
        loss.backward()
        return torch.stack([parts.diffusion_sum.detach().float().cpu(), parts.ar_sum.detach().float().cpu()])

    def _reduce_and_clip(self, sums: torch.Tensor) -> float:
        """Sum the loss sums (2,) over the processes, and the gradients that are not sharded (all of them under
        ddp; the replicated LoRA adapters under fsdp, which has reduce-scattered the model's already); clip the
        gradient norm (over the shards under fsdp). Returns the norm before clipping (nan when not clipping)."""
        params = self.trainable()
        if (self.dist.strategy == "ddp" or self.lora is not None) and self.dist.world > 1:
            _all_reduce_grads(params, sums, self.dist, self.model.device)
        else:
            all_reduce([sums], self.dist, device=self.model.device)
        if self.cfg.clip_norm <= 0:
            return float("nan")
        return float(full(torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_norm)))

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, final: bool = False) -> Path:
        """Write `checkpoint-<step>/` (the HF model, LoRA merged, plus `train_state/` for resuming); `final/` at the
        end. Written under `<name>.tmp` and renamed when complete (a collective: every process calls it)."""
        path = self.out_dir / ("final" if final else f"checkpoint-{self.step:06d}")
        tmp = path.with_name(path.name + ".tmp")
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.dist)
        export_model(self, tmp)
        save_train_state(self, tmp)
        barrier(self.dist)
        if self.dist.main:
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)  # atomic: an interrupted save never leaves a half-written checkpoint behind
            write_loss_plot(self.log, self.out_dir / "loss.svg")
        barrier(self.dist)
        return path

    def resume(self, path: Path) -> None:
        """Restore weights (or LoRA adapters), optimizer, random state, step and log from a checkpoint directory
        (written with any number of processes and strategy)."""
        load_train_state(self, path)

    # -- the loop ---------------------------------------------------------------------------------------------
    def train(self, progress: bool = True, on_log: Callable[[dict[str, Any]], None] | None = None) -> Path:
        """Run until `cfg.steps`, logging every `log_every` steps to `train_log.jsonl`; returns the final dir.
        A collective that fails (another process died or hung past `dist_timeout`) ends the run with a TrainError."""
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(
            total=self.cfg.steps,
            initial=self.step,
            disable=not (progress and self.dist.main),
            desc=f"train ({self.cfg.objective}, {self.dist.strategy})",
            unit="step",
            dynamic_ncols=True,
        )
        t0, acc, first = time.perf_counter(), [], self.step
        with peers_watched(self.dist, lambda: f"at step {self.step + 1}"):
            while self.step < self.cfg.steps:
                rec = self.train_step()
                acc.append(rec)
                if self.step == first + 1 and self.dist.sharded:
                    self._report_shards()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    self._log(acc, round(time.perf_counter() - t0, 2), on_log)
                    acc = []
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
                    self.save()
            bar.close()
            return self.save(final=True)

    def _log(self, acc: list[dict[str, Any]], elapsed_s: float, on_log: Callable[[dict[str, Any]], None] | None):
        entry = log_entry(acc, self.cfg.objective, elapsed_s)
        self.log.append(entry)
        if self.dist.main:
            with (self.out_dir / "train_log.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")
        if on_log is not None:
            on_log(entry)

    def _report_shards(self) -> None:
        """One line per process on stderr: how much of the model and of the optimizer's state it holds."""
        s = shard_sizes(list(self.model.parameters()), self.opt)
        print(
            f"dgemma: rank {self.dist.rank} of {self.dist.world} holds {s['params_local']:,} of {s['params_total']:,} "
            f"parameter elements ({s['params_local'] / max(s['params_total'], 1):.1%}) and {s['optim_local']:,} of "
            f"{s['optim_total']:,} optimizer-state elements ({s['optim_local'] / max(s['optim_total'], 1):.1%})",
            file=sys.stderr,
            flush=True,
        )


def _all_reduce_grads(params: list[nn.Parameter], sums: torch.Tensor, info: DistInfo, device: torch.device) -> None:
    """One all-reduce of every parameter's gradient and of `sums`. A weight no row of this process used has no
    gradient here (the self-conditioning MLP without self-conditioned rows) but may have one elsewhere: it sends
    zeros, and it stays without a gradient (skipped by the optimizer, as in one process) only where no process
    used it."""
    used = torch.tensor([float(p.grad is not None) for p in params])
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce([used, *(p.grad for p in params), sums], info, device=device)
    for p, u in zip(params, used.tolist()):
        if u == 0:
            p.grad = None


def _adamw(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms' scales and biases)."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
    )
