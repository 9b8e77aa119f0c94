"""Fine-tuning: the published block-diffusion SFT objective, the autoregressive baseline, LoRA and data parallelism.

The diffusion objective (DESIGN.md, "Training facts"), per example:

- the response (plus EOS, padded to whole canvases) is cut into canvases of `canvas_length` tokens;
- t ~ U(eps, 1); every supervised canvas position is replaced by a uniformly random token with probability t;
- the model runs exactly as at inference: the encoder reads the clean prompt, then for each canvas k the decoder
  denoises the corrupted canvas k against the cache (prompt + clean canvases < k), and the encoder appends the clean
  canvas k (block-causal over multi-canvas targets);
- loss = mean cross-entropy of the clean token over all supervised canvas positions (corrupted or not)
  + `ar_weight` x the encoder's next-token cross-entropy on the clean sequence;
- with probability `self_cond_prob` per example the decoder first runs without self-conditioning, and its detached
  logits condition a second pass, which is the one that is trained.

`objective="ar"` trains the same checkpoint as a plain causal LM (the encoder pass only): the baseline.

All randomness of a step (corruption rates, corrupted positions and tokens, self-conditioning coins) is drawn for the
whole *global* batch from a generator seeded by (seed, step), and losses are normalised by global token counts, so
1 process and N `torchrun` processes (or N accumulation micro-batches) compute the same update, and a resumed run
repeats the uninterrupted one. Weights are saved in the HF format; optimizer state in safetensors (never pickle).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dgemma.model.checkpoint import load_generation_config, load_model, save_model
from dgemma.model.config import token_ids
from dgemma.model.device import resolve_training, training_device
from dgemma.model.modeling import DiffusionGemma

Objective = Literal["diffusion", "ar"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainError(ValueError):
    """Bad training data or configuration (reported without a traceback by the CLI)."""


@dataclass
class TrainConfig:
    """Hyper-parameters. Defaults follow the published recipe where it states one (DESIGN.md)."""

    objective: Objective = "diffusion"
    steps: int = 1000
    batch_size: int = 16  # global examples per optimizer step (split over processes and accumulation)
    grad_accum: int = 1
    lr: float = 1.5e-4
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1  # cosine decays to lr * final_lr_ratio
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.99)
    clip_norm: float = 1.0
    ar_weight: float = 1.0  # weight of the encoder's next-token loss in the diffusion objective
    prompt_loss: bool = True  # next-token loss also on prompt tokens (the recipe does; set False for pure SFT)
    self_cond_prob: float = 0.5
    template_prob: float = 0.0  # examples with `fixed` positions keep them clean with this probability
    eps: float = 1e-3
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # bfloat16: autocast matmuls, float32 master weights; auto: bfloat16 on a GPU with native bf16, else float32
    # (resolved against the model's device when the Trainer is built; see dgemma.model.device.auto_precision)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    log_every: int = 10

    @property
    def uses_ar_loss(self) -> bool:
        """Whether the next-token loss is part of the objective (always for AR; for diffusion when weighted)."""
        return self.objective == "ar" or self.ar_weight > 0

    def validate(self) -> None:
        if self.objective not in ("diffusion", "ar"):
            raise TrainError(f"objective must be 'diffusion' or 'ar', got {self.objective!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise TrainError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.self_cond_prob <= 1:
            raise TrainError(f"self_cond_prob must be in [0, 1], got {self.self_cond_prob}")
        if not 0 <= self.template_prob <= 1:
            raise TrainError(f"template_prob must be in [0, 1], got {self.template_prob}")
        if not 0 < self.eps < 1:
            raise TrainError(f"eps must be in (0, 1), got {self.eps}")
        if self.lora_rank < 0:
            raise TrainError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise TrainError(f"precision must be auto, float32 or bfloat16, got {self.precision!r}")


# -- data ---------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One supervised pair of token ids: the model sees `prompt` and learns `response` (EOS is appended)."""

    prompt: list[int]
    response: list[int]
    # Response positions a template will fix at inference (inpainting, e.g. Sudoku clues; index len(response) is
    # the EOS). With probability `template_prob` they are left uncorrupted, so training sees the canvases that
    # clamped inference shows the model.
    fixed: list[int] | None = None


