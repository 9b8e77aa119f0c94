"""FP8 weights: e4m3 expert and dense weights with per-output-channel scales, dynamic per-token activation scales.

`quantize_fp8(model)` swaps, in place, every attention projection, dense MLP and the experts of a loaded bf16
model for FP8 versions (about half the weight bytes, which is what a denoising step at batch 1 is bound by). The
embedding (and so the tied LM head and the self-conditioning product `probs @ E`), the router and the norms stay
in bf16: a quantized tied table would also quantize the self-conditioning signal.

Arithmetic: a weight row w (in,) is stored as round_e4m3(w / s) with s = max|w| / 448; an activation row x is
quantized the same way on the fly; `torch._scaled_mm` multiplies in FP8 and rescales into bf16. Experts use
`torch._scaled_grouped_mm` (CUDA, Hopper and newer) or, where torch has no such kernel (CPU), one `_scaled_mm`
per expert. Checkpoints saved in FP8 carry `<name>.weight` in float8_e4m3fn plus `<name>.weight_scale`; see
`checkpoint.load_model`.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
QUANTIZATIONS = ("fp8",)


class QuantizationError(ValueError):
    """FP8 asked for where it cannot run; the message says why."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n) -> e4m3 values (..., n) and float32 scales (..., 1): x ~= q * scale, per row."""
    scale = (x.detach().abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_(min=1e-12)
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_available(device: torch.device) -> str | None:
    """None if FP8 matmuls run on `device`, else why not (a probe of `torch._scaled_mm`)."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"this torch ({torch.__version__}) has no FP8 matmul"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return "FP8 needs an Ada or Hopper GPU (compute capability 8.9 or newer)"
    try:
        a = torch.zeros(16, 16, dtype=FP8, device=device)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        return f"torch has no FP8 matmul on {device.type}: {str(e).splitlines()[0][:120]}"
    return None


def scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x (..., in) in bf16 times FP8 weight (out, in) with scales (out,) -> (..., out) bf16."""
    q, s = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=weight_scale.float()[None, :], out_dtype=torch.bfloat16)
    return out.view(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Module):
    """An `nn.Linear` with an FP8 weight (out, in) and per-output-channel scales (out,)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Fp8Linear":
        q, s = quantize_rows(lin.weight.data)
        return cls(q, s.squeeze(-1), None if lin.bias is None else lin.bias.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = scaled_mm(x, self.weight, self.weight_scale)
        return out if self.bias is None else out + self.bias


def fp8_grouped(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x (S, in) grouped by `offs` (E,) times FP8 w[e] (out, in) with scales (E, out) -> (S, out) bf16."""
    q, s = quantize_rows(x)
    if q.device.type == "cuda" and hasattr(torch, "_scaled_grouped_mm"):
        return torch._scaled_grouped_mm(
            q, w.transpose(-2, -1), scale_a=s.squeeze(-1), scale_b=w_scale.float(), offs=offs, out_dtype=torch.bfloat16
        )
    out = torch.empty(x.shape[0], w.shape[1], dtype=torch.bfloat16, device=x.device)
    start = 0
    for e, end in enumerate(offs.tolist()):  # no grouped FP8 kernel here: one scaled matmul per expert
        if end > start:
            out[start:end] = torch._scaled_mm(
                q[start:end],
                w[e].t(),
                scale_a=s[start:end],
                scale_b=w_scale[e].float()[None, :],
                out_dtype=torch.bfloat16,
            )
        start = end
    return out


class Fp8Experts(nn.Module):
    """`experts.Experts` with FP8 weights: gate_up (E, 2I, hidden) and down (E, hidden, I), scales per output row."""

    def __init__(
        self, gate_up: torch.Tensor, gate_up_scale: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor, act
    ):
        super().__init__()
        self.register_buffer("gate_up_proj", gate_up)
        self.register_buffer("gate_up_proj_scale", gate_up_scale.float())
        self.register_buffer("down_proj", down)
        self.register_buffer("down_proj_scale", down_scale.float())
        self.act = act

    @classmethod
    def from_experts(cls, ex: nn.Module) -> "Fp8Experts":
        gu, gu_s = quantize_rows(ex.gate_up_proj.data)
        dn, dn_s = quantize_rows(ex.down_proj.data)
        return cls(gu, gu_s.squeeze(-1), dn, dn_s.squeeze(-1), ex.act)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """As `experts.Experts.forward` (same routing and combination order), FP8 matmuls."""
        from dgemma.model.experts import mixture

        return mixture(
            x,
            weights,
            idx,
            self.gate_up_proj.shape[0],
            self.act,
            lambda h, offs: fp8_grouped(h, self.gate_up_proj, self.gate_up_proj_scale, offs),
            lambda h, offs: fp8_grouped(h, self.down_proj, self.down_proj_scale, offs),
        )


# The dense linears quantized in each layer (attention and the dense MLP), by attribute path.
DENSE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def quantize_fp8(model: nn.Module) -> nn.Module:
    """Swap a bf16 model's dense and expert weights for FP8 in place (see the module docstring); returns it."""
    if model.dtype != torch.bfloat16:
        raise QuantizationError(f"FP8 quantization starts from a bfloat16 model, not {model.dtype}")
    why = fp8_available(model.device)
    if why is not None:
        raise QuantizationError(f"quantization='fp8' cannot run on {model.device}: {why}")
    with torch.no_grad():
        for layer in model.layers:
            for path in DENSE:
                parent_name, _, leaf = path.rpartition(".")
                parent = layer.get_submodule(parent_name)
                lin = getattr(parent, leaf)
                if isinstance(lin, nn.Linear):
                    setattr(parent, leaf, Fp8Linear.from_linear(lin))
            layer.experts = Fp8Experts.from_experts(layer.experts)
    model.quantization = "fp8"
    return model


__all__ = ["QUANTIZATIONS", "QuantizationError", "quantize_fp8", "fp8_available", "Fp8Linear", "Fp8Experts"]
