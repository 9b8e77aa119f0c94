"""Generation benchmark: dgemma's fast diffusion path vs dgemma's AR path vs transformers' reference `generate`,
on the same weights, in the same run. Prints a table and a final JSON line.

    python benchmarks/generate.py --params 75e6 --batch-sizes 1,2,4,8 --dtypes float32,bfloat16 --steps 16
    python benchmarks/generate.py --preset small --batch-sizes 1 --dtypes float32 --threads 2

`--preset small` is a laptop-sized model where per-step overhead, not arithmetic, dominates: 6 layers, hidden 256,
vocab 8,192, 4 experts top-2, canvas 64, 128 new tokens (the bundled Sudoku model is of this kind).

`--baseline DIR` adds the row `baseline`: dgemma timed from another source tree (e.g. the previous commit:
`git worktree add /tmp/base HEAD~1`), so before and after land in the same run on the same machine.

Each measurement runs in a fresh subprocess, so "peak MiB" is that process's peak resident memory (weights
included). Random weights never converge, so the default is a fixed number of denoising steps (--steps); pass
--adaptive to use adaptive stopping instead. Do not run anything else on the machine while this runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# The dgemma source to time: this checkout, or (internally, for --baseline) another tree given by --src.
sys.path.insert(0, sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else os.path.dirname(HERE))

from dgemma import DiffusionGemma, save_model  # noqa: E402

try:
    from dgemma.model.config import ModelConfig, TextConfig, sized_config  # noqa: E402
except ImportError:  # a --baseline tree from before the subpackage layout
    from dgemma.config import ModelConfig, TextConfig, sized_config  # noqa: E402

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_rate(dtype: torch.dtype, m: int = 256, k: int = 768, n: int = 3072, reps: int = 20) -> float:
    """Measured GFLOP/s of a (m, k) x (k, n) matmul in `dtype` (the shape of one canvas through an MLP)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def step_flops(cfg, batch: int, context: int) -> float:
    """FLOPs of one denoising step: linear layers (active experts only), attention, LM head, self-conditioning."""
    t, C, h = cfg.text, cfg.canvas_length, cfg.text.hidden_size
    per_tok = 0
    for i in range(t.num_hidden_layers):
        hd, kv = t.layer_head_dim(i), t.layer_kv_heads(i)
        per_tok += h * t.num_attention_heads * hd * 2 + h * kv * hd * (2 if t.is_sliding(i) else 1)
        per_tok += 3 * h * t.intermediate_size + h * t.num_experts
        per_tok += t.top_k_experts * 3 * h * t.moe_intermediate_size
        keys = (min(context, t.sliding_window - 1) if t.is_sliding(i) else context) + C
        per_tok += 2 * t.num_attention_heads * hd * keys  # QK^T and PV
    per_tok += 2 * t.vocab_size * h + 3 * h * t.intermediate_size  # LM head, soft embedding, self-cond MLP
    return 2.0 * per_tok * C * batch


def small_config() -> ModelConfig:
    """The `--preset small` model: 6 layers (5 sliding, 1 full), hidden 256, vocab 8,192, 4 experts top-2."""
    types = ["sliding_attention"] * 5 + ["full_attention"]
    text = TextConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        global_head_dim=128,
        num_global_key_value_heads=1,
        sliding_window=512,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=128,
        layer_types=types,
        max_position_embeddings=4096,
    )
    return ModelConfig(text=text, canvas_length=64)