@dataclass
class Batch:
    """Tensors for a (micro-)batch. Canvas tensors are (B, K, C) for K canvases of C tokens."""

    prompt: torch.Tensor  # (B, P) right-padded
    prompt_len: torch.Tensor  # (B,)
    canvases: torch.Tensor  # (B, K, C) clean targets, padded with pad tokens
    supervised: torch.Tensor  # (B, K, C) bool: positions in the loss (whole canvases up to the response's end)
    noisy: torch.Tensor | None = None  # (B, K, C) corrupted canvases
    self_cond: torch.Tensor | None = None  # (B,) bool
    t: torch.Tensor | None = None  # (B,) corruption rates
    fixed: torch.Tensor | None = None  # (B, K, C) bool: positions a template fixes at inference

    def to(self, device: torch.device) -> "Batch":
        """The same batch with every tensor on `device` (training on a GPU collates on the CPU)."""
        return Batch(**{f.name: None if (x := getattr(self, f.name)) is None else x.to(device) for f in fields(self)})


def load_examples(path: str | Path, tokenizer: Any | None) -> list[Example]:
    """Read a JSONL file of {"prompt", "completion"} texts, {"messages": [...]} chats (the last assistant turn is the
    response) or {"prompt_ids", "completion_ids"} token ids, each optionally with "fixed": response positions a
    template will fix at inference (see `TrainConfig.template_prob`). Errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such data file")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{path}:{n}: not JSON ({e.msg})") from None
            out.append(_example(rec, tokenizer, f"{path}:{n}"))
    if not out:
        raise TrainError(f"{path}: no examples")
    return out


def _example(rec: Any, tokenizer: Any | None, where: str) -> Example:
    if not isinstance(rec, dict):
        raise TrainError(f"{where}: expected a JSON object")
    ex = _pair(rec, tokenizer, where)
    fixed = rec.get("fixed")
    if fixed is not None:
        if not isinstance(fixed, list) or not all(isinstance(i, int) and 0 <= i <= len(ex.response) for i in fixed):
            raise TrainError(f"{where}: 'fixed' must list response positions (0..{len(ex.response)}, the last is EOS)")
        ex.fixed = fixed
    return ex


def _pair(rec: dict, tokenizer: Any | None, where: str) -> Example:
    if "prompt_ids" in rec or "completion_ids" in rec:
        p, c = rec.get("prompt_ids"), rec.get("completion_ids")
        if not (isinstance(p, list) and isinstance(c, list) and all(isinstance(t, int) for t in p + c)):
            raise TrainError(f"{where}: prompt_ids and completion_ids must both be lists of integers")
        return Example(p, c)
    if tokenizer is None:
        raise TrainError(f"{where}: text examples need a tokenizer.json next to the checkpoint")
    if "messages" in rec:
        msgs = rec["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not isinstance(msgs[-1], dict)
            or msgs[-1].get("role") != "assistant"
        ):
            raise TrainError(f"{where}: 'messages' must end with an assistant turn")
        prompt = tokenizer.encode(tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True))
        return Example(prompt, tokenizer.encode(str(msgs[-1].get("content", ""))))
    if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
        raise TrainError(f"{where}: needs string fields 'prompt' and 'completion' (or 'messages', or *_ids)")
    prompt = tokenizer.encode(rec["prompt"])
    if tokenizer.bos_token_id is not None and (not prompt or prompt[0] != tokenizer.bos_token_id):
        prompt = [tokenizer.bos_token_id] + prompt
    return Example(prompt, tokenizer.encode(rec["completion"]))


def collate(examples: Sequence[Example], canvas_length: int, pad_id: int, eos_id: int, vocab_size: int) -> Batch:
    """Pad prompts on the right and cut `response + [EOS]` into whole canvases (pad after EOS is supervised, as the
    model must learn to end; canvases wholly past the response are not)."""
    C = canvas_length
    for e in examples:
        if not e.prompt:
            raise TrainError("an example has an empty prompt (the encoder needs at least one token)")
        bad = [t for t in e.prompt + e.response if not 0 <= t < vocab_size]
        if bad:
            raise TrainError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")
    P = max(len(e.prompt) for e in examples)
    K = max(math.ceil((len(e.response) + 1) / C) for e in examples)
    B = len(examples)
    prompt = torch.full((B, P), pad_id, dtype=torch.long)
    canv = torch.full((B, K * C), pad_id, dtype=torch.long)
    sup = torch.zeros(B, K * C, dtype=torch.bool)
    fixed = torch.zeros(B, K * C, dtype=torch.bool)
    for b, e in enumerate(examples):
        prompt[b, : len(e.prompt)] = torch.tensor(e.prompt)
        r = e.response + [eos_id]
        canv[b, : len(r)] = torch.tensor(r)
        sup[b, : math.ceil(len(r) / C) * C] = True
        if e.fixed:
            if not all(0 <= i < len(r) for i in e.fixed):
                raise TrainError(f"fixed positions must index the response + EOS (0..{len(r) - 1})")
            fixed[b, e.fixed] = True
    return Batch(
        prompt,
        torch.tensor([len(e.prompt) for e in examples]),
        canv.view(B, K, C),
        sup.view(B, K, C),
        fixed=fixed.view(B, K, C) if bool(fixed.any()) else None,
    )


def corrupt(batch: Batch, vocab_size: int, cfg: TrainConfig, generator: torch.Generator) -> Batch:
    """Draw t ~ U(eps, 1) per example and replace each supervised canvas position by a uniform token with
    probability t; draw the self-conditioning coins. Draws are made for every row, in a fixed order."""
    B, K, C = batch.canvases.shape
    t = cfg.eps + (1 - cfg.eps) * torch.rand(B, generator=generator)
    u = torch.rand(B, K, C, generator=generator)
    rand_tok = torch.randint(0, vocab_size, (B, K, C), generator=generator)
    sc = torch.rand(B, generator=generator) < cfg.self_cond_prob
    replace = (u < t[:, None, None]) & batch.supervised
    if batch.fixed is not None and cfg.template_prob > 0:  # drawn last: the draws above do not change
        templated = torch.rand(B, generator=generator) < cfg.template_prob
        replace &= ~(batch.fixed & templated[:, None, None])
    batch.noisy = torch.where(replace, rand_tok, batch.canvases)
    batch.self_cond = sc
    batch.t = t
    return batch


def take(batch: Batch, idx: slice) -> Batch:
    """Rows `idx` of a batch (the prompt is trimmed to its longest row)."""
    P = int(batch.prompt_len[idx].max())

    def rows(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[idx]

    return Batch(
        batch.prompt[idx, :P],
        batch.prompt_len[idx],
        batch.canvases[idx],
        batch.supervised[idx],
        rows(batch.noisy),
        rows(batch.self_cond),
        rows(batch.t),
        rows(batch.fixed),
    )


# -- the objectives ---------------------------------------------------------------------------------------------------
@dataclass
class LossParts:
    """Summed (not averaged) losses and their token counts, so that they can be combined across processes."""

    diffusion_sum: torch.Tensor
    diffusion_count: int
    ar_sum: torch.Tensor
    ar_count: int


def counts(batch: Batch, cfg: TrainConfig) -> tuple[int, int]:
    """Supervised canvas positions and next-token targets of a batch (the global normalisers)."""
    n_diff = int(batch.supervised.sum()) if cfg.objective == "diffusion" else 0
    n_ar = int(_ar_targets(batch, cfg)[1].sum()) if cfg.uses_ar_loss else 0
    return n_diff, n_ar


def _ar_targets(batch: Batch, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets (B, P + K*C) over the encoder's sequence [prompt (right-padded), canvases] and their mask.

    Position j of a row predicts its next real token; prompt padding sits between prompt and canvases in the padded
    layout, so targets are built per row."""
    B, P = batch.prompt.shape
    K, C = batch.canvases.shape[1:]
    T = P + K * C
    dev = batch.prompt.device
    tgt = torch.zeros(B, T, dtype=torch.long, device=dev)
    mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    flat = batch.canvases.reshape(B, -1)
    sup = batch.supervised.reshape(B, -1)
    for b in range(B):
        n = int(batch.prompt_len[b])
        m = int(sup[b].sum())
        seq = torch.cat([batch.prompt[b, :n], flat[b, :m]])
        # Hidden state at layout position of token i predicts token i + 1.
        layout = torch.cat([torch.arange(n, device=dev), P + torch.arange(m, device=dev)])
        tgt[b, layout[:-1]] = seq[1:]
        keep = torch.ones(len(seq) - 1, dtype=torch.bool, device=dev)
        if not cfg.prompt_loss:
            keep[: n - 1] = False
        mask[b, layout[:-1]] = keep
    return tgt, mask


