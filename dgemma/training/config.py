"""Training's hyper-parameters (`TrainConfig`) and its error type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Objective = Literal["diffusion", "ar"]
# How the processes share the work: one process; data parallel (every process holds the whole model, gradients are
# all-reduced); FSDP2 (parameters, gradients and optimizer state sharded over the processes). "auto": ddp when
# launched by torchrun with several processes, else single.
Strategy = Literal["auto", "single", "ddp", "fsdp"]
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
    strategy: Strategy = "auto"
    # Recompute each layer's feed-forward block in the backward pass instead of keeping its activations
    activation_checkpointing: bool = False
    dist_timeout: float = 600.0  # seconds a collective may wait for the other processes before the job ends
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
        if self.strategy not in ("auto", "single", "ddp", "fsdp"):
            raise TrainError(f"strategy must be auto, single, ddp or fsdp, got {self.strategy!r}")
        if not self.dist_timeout > 0:
            raise TrainError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
