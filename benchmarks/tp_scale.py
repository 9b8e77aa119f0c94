"""Tensor parallelism on one machine: per-rank weight memory and denoising step time at each tensor-parallel size.

    python benchmarks/tp_scale.py [--params 60e6] [--tp 1,2] [--batch 1] [--steps 8] [--threads N]
    python benchmarks/tp_scale.py --dry-run          # a tiny model, two steps: checks the script runs

A random Gemma-4-shaped model (`sized_config`: sliding and full layers, 8 experts, a 32,768-token vocabulary) is
saved once, then loaded at each size N (`LLM(tensor_parallel_size=N)`: N CPU processes with gloo, or N GPUs with
nccl when --device cuda). Weights: bytes of rank 0's model as loaded (measured), and of every rank's shard from the
same shard plan on the meta device (their maximum is what a device must hold); the ratio is to the whole model.
Step time: one canvas of `--steps` fixed denoising steps for `--batch` rows, after a warm-up canvas, divided by the
steps (the prefill of the 8-token prompts is included; it is small). On the CPU the N ranks share the threads
(`--threads`, default torch's): each rank runs threads // N.
Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dgemma import DiffusionGemma, save_model  # noqa: E402
from dgemma.engine.params import SamplingParams  # noqa: E402
from dgemma.model.config import sized_config, tiny_config  # noqa: E402

MIB = 1 << 20


def nbytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (the shard's own: tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen or t.device.type == "meta":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def shard_bytes(config, world: int, dtype: torch.dtype) -> list[int]:
    """Every rank's weight bytes from the shard plan (the loader's own `shard_modules`, on the meta device)."""
    from dgemma.parallel.layers import shard_modules
    from dgemma.parallel.plan import Plan

    out = []
    for rank in range(world):
        with torch.device("meta"):
            m = DiffusionGemma(config).to(dtype)
        if world > 1:
            shard_modules(m, Plan(config.text, rank, world))
        out.append(nbytes(m.to(dtype)))
    return out


def step_time(llm, batch: int, steps: int, canvas: int) -> float:
    """Seconds per denoising step: one canvas of `steps` fixed steps for `batch` rows (after a warm-up canvas)."""
    sp = [
        SamplingParams(max_new_tokens=canvas, max_denoising_steps=steps, fixed_steps=True, ignore_eos=True, seed=s)
        for s in range(batch)
    ]
    prompts = [{"prompt_token_ids": list(range(5, 13))}] * batch
    llm.generate(prompts, sp)
    t0 = time.perf_counter()
    llm.generate(prompts, sp)
    return (time.perf_counter() - t0) / steps


def measure(path: str, config, tp: int, args) -> dict:
    from dgemma.entrypoints.llm import LLM

    torch.set_num_threads(args.threads)  # launch gives each rank threads // N
    dtype = getattr(torch, args.dtype)
    llm = LLM(
        path, device=args.device, dtype=args.dtype, max_batch=args.batch, max_model_len=64 + config.canvas_length,
        tensor_parallel_size=tp,
    )  # fmt: skip
    try:
        sec = step_time(llm, args.batch, args.steps, config.canvas_length)
        ranks = shard_bytes(config, tp, dtype)
        return {"tp": tp, "rank0_bytes": nbytes(llm.model), "ranks_bytes": ranks, "step_s": sec}
    finally:
        llm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=60e6, help="model size (random weights)")
    ap.add_argument("--vocab", type=int, default=32_768)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--tp", default="1,2", help="tensor-parallel sizes, comma-separated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dry-run", action="store_true", help="a tiny model and two steps")
    args = ap.parse_args()
    if args.dry_run:
        config, args.steps = tiny_config(vocab_size=257, canvas_length=16), 2
    else:
        config = sized_config(args.params, vocab_size=args.vocab, canvas_length=args.canvas)
    sizes = [int(s) for s in args.tp.split(",")]
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        save_model(DiffusionGemma(config).to(getattr(torch, args.dtype)), d)
        rows = [measure(d, config, tp, args) for tp in sizes]
    whole = rows[0]["ranks_bytes"][0] if sizes[0] == 1 else sum(rows[0]["ranks_bytes"])
    print(f"{config.text.num_parameters() / 1e6:.0f}M parameters, {args.dtype}, batch {args.batch}, canvas "
          f"{config.canvas_length}, {args.steps} steps; {platform.processor() or platform.machine()}, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'TP':>3} {'rank 0 MiB':>11} {'max rank MiB':>13} {'of whole':>9} {'ms/step':>9} {'speed-up':>9}")
    for r in rows:
        r["weight_ratio"] = max(r["ranks_bytes"]) / whole
        r["speedup"] = rows[0]["step_s"] / r["step_s"]
        print(
            f"{r['tp']:>3} {r['rank0_bytes'] / MIB:>11.1f} {max(r['ranks_bytes']) / MIB:>13.1f} "
            f"{r['weight_ratio']:>9.3f} {r['step_s'] * 1e3:>9.1f} {r['speedup']:>9.2f}"
        )
    meta = {"params": config.text.num_parameters(), "dtype": args.dtype, "batch": args.batch, "steps": args.steps}
    meta.update(threads=args.threads, cpu=platform.processor() or platform.machine(), device=args.device)
    print(json.dumps({**meta, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
