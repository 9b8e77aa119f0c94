"""Sampler memory at the real vocabulary: peak memory above weights and cache while denoising, by batch size.

    python benchmarks/sampler_memory.py --batch-sizes 1,8,32 [--baseline /tmp/base --baseline-batch-sizes 1,4]

A random model with the real 262,144-token vocabulary and a small hidden size (so the (batch, canvas, vocab)
sampler buffers dominate), canvas 256, two fixed denoising steps. Each measurement runs in a fresh subprocess:
"above" is the process's peak resident memory minus its resident memory once the model, the engine and its KV
cache exist. `--baseline DIR` measures another dgemma source tree the same way (e.g. the previous commit, which
kept fp32 (batch, canvas, vocab) buffers for the whole batch: keep its batch sizes small, it needs ~1 GiB a row).
Prints a table and a final JSON line. Target: at most 2 GiB above weights and cache at batch 32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else os.path.dirname(HERE))

import torch  # noqa: E402

from dgemma import DiffusionGemma, save_model  # noqa: E402
from dgemma.model.config import tiny_config  # noqa: E402

GIB = 1 << 30


def rss() -> int:
    """Current resident memory in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(ckpt: str, batch: int, canvas: int) -> dict:
    from dgemma.entrypoints.llm import LLM
    from dgemma.engine.params import SamplingParams

    llm = LLM(ckpt, device="cpu", dtype="float32", max_batch=batch, max_model_len=64 + canvas)
    base = rss()
    sp = [
        SamplingParams(max_new_tokens=canvas, max_denoising_steps=2, fixed_steps=True, ignore_eos=True, seed=s)
        for s in range(batch)
    ]
    llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}] * batch, sp)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"base_bytes": base, "peak_bytes": peak, "above_bytes": peak - base}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--baseline", metavar="DIR", help="also measure dgemma from this source tree")
    ap.add_argument("--baseline-batch-sizes", default="1,4")
    ap.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(run_one(args.ckpt, args.batch, args.canvas)))
        return 0
    torch.manual_seed(0)
    cfg = tiny_config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        head_dim=16,
        global_head_dim=32,
        canvas_length=args.canvas,
        sliding_window=512,
        max_position_embeddings=4096,
    )
    ckpt = save_model(DiffusionGemma(cfg), tempfile.mkdtemp(prefix="dgemma-mem-"))
    plan = [("dgemma", None, int(b)) for b in args.batch_sizes.split(",")]
    if args.baseline:
        plan += [("baseline", os.path.abspath(args.baseline), int(b)) for b in args.baseline_batch_sizes.split(",")]
    print(
        f"model: vocab {args.vocab}, hidden {args.hidden}, canvas {args.canvas}, float32; "
        f"one row's fp32 (canvas, vocab) buffer is {args.canvas * args.vocab * 4 / GIB:.2f} GiB"
    )
    print(f"{'impl':9} {'batch':>5} {'base GiB':>9} {'peak GiB':>9} {'above GiB':>10}")
    rows = []
    for impl, src, b in plan:
        cmd = [
            sys.executable,
            __file__,
            "--_one",
            "--ckpt",
            str(ckpt),
            "--batch",
            str(b),
            "--canvas",
            str(args.canvas),
        ] + (["--src", src] if src else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{impl} batch {b} failed (exit {res.returncode}): {res.stderr.strip()[-300:]}", file=sys.stderr)
            rows.append({"impl": impl, "batch": b, "failed": res.returncode})
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append({"impl": impl, "batch": b, **r})
        print(
            f"{impl:9} {b:>5} {r['base_bytes'] / GIB:>9.2f} {r['peak_bytes'] / GIB:>9.2f} "
            f"{r['above_bytes'] / GIB:>10.2f}"
        )
    print(json.dumps({"benchmark": "sampler_memory", "vocab": args.vocab, "canvas": args.canvas, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