def loss_parts(model: DiffusionGemma, batch: Batch, cfg: TrainConfig) -> LossParts:
    """Run the model as at inference over one (micro-)batch and return summed losses."""
    B, K, C = batch.canvases.shape
    P = batch.prompt.shape[1]
    cache = model.new_cache(B, P + K * C)
    hidden = [model.encode(batch.prompt, cache, n_new=batch.prompt_len)]  # (B, P, H)
    diff_sum = torch.zeros((), device=model.device)
    # With ar_weight 0 the diffusion objective needs no next-token logits, so the last clean canvas (context for
    # nothing after it) is not encoded: a third less compute per single-canvas example.
    for k in range(K):
        if cfg.objective == "diffusion":
            diff_sum = diff_sum + _canvas_loss(model, batch, cache, k)
        if cfg.uses_ar_loss or k < K - 1:
            hidden.append(model.encode(batch.canvases[:, k], cache))  # the clean canvas joins the context
    if not cfg.uses_ar_loss:
        return LossParts(diff_sum, int(batch.supervised.sum()), diff_sum * 0, 0)
    tgt, mask = _ar_targets(batch, cfg)
    h = torch.cat(hidden, dim=1)[mask]  # (N, H)
    ar_sum = F.cross_entropy(model.logits(h), tgt[mask], reduction="sum") if h.shape[0] else diff_sum * 0
    return LossParts(diff_sum, int(batch.supervised.sum()), ar_sum, int(mask.sum()))


