"""FP8 weights (`quantization="fp8"`): quantization error bounds, the quantized model against bf16, FP8 checkpoints
round-tripping exactly, and clear errors where FP8 cannot run. Runs on CPU through torch's CPU `_scaled_mm`."""

from __future__ import annotations

import warnings

import pytest
import torch

from dgemma import DiffusionGemma, save_model
from dgemma.model.checkpoint import CheckpointError, load_model
from dgemma.model.config import tiny_config
from dgemma.model.quant import FP8, Fp8Experts, Fp8Linear, QuantizationError, quantize_fp8, quantize_rows

# Attention heads and MLP widths are multiples of 16, as FP8 matmul kernels require.
TEXT = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, head_dim=16, global_head_dim=32, vocab_size=160
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = DiffusionGemma(tiny_config(**TEXT))
    m.reset_parameters(0.1)
    return save_model(m.to(torch.bfloat16), tmp_path_factory.mktemp("bf16"))


def _load(path, **kw) -> DiffusionGemma:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(path, dtype=torch.bfloat16, **kw)


def _logits(m: DiffusionGemma) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    cache = m.new_cache(2, 48)
    with torch.no_grad():
        m.encode(torch.randint(0, 160, (2, 7), generator=g), cache)
        return m.denoise(torch.randint(0, 160, (2, 16), generator=g), cache)


def test_quantize_rows_error_bound():
    x = torch.randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]  # rows of very different magnitudes
    q, s = quantize_rows(x)
    assert q.dtype == FP8 and s.shape == (8, 1)
    err = (q.float() * s - x).abs()
    # e4m3 keeps 3 mantissa bits: a relative rounding error of at most 2**-4 of each value, plus the subnormals'
    # absolute step near zero (2**-9 of the row scale).
    assert (err <= x.abs() * 2**-4 + s * 2**-9 + 1e-30).all()


def test_quantized_model_is_close_to_bf16(ckpt):
    ref, fp8 = _load(ckpt), _load(ckpt, quantization="fp8")
    layer = fp8.layers[0]
    assert isinstance(layer.self_attn.q_proj, Fp8Linear) and isinstance(layer.experts, Fp8Experts)
    assert layer.self_attn.q_proj.weight.dtype == FP8 and fp8.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.router.proj.weight.dtype == torch.bfloat16  # the router stays bf16
    a, b = _logits(ref), _logits(fp8)
    rel = float((a - b).norm() / a.norm())
    # FP8 changes the numbers (3-4 % per matmul; measured 0.16 after the layers of this random model), not the model
    assert 0 < rel < 0.3, rel


def _dequantized(x: torch.Tensor) -> torch.Tensor:
    q, s = quantize_rows(x)
    return q.float() * s


def test_fp8_matmuls_match_dequantized_arithmetic():
    """Each FP8 matmul equals the float32 product of the dequantized operands, to bf16 output rounding."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 16, 64).to(torch.bfloat16)
    want = _dequantized(x) @ _dequantized(lin.weight.data).t() + lin.bias.float()
    torch.testing.assert_close(Fp8Linear.from_linear(lin)(x).float(), want, rtol=1e-2, atol=1e-2)

    from dgemma.model.experts import Experts

    ex = Experts(tiny_config(**TEXT).text)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.2)
    torch.nn.init.normal_(ex.down_proj, std=0.2)
    ex = ex.to(torch.bfloat16)
    h = torch.randn(24, 64).to(torch.bfloat16)
    idx = torch.stack([torch.arange(24) % 4, (torch.arange(24) + 1) % 4], dim=1)
    w = torch.rand(24, 2)
    q = Fp8Experts.from_experts(ex)
    with torch.no_grad():
        got = q(h, w, idx).float()
        ex.gate_up_proj.copy_(_dequantized(ex.gate_up_proj.data.float()))  # the weights FP8 holds...
        ex.down_proj.copy_(_dequantized(ex.down_proj.data.float()))
        want = ex(h.float().to(torch.bfloat16), w, idx).float()  # ...in bf16 arithmetic (activations unquantized)
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.08, rel  # only the activations' FP8 rounding (~3 % per matmul) remains


def test_fp8_checkpoint_round_trip(ckpt, tmp_path):
    fp8 = _load(ckpt, quantization="fp8")
    out = save_model(fp8, tmp_path / "fp8")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        key = "model.decoder.layers.0.self_attn.q_proj.weight"
        assert f.get_tensor(key).dtype == FP8 and f"{key}_scale" in f.keys()
    again = _load(out)  # the config says FP8: no quantization argument needed
    assert isinstance(again.layers[0].experts, Fp8Experts)
    assert torch.equal(_logits(fp8), _logits(again))


def test_fp8_errors(ckpt, monkeypatch):
    with pytest.raises(CheckpointError, match="bfloat16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_model(ckpt, dtype=torch.float32, quantization="fp8")
    with pytest.raises(CheckpointError, match="unknown quantization"):
        _load(ckpt, quantization="int3")

    def no_kernel(*a, **k):
        raise RuntimeError("Could not run 'aten::_scaled_mm' with arguments from the 'CPU' backend")

    model = _load(ckpt)
    monkeypatch.setattr(torch, "_scaled_mm", no_kernel)
    with pytest.raises(QuantizationError, match="cannot run on cpu: torch has no FP8 matmul"):
        quantize_fp8(model)
    assert isinstance(model.layers[0].self_attn.q_proj, torch.nn.Linear)  # left as it was


def test_llm_and_cli_take_fp8(ckpt, capsys):
    from dgemma import LLM, SamplingParams
    from dgemma.entrypoints.cli import main

    llm = LLM(ckpt, device="cpu", quantization="fp8", max_batch=1)  # dtype auto becomes bf16 for FP8
    assert llm.dtype == torch.bfloat16 and "experts fp8 per-expert" in llm.engine.describe()
    out = llm.generate(
        [{"prompt_token_ids": [5, 6]}],
        SamplingParams(max_new_tokens=16, seed=0, ignore_eos=True, max_denoising_steps=2),
    )[0].outputs[0]
    assert len(out.token_ids) == 16
    code = main(
        [
            "generate",
            "--model",
            str(ckpt),
            "--prompt-ids",
            "5,6",
            "--quantization",
            "fp8",
            "--device",
            "cpu",
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--max-denoising-steps",
            "2",
            "--json",
        ]
    )
    _, err = capsys.readouterr()
    assert code == 0 and "dtype bfloat16" in err and "experts fp8" in err, err
