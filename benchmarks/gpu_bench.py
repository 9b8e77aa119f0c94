"""GPU benchmark at DiffusionGemma 26B-A4B shapes with random bf16 weights (fixed denoising steps).

transformers' reference model is built first (random init, bf16, on the GPU); dgemma's model then *shares its
weight tensors* (no copy), so both run on the same weights with one model's memory. For each batch size it
times dgemma's diffusion path, dgemma's AR path and transformers' `generate`, and prints a roofline line:
the weight bytes one denoising step must read divided by the HBM bandwidth. Table + final JSON line.

    python benchmarks/gpu_bench.py                   # on a CUDA machine (benchmarks/gpu_check.sh runs this)
    python benchmarks/gpu_bench.py --tiny --device cpu   # a seconds-long smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dgemma.model.config import ModelConfig, TextConfig  # noqa: E402
from dgemma.model.modeling import DiffusionGemma  # noqa: E402

# Shapes of google/diffusiongemma-26B-A4B-it's text stack as we understand them from the public Gemma 4 26B-A4B
# config (30 layers, 128 experts with 8 active, 2 kv heads on full layers); pass --config to use a real one.
SHAPES_26B = dict(
    vocab_size=262_144,
    hidden_size=2816,
    intermediate_size=2112,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=2,
    sliding_window=1024,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=64,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=32,
    layer_types=["sliding_attention", "full_attention"],
)
HBM = {"H100": 3.35e12, "H200": 4.8e12}


def build(text: dict, canvas: int, device: str, dtype: torch.dtype):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    tiny_vision = dict(
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
    hf_cfg = DiffusionGemmaConfig(text_config=dict(text), vision_config=tiny_vision, canvas_length=canvas)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: 26B fp32 weights would not fit first
    try:
        with torch.device(device):
            hf = DiffusionGemmaForBlockDiffusion(hf_cfg).to(dtype).eval()
    finally:
        torch.set_default_dtype(prev)
    ours_cfg = ModelConfig(text=TextConfig(**text), canvas_length=canvas)
    with torch.device("meta"):
        ours = DiffusionGemma(ours_cfg)
    hf_state = {k[len("model.decoder.") :]: v for k, v in hf.state_dict().items() if k.startswith("model.decoder.")}
    enc = hf.model.encoder.language_model.layers
    for i in range(ours_cfg.text.num_hidden_layers):
        hf_state[f"layers.{i}.encoder_layer_scalar"] = enc[i].layer_scalar
    ours.load_state_dict(hf_state, strict=True, assign=True)  # shares storage with transformers' tensors
    ours.init_buffers()
    return hf, ours.eval()


def roofline_ms(model: DiffusionGemma, device_name: str) -> float | None:
    """Bytes of bf16 weights one denoising step reads at batch 1 (everything but the inactive experts) / the HBM
    bandwidth of `device_name`; None for a device not in HBM."""
    bw = next((v for k, v in HBM.items() if k in device_name), None)
    cfg = model.config.text
    total = sum(p.numel() for p in model.parameters()) * 2
    expert = sum(ly.experts.gate_up_proj.numel() + ly.experts.down_proj.numel() for ly in model.layers) * 2
    active = total - expert + expert * min(1.0, cfg.top_k_experts * model.config.canvas_length / cfg.num_experts)
    return active / bw * 1e3 if bw else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--config", help="a config.json whose text_config gives the shapes")
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    dtype = torch.bfloat16
    if args.config:
        text = json.load(open(args.config))["text_config"]
    else:
        text = TINY if args.tiny else SHAPES_26B
    canvas = 16 if args.tiny else 256
    torch.manual_seed(0)
    hf, ours = build(text, canvas, args.device, dtype)
    from dgemma.engine.core import Engine
    from dgemma.engine.params import SamplingParams

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    cfg = ours.config.text
    total = sum(p.numel() for p in ours.parameters()) * 2
    roof_ms = roofline_ms(ours, name)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    print(
        f"device {name}; {total / 2 / 1e9:.1f}B parameters (bf16); steps/canvas {args.steps}; "
        f"roofline {roof_ms and round(roof_ms, 2)} ms/step (weights read once per step at batch 1)"
    )
    print(f"{'impl':10} {'batch':>5} {'tok/s':>9} {'ms/step':>9} {'peak GiB':>9}")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = torch.randint(3, cfg.vocab_size, (b, args.prompt_len), device=args.device)
        for impl in ["dgemma", "ar"] + ([] if args.no_reference else ["reference"]):
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            if impl == "reference":
                kw = dict(
                    max_new_tokens=args.max_new_tokens,
                    max_denoising_steps=args.steps,
                    confidence_threshold=1e-30,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                hf.generate(prompts[:, :8], **dict(kw, max_new_tokens=8, max_denoising_steps=1))
                sync()
                t = time.perf_counter()
                hf.generate(prompts, **kw)
                sync()
                wall = time.perf_counter() - t
                passes = args.steps * -(-args.max_new_tokens // canvas)
            else:
                eng = Engine(ours, max_batch=b, max_model_len=args.prompt_len + args.max_new_tokens + canvas)
                sp = SamplingParams(
                    max_new_tokens=args.max_new_tokens,
                    max_denoising_steps=args.steps,
                    fixed_steps=True,
                    ignore_eos=True,
                    seed=0,
                    mode=impl if impl == "ar" else "diffusion",
                )
                for row in prompts[:, :8].tolist():
                    eng.add_request(row, SamplingParams(max_new_tokens=8, max_denoising_steps=1, ignore_eos=True))
                list(eng.stream())
                sync()
                t = time.perf_counter()
                for row in prompts.tolist():
                    eng.add_request(row, sp)
                list(eng.stream())
                sync()
                wall = time.perf_counter() - t
                passes = args.steps * -(-args.max_new_tokens // canvas) if impl != "ar" else None
            toks = b * args.max_new_tokens
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0
            r = dict(
                impl=impl,
                batch=b,
                tok_s=toks / wall,
                ms_per_step=1e3 * wall / passes if passes else None,
                peak_gib=peak,
            )
            rows.append(r)
            ms = f"{r['ms_per_step']:9.1f}" if r["ms_per_step"] else f"{'-':>9}"
            print(f"{impl:10} {b:>5} {r['tok_s']:>9.1f} {ms} {peak:>9.1f}")
    print(json.dumps({"benchmark": "gpu", "device": name, "roofline_ms_per_step": roof_ms, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