def _canvas_loss(model: DiffusionGemma, batch: Batch, cache: Any, k: int) -> torch.Tensor:
    noisy, sup = batch.noisy[:, k], batch.supervised[:, k]
    if not bool(sup.any()):
        return torch.zeros((), device=model.device)
    # Not in place: a canvas written into the cache's future slots would be overwritten by the clean canvas's
    # encoder pass below, which autograd needs as it was.
    masks = cache.decoder_masks(noisy.shape[1], in_place=False)
    sc = batch.self_cond
    self_cond = None
    if sc is not None and bool(sc.any()):
        with torch.no_grad():
            self_cond = model.denoise(noisy, cache, masks=masks).detach()  # first pass, no signal
    logits = model.denoise(
        noisy, cache, self_cond=self_cond, self_cond_mask=sc if self_cond is not None else None, masks=masks
    )
    return F.cross_entropy(logits[sup], batch.canvases[:, k][sup], reduction="sum")


# -- LoRA ---------------------------------------------------------------------------------------------------------
class LoRA(nn.Module):
    """Low-rank adapters beside frozen linears: y = W x + (alpha / r) * B A x. Kept outside the model (forward hooks),
    so the model's parameter names stay the checkpoint's; `merge` folds them into the weights for saving."""

    def __init__(self, model: DiffusionGemma, rank: int, alpha: float, targets: Iterable[str]):
        super().__init__()
        targets = tuple(targets)
        self.scale = alpha / rank
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self._modules_by_key: dict[str, nn.Linear] = {}
        self._hooks = []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                key = name.replace(".", "__")
                self.A[key] = nn.Parameter(torch.randn(rank, mod.in_features) / math.sqrt(mod.in_features))
                self.B[key] = nn.Parameter(torch.zeros(mod.out_features, rank))  # starts as the identity change
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

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        """Add (sign=1) or remove (sign=-1) the adapters' product from the base weights."""
        for key, mod in self._modules_by_key.items():
            mod.weight.add_((self.B[key] @ self.A[key]).to(mod.weight.dtype), alpha=sign * self.scale)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


# -- the loop -----------------------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine down to `lr * final_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.final_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the `torchrun` process group when launched by it (gloo on CPU, nccl on CUDA); 1 process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def default_device() -> str:
    """The "auto" training device: this process's GPU when there is one (under torchrun: the LOCAL_RANK-th), else
    the CPU."""
    return str(training_device("auto"))


