"""The training loop: `Trainer` owns the model, optional LoRA, the optimizer and the step counter.

Losses are normalised by global token counts, so 1 process and N `torchrun` processes (or N accumulation
micro-batches) compute the same update. Weights are saved in the HF format; optimizer state in safetensors (never
pickle).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dgemma.model.checkpoint import load_model, save_model
from dgemma.model.config import token_ids
from dgemma.model.device import resolve_training
from dgemma.model.modeling import DiffusionGemma
from dgemma.training.checkpoints import jsonable, optimizer_tensors, restore_optimizer
from dgemma.training.config import TrainConfig, TrainError
from dgemma.training.data import Batch, Example, batch_indices, collate, corrupt, take
from dgemma.training.distributed import DistInfo, all_reduce
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
    """Owns model, optional LoRA, optimizer and the step counter; `train` runs the loop with checkpoints and logs."""

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
        if self.cfg.batch_size % (self.dist.world * self.cfg.grad_accum):
            raise TrainError(
                f"batch_size {self.cfg.batch_size} must be divisible by processes x grad_accum "
                f"({self.dist.world} x {self.cfg.grad_accum})"
            )
        ids = token_ids(self.model.config.text)
        if not ids.eos:
            raise TrainError("the model config has no eos_token_id: training appends EOS to every response")
        self.pad_id, self.eos_id = ids.pad, ids.eos[0]
        self.lora = (
            LoRA(self.model, self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.lora_targets)
            if self.cfg.lora_rank
            else None
        )
        self.opt = _adamw(self.trainable(), self.cfg)
        self.out_dir = Path(self.out_dir)

    def trainable(self) -> list[nn.Parameter]:
        if self.lora is not None:
            return list(self.lora.parameters())
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, nn.Parameter]:
        if self.lora is not None:
            return {f"lora.{n}": p for n, p in self.lora.named_parameters()}
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

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
        cfg, model = self.cfg, self.model
        model.train()
        batch = self.global_batch(self.step)
        n_diff, n_ar = counts(batch, cfg)
        per_rank = cfg.batch_size // self.dist.world
        per_micro = per_rank // cfg.grad_accum
        lr = lr_at(self.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=False)
        sums = torch.zeros(2)
        for m in range(cfg.grad_accum):
            start = self.dist.rank * per_rank + m * per_micro
            sums += self._backward(take(batch, slice(start, start + per_micro)).to(model.device), n_diff, n_ar)
        params = self.trainable()
        grads = [p.grad for p in params if p.grad is not None]
        all_reduce(grads + [sums], self.dist)
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)) if cfg.clip_norm > 0 else float("nan")
        self.opt.step()
        self.step += 1
        diff = float(sums[0]) / max(n_diff, 1)
        ar = float(sums[1]) / max(n_ar, 1)
        total = diff + cfg.ar_weight * ar if cfg.objective == "diffusion" else ar
        return {
            "step": self.step,
            "loss": total,
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
            enabled=cfg.precision == "bfloat16",
        ):
            parts = loss_parts(model, micro, cfg)
        loss = (parts.ar_sum / max(n_ar, 1)) * (cfg.ar_weight if cfg.objective == "diffusion" else 1.0)
        if cfg.objective == "diffusion":
            loss = loss + parts.diffusion_sum / max(n_diff, 1)
        loss.backward()
        return torch.stack([parts.diffusion_sum.detach().float().cpu(), parts.ar_sum.detach().float().cpu()])

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, final: bool = False) -> Path:
        """Write `checkpoint-<step>/` (HF weights, LoRA merged, plus `train_state/` for resuming); `final/` at the
        end. Only the main process writes."""
        path = self.out_dir / ("final" if final else f"checkpoint-{self.step:06d}")
        if not self.dist.main:
            return path
        tmp = path.with_name(path.name + ".tmp")
        if self.lora is not None:
            self.lora.merge(+1)
        try:
            save_model(self.model, tmp, generation_config=self.generation_config, tokenizer_dir=self.tokenizer_dir)
        finally:
            if self.lora is not None:
                self.lora.merge(-1)
        state = tmp / "train_state"
        state.mkdir(exist_ok=True)
        save_file(
            optimizer_tensors(self.opt, self.named_trainable(), values=self.lora is not None),
            str(state / "optimizer.safetensors"),
        )
        meta = {"step": self.step, "config": jsonable(asdict(self.cfg)), "log": self.log}
        (state / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
        if path.exists():
            import shutil

            shutil.rmtree(path)
        tmp.rename(path)  # atomic: an interrupted save never leaves a half-written checkpoint behind
        write_loss_plot(self.log, self.out_dir / "loss.svg")
        return path

    def resume(self, path: Path) -> None:
        """Restore weights (or LoRA adapters), optimizer moments, step and log from a `checkpoint-*` directory."""
        state = path / "train_state"
        meta = json.loads((state / "state.json").read_text())
        saved = meta["config"]
        for key in ("objective", "batch_size", "lora_rank", "seed"):
            if saved.get(key) != jsonable(asdict(self.cfg))[key]:
                raise TrainError(
                    f"cannot resume {path}: it was trained with {key}={saved.get(key)!r}, "
                    f"now {getattr(self.cfg, key)!r}"
                )
        tensors = load_file(str(state / "optimizer.safetensors"))
        named = self.named_trainable()
        if self.lora is None:
            loaded = load_model(path, dtype=self.model.dtype, device=self.model.device)
            self.model.load_state_dict(loaded.state_dict())
        else:
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(tensors[f"{n}::value"])
        restore_optimizer(self.opt, named, tensors)
        self.step = int(meta["step"])
        self.log = list(meta.get("log", []))

    # -- the loop ---------------------------------------------------------------------------------------------
    def train(self, progress: bool = True, on_log: Callable[[dict[str, Any]], None] | None = None) -> Path:
        """Run until `cfg.steps`, logging every `log_every` steps to `train_log.jsonl`; returns the final dir."""
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(
            total=self.cfg.steps,
            initial=self.step,
            disable=not (progress and self.dist.main),
            desc=f"train ({self.cfg.objective})",
            unit="step",
            dynamic_ncols=True,
        )
        t0 = time.perf_counter()
        acc: list[dict[str, float]] = []
        while self.step < self.cfg.steps:
            rec = self.train_step()
            acc.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                entry = log_entry(acc, self.cfg.objective, round(time.perf_counter() - t0, 2))
                acc = []
                self.log.append(entry)
                if self.dist.main:
                    with (self.out_dir / "train_log.jsonl").open("a") as f:
                        f.write(json.dumps(entry) + "\n")
                if on_log is not None:
                    on_log(entry)
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
                self.save()
        bar.close()
        return self.save(final=True)


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