def best_of(n: int, fn):
    """The shortest wall time of `n` runs of `fn` (the least disturbed by anything else), and its last result."""
    best, out = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_one(args) -> dict:
    """One measurement (in a subprocess): returns a dict of numbers."""
    dtype = DT[args.dtype]
    torch.manual_seed(0)
    prompt_len, new = args.prompt_len, args.max_new_tokens
    prompts = [[int(x) for x in torch.randint(3, 1000, (prompt_len,))] for _ in range(args.batch)]
    steps = args.steps
    if args.impl == "reference":
        from transformers import DiffusionGemmaForBlockDiffusion

        model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.ckpt, dtype=dtype).eval()
        ids = torch.tensor(prompts)
        kw = dict(max_new_tokens=new, max_denoising_steps=steps, eos_token_id=None, pad_token_id=0)
        if not args.adaptive:
            kw["confidence_threshold"] = 1e-30  # never confident: every canvas runs all steps
        model.generate(ids[:, :8], **dict(kw, max_new_tokens=8, max_denoising_steps=1))  # warm-up
        wall, out = best_of(args.repeat, lambda: model.generate(ids, **kw))
        tokens = args.batch * new
        passes = (
            float(steps * -(-new // model.config.canvas_length))
            if not args.adaptive
            else float((new / out.tokens_per_forward.float()).mean())
        )
    else:
        from dgemma import LLM, SamplingParams  # the package's names: the same in a --baseline tree

        llm = LLM(
            args.ckpt,
            device="cpu",
            dtype=args.dtype,
            max_batch=args.batch,  # CPU, like the reference
            max_model_len=prompt_len + new + 256,
        )
        sp = SamplingParams(
            max_new_tokens=new,
            max_denoising_steps=steps,
            fixed_steps=not args.adaptive,
            ignore_eos=True,
            seed=0,
            mode="ar" if args.impl == "ar" else "diffusion",
        )
        llm.generate(
            [{"prompt_token_ids": p[:8]} for p in prompts],
            SamplingParams(max_new_tokens=8, max_denoising_steps=1, ignore_eos=True, mode=sp.mode),
        )  # warm-up
        wall, outs = best_of(args.repeat, lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], sp))
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        passes = float(sum(o.metrics.get("decoder_passes", 0) for o in outs) / len(outs))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "passes": passes, "peak_mib": peak}