def _all_reduce(tensors: list[torch.Tensor], info: DistInfo) -> None:
    if info.world <= 1 or not tensors:
        return
    import torch.distributed as dist

    dev = tensors[0].device  # gradients live on the model's device (nccl needs CUDA tensors); others follow
    flat = torch.cat([t.reshape(-1).float().to(dev) for t in tensors])
    dist.all_reduce(flat)
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off : off + n].view_as(t))
        off += n


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
        idx = _batch_indices(len(self.examples), self.cfg.batch_size, step, self.cfg.seed)
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
        _all_reduce(grads + [sums], self.dist)
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
            _optimizer_tensors(self.opt, self.named_trainable(), values=self.lora is not None),
            str(state / "optimizer.safetensors"),
        )
        meta = {"step": self.step, "config": _jsonable(asdict(self.cfg)), "log": self.log}
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
            if saved.get(key) != _jsonable(asdict(self.cfg))[key]:
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
        _restore_optimizer(self.opt, named, tensors)
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
                entry = _log_entry(acc, self.cfg.objective, round(time.perf_counter() - t0, 2))
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


def _batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of global batch `step`: consecutive slices of a permutation per epoch (seeded by seed and
    epoch), a batch straddling two epochs taking the end of one and the start of the next."""
    idx: list[int] = []
    pos = step * batch_size
    while len(idx) < batch_size:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take_n = min(batch_size - len(idx), n - off)
        idx.extend(perm[off : off + take_n].tolist())
        pos += take_n
    return idx


def _optimizer_tensors(
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


def _restore_optimizer(
    opt: torch.optim.Optimizer, named: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]
) -> None:
    """The inverse of `_optimizer_tensors` (parameter values aside)."""
    opt.zero_grad(set_to_none=False)
    for n, p in named.items():
        st = {
            k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == n and not k.endswith("::value")
        }
        if st:
            # moments on the parameter's device; AdamW keeps its step counter on the CPU
            opt.state[p] = {k: (v.to(p.device) if k != "step" else v.float()) for k, v in st.items()}


def _log_entry(acc: list[dict[str, Any]], objective: str, elapsed_s: float) -> dict[str, Any]:
    """One log line: the mean losses of the steps in `acc`, the last step's lr and gradient norm."""
    last = acc[-1]
    entry = {
        "step": last["step"],
        "loss": sum(r["loss"] for r in acc) / len(acc),
        "ar_loss": None if last["ar_loss"] is None else sum(r["ar_loss"] for r in acc) / len(acc),
        "lr": last["lr"],
        "grad_norm": last["grad_norm"],
        "elapsed_s": elapsed_s,
    }
    if objective == "diffusion":
        entry["diffusion_loss"] = sum(r["diffusion_loss"] for r in acc) / len(acc)
    return entry


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete `checkpoint-*` directory under `out_dir` (one with a train state), if any."""
    found = sorted(
        p
        for p in Path(out_dir).glob("checkpoint-*")
        if (p / "train_state" / "state.json").is_file() and not p.name.endswith(".tmp")
    )
    return found[-1] if found else None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def write_loss_plot(log: list[dict[str, Any]], path: Path) -> None:
    """A dependency-free SVG of the loss curves (total, diffusion, AR) against the step."""
    series = {
        k: [(e["step"], e[k]) for e in log if e.get(k) is not None] for k in ("loss", "diffusion_loss", "ar_loss")
    }
    series = {k: v for k, v in series.items() if v}
    if not series:
        return
    W, H, pad = 640, 360, 48
    xs = [s for v in series.values() for s, _ in v]
    ys = [math.log10(max(y, 1e-6)) for v in series.values() for _, y in v]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-3)

    def pt(s: float, y: float) -> str:
        px = pad + (s - x0) / (x1 - x0) * (W - 2 * pad)
        py = H - pad - (math.log10(max(y, 1e-6)) - y0) / (y1 - y0) * (H - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    colors = {"loss": "#222", "diffusion_loss": "#1f77b4", "ar_loss": "#d62728"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
        f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
        f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="#888"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="#888"/>',
        f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">step ({x0}-{x1})</text>',
        f'<text x="8" y="{pad - 12}">loss (log10 axis, {10**y0:.3g}-{10**y1:.3g})</text>',
    ]
    for i, (k, v) in enumerate(series.items()):
        parts.append(
            f'<polyline fill="none" stroke="{colors[k]}" stroke-width="1.5" '
            f'points="{" ".join(pt(s, y) for s, y in v)}"/>'
        )
        parts.append(f'<text x="{W - pad - 120}" y="{pad + 16 * i}" fill="{colors[k]}">{k}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


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
