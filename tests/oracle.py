"""Helpers that build transformers' DiffusionGemma (the test oracle) on tiny random configs."""

from __future__ import annotations

import torch

TINY_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    patch_size=4,
    position_embedding_size=8,
    pooling_kernel_size=1,
)


def hf_text_config(**over):
    base = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        sliding_window=6,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    base.update(over)
    return base


def build_hf(seed: int = 0, canvas_length: int = 8, dtype=torch.float32, **text_over):
    """A transformers DiffusionGemmaForBlockDiffusion with every parameter and scalar randomised."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(
        text_config=hf_text_config(**text_over), vision_config=TINY_VISION, canvas_length=canvas_length
    )
    cfg.text_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if p.ndim == 1:  # norms, router scales: around 1 so every one of them matters
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.to(dtype)


def hf_logits(model, hidden):
    logits = model.lm_head(hidden).float()
    cap = model.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


EOS, PAD = 1, 0  # the oracle's and tiny_config's eos / pad ids


def load_llm(path, **kw):
    """dgemma's `LLM` on a checkpoint, in float32 on the CPU unless a test asks otherwise: dtype "auto" is bfloat16 on
    CPUs with native bf16 matmul, and the tests compare with float32 transformers or between runs."""
    import warnings

    from dgemma.entrypoints.llm import LLM

    kw = {"device": "cpu", "dtype": "float32", **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vision-tower skip warning (tested in test_checkpoint.py)
        return LLM(path, **kw)


def ids(p) -> dict:
    """A token-id prompt."""
    return {"prompt_token_ids": list(p)}