def cpu_line() -> str:
    """The CPU this ran on, the instruction sets that decide matmul speed, and any switch forcing them."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    env = [
        f"{k}={os.environ[k]}"
        for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
        if k in os.environ
    ]
    return (
        f"cpu: {name}, {os.cpu_count()} cores; flags {' '.join(isa) or 'none of avx2/avx512'}; torch kernels "
        f"{torch.backends.cpu.get_cpu_capability()}" + (f" ({', '.join(env)})" if env else "")
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a random model of --params parameters)")
    ap.add_argument("--params", type=float, default=75e6, help="size of the random model (default 75e6)")
    ap.add_argument(
        "--preset",
        choices=["sized", "small"],
        default="sized",
        help="sized: a Gemma-4-shaped model of --params parameters; small: the laptop-sized model above "
        "(sets --max-new-tokens 128 unless given)",
    )
    ap.add_argument("--vocab", type=int, default=32_768, help="vocabulary of the random model")
    ap.add_argument("--batch-sizes", default="1,2,4,8", help="comma list (up to 1,2,4,8,16,32)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument(
        "--impls", default="dgemma,ar,reference", help="which implementations to time, in this order (and baseline)"
    )
    ap.add_argument("--steps", type=int, default=16, help="denoising steps per canvas (fixed unless --adaptive)")
    ap.add_argument("--adaptive", action="store_true", help="adaptive stopping instead of fixed steps")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per prompt (default 256)")
    ap.add_argument("--reference-max-batch", type=int, default=8, help="skip the (slow) reference above this batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the fastest counts")
    ap.add_argument("--baseline", metavar="DIR", help="also time dgemma from this source tree (row 'baseline')")
    # internal: one measurement
    ap.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if args.preset == "small" else 256
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._one:
        print(json.dumps(run_one(args)))
        return 0

    tmp = tempfile.mkdtemp(prefix="dgemma-bench-")
    if args.model:
        ckpt = args.model
        from dgemma.model.checkpoint import load_config

        cfg = load_config(ckpt)
    else:
        cfg = small_config() if args.preset == "small" else sized_config(args.params, vocab_size=args.vocab)
        torch.manual_seed(0)
        save_model(DiffusionGemma(cfg), tmp)
        ckpt = tmp
    n_params = cfg.text.num_parameters()
    rates = {d: matmul_rate(DT[d], k=cfg.text.hidden_size, n=4 * cfg.text.hidden_size) for d in args.dtypes.split(",")}
    print(
        f"model: {n_params / 1e6:.1f}M parameters, canvas {cfg.canvas_length}, vocab {cfg.text.vocab_size}, "
        f"{cfg.text.num_hidden_layers} layers, hidden {cfg.text.hidden_size}; steps/canvas {args.steps}"
        f"{' (adaptive)' if args.adaptive else ' (fixed)'}; torch threads {torch.get_num_threads()}"
    )
    print(cpu_line())
    print("matmul rate: " + ", ".join(f"{d} {r:.0f} GFLOP/s" for d, r in rates.items()))
    rows = []
    header = (
        f"{'impl':10} {'dtype':9} {'batch':>5} {'tok/s':>9} {'tok/fwd':>8} {'ms/step':>9} {'%matmul':>8} "
        f"{'peak MiB':>9} {'vs ref':>7}"
    )
    print(header)
    print("-" * len(header))
    impls = args.impls.split(",")  # in this order: "baseline" listed first times the baseline tree first
    if args.baseline and "baseline" not in impls:
        impls.append("baseline")
    for dtype in args.dtypes.split(","):
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            for impl in impls:
                if impl == "reference" and b > args.reference_max_batch:
                    continue
                cmd = (
                    [
                        sys.executable,
                        __file__,
                        "--_one",
                        "--ckpt",
                        ckpt,
                        "--impl",
                        impl,
                        "--dtype",
                        dtype,
                        "--batch",
                        str(b),
                        "--steps",
                        str(args.steps),
                        "--prompt-len",
                        str(args.prompt_len),
                        "--max-new-tokens",
                        str(args.max_new_tokens),
                        "--repeat",
                        str(args.repeat),
                    ]
                    + (["--adaptive"] if args.adaptive else [])
                    + (["--threads", str(args.threads)] if args.threads else [])
                    + (["--src", os.path.abspath(args.baseline)] if impl == "baseline" else [])
                )
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"{impl} {dtype} batch {b} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                ms_step = pct = None
                if impl != "ar" and r["passes"]:
                    ms_step = 1000 * r["wall_s"] / r["passes"]
                    flops = step_flops(cfg, b, args.prompt_len + args.max_new_tokens // 2)
                    pct = 100 * flops / (ms_step / 1000) / 1e9 / rates[dtype]
                tpf = r["tokens"] / b / r["passes"] if r["passes"] else 1.0
                row = dict(
                    impl=impl,
                    dtype=dtype,
                    batch=b,
                    tok_s=r["tok_s"],
                    tokens_per_forward=tpf,
                    ms_per_step=ms_step,
                    pct_matmul=pct,
                    peak_mib=r["peak_mib"],
                )
                rows.append(row)
    # ratios against the reference of the same dtype and batch, and against the fp32 reference
    ref = {(r["dtype"], r["batch"]): r["tok_s"] for r in rows if r["impl"] == "reference"}
    for r in rows:
        base = ref.get((r["dtype"], r["batch"]))
        r["vs_ref"] = r["tok_s"] / base if base else None
        base32 = ref.get(("float32", r["batch"]))
        r["vs_ref_fp32"] = r["tok_s"] / base32 if base32 else None
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        print(
            f"{r['impl']:10} {r['dtype']:9} {r['batch']:>5} {r['tok_s']:>9.1f} {r['tokens_per_forward']:>8.2f} "
            f"{f(r['ms_per_step'], '>9.1f')} {f(r['pct_matmul'], '>8.0f')} {r['peak_mib']:>9.0f} "
            f"{f(r['vs_ref'], '>7.2f')}"
        )
    print(
        json.dumps(
            {
                "benchmark": "generate",
                "params": n_params,
                "steps": args.steps,
                "adaptive": args.adaptive,
                "matmul_gflops": rates,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
