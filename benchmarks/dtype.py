"""Does `dtype="auto"` pick the faster dtype on this CPU? Milliseconds per denoising step of three models in float32,
bfloat16 and auto, in both run orders; a table, then a final JSON line.

    python benchmarks/dtype.py            # the full table: a few minutes on a quiet 2-core CPU
    python benchmarks/dtype.py --quick    # a dry run: one short timing of each

Models: the bundled Sudoku model (hidden 128; its prompt is a puzzle, 81 new tokens), the small preset of
benchmarks/generate.py (hidden 256) and a 75M Gemma-4-shaped model (hidden 640), both of random weights. The
rule `auto` follows is in dgemma/model/device.py (`CPU_BF16_MIN_WORK`) and docs/device.md: it weighs the hidden
size times the engine's rows, so each batch loads its three models with `max_batch` equal to that batch.

A row is one model, one batch and one run order: the three dtypes are timed in turn (float32, bfloat16, auto, or the
reverse), `--repeat` times each, with the same prompts and a fixed number of denoising steps, and the fastest run
counts. `auto` loads its own copy of the model in the dtype it picked; its time is the best of its own runs and those
of that dtype. Its verdict: "auto within 5 % of the faster", or how much slower it is. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from generate import cpu_line, small_config  # noqa: E402

from dgemma import LLM, DiffusionGemma, SamplingParams, save_model  # noqa: E402
from dgemma.model.config import ModelConfig, sized_config  # noqa: E402
from dgemma.model.device import dtype_name, resolve  # noqa: E402
from dgemma.tasks.sudoku_model import prompt_ids  # noqa: E402

DTYPES = ("float32", "bfloat16", "auto")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
PUZZLE = "000723000900560000230100057620000103050097800009000475002931586090006004506874320"
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
MAX_LEN = 512  # prompt and one canvas, for every model
TOLERANCE = 0.05  # auto may be this much slower than the faster dtype (timing noise)


def width_config(hidden: int) -> ModelConfig:
    """The small preset scaled to `hidden` (heads, MLP and expert widths with it; 6 layers, vocab 8,192, canvas 64)."""
    cfg = small_config()
    heads = max(2, hidden // 64)
    text = dataclasses.replace(
        cfg.text,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
    )
    return dataclasses.replace(cfg, text=text)


def checkpoint(name: str, tmp: str) -> str:
    """The checkpoint of model `name`: the bundled Sudoku model, or one of random weights saved to `tmp`: the small
    preset, a 75M model, or "h<N>", the small preset at hidden size N."""
    if name == "sudoku":
        return "sudoku"
    if name.startswith("h") and name[1:].isdigit():
        cfg = width_config(int(name[1:]))
    else:
        cfg = {"small": small_config, "75M": lambda: sized_config(75e6)}[name]()
    torch.manual_seed(0)
    save_model(DiffusionGemma(cfg), os.path.join(tmp, name))
    return os.path.join(tmp, name)


def prompts(llm: LLM, name: str, batch: int) -> tuple[list[dict], int]:
    """`batch` token-id prompts for the model `name`, and how many new tokens (one canvas) each asks for."""
    if name == "sudoku":
        return [{"prompt_token_ids": prompt_ids(PUZZLE)}] * batch, 81
    ids = [[3 + (7 * i + 13 * j) % 997 for j in range(32)] for i in range(batch)]
    return [{"prompt_token_ids": p} for p in ids], llm.model.config.canvas_length


def ms_per_step(llm: LLM, batch_prompts: list[dict], params: SamplingParams, clock) -> float:
    """Milliseconds per denoising step (one batched forward) of one generate call, by `clock`."""
    t = clock()
    outs = llm.generate(batch_prompts, params)
    wall = clock() - t
    return 1000 * wall / (sum(o.metrics["decoder_passes"] for o in outs) / len(outs))


def measure(llms: dict[str, LLM], name: str, batch: int, order: tuple[str, ...], args) -> dict[str, float]:
    """{dtype: best ms/step} for one model and batch, the dtypes timed in `order`, `args.repeat` rounds."""
    batch_prompts, new = prompts(llms["float32"], name, batch)
    params = SamplingParams(
        max_new_tokens=new, max_denoising_steps=args.steps, fixed_steps=True, ignore_eos=True, seed=0
    )
    best = dict.fromkeys(order, float("inf"))
    for _ in range(args.repeat):
        for d in order:
            best[d] = min(best[d], ms_per_step(llms[d], batch_prompts, params, CLOCKS[args.clock]))
    return best


def load(name: str, ckpt: str, batch: int) -> dict[str, LLM]:
    """{dtype: LLM} for one model and batch (an engine of `batch` rows, what `auto` weighs), warmed up."""
    llms = {d: LLM(ckpt, device="cpu", dtype=d, max_batch=batch, max_model_len=MAX_LEN) for d in DTYPES}
    for llm in llms.values():  # warm-up: first calls allocate caches and pick kernels
        p, _ = prompts(llm, name, batch)
        llm.generate(p, SamplingParams(max_new_tokens=8, max_denoising_steps=1, ignore_eos=True))
    return llms


def model_rows(name: str, ckpt: str, batches: list[int], args) -> list[dict]:
    """The rows of one model: each batch in both run orders."""
    rows = []
    for batch in batches:
        llms = load(name, ckpt, batch)
        cfg = llms["float32"].model.config
        head = dict(
            model=name,
            params=cfg.text.num_parameters(),
            hidden=cfg.text.hidden_size,
            auto_dtype=dtype_name(llms["auto"].dtype),
            auto_why=resolve("cpu", "auto", model=ckpt, max_batch=batch).why_dtype,
        )
        for order in (DTYPES, DTYPES[::-1]):
            rows.append(row(head, batch, order, measure(llms, name, batch, order, args)))
            print_row(rows[-1])
        del llms  # free this batch's three models before the next batch loads its own
    return rows


def row(head: dict, batch: int, order: tuple[str, ...], ms: dict[str, float]) -> dict:
    """One row of the table. auto's time is the best of its own runs and those of the dtype it picked (the same
    computation), so that one slow run of a third copy does not decide its verdict."""
    faster = min(("float32", "bfloat16"), key=lambda d: ms[d])
    auto = min(ms["auto"], ms[head["auto_dtype"]])
    return dict(
        head,
        batch=batch,
        order=",".join(order),
        float32_ms=ms["float32"],
        bfloat16_ms=ms["bfloat16"],
        auto_ms=auto,
        faster=faster,
        auto_vs_faster=auto / ms[faster],
        ok=auto <= (1 + TOLERANCE) * ms[faster],
    )


def verdict(row: dict) -> str:
    if row["ok"]:
        return f"auto within {TOLERANCE:.0%} of the faster".replace("%", " %")
    return f"auto {row['auto_vs_faster'] - 1:.0%} slower than the faster".replace("%", " %")


HEADER = (
    f"{'model':7} {'hidden':>6} {'batch':>5} {'order':24} {'float32':>8} {'bfloat16':>8} {'bf16/fp32':>9} "
    f"{'faster':>6} {'auto':>12}  verdict"
)


def print_row(r: dict) -> None:
    auto = f"{r['auto_ms']:.2f} {SHORT[r['auto_dtype']]}"
    print(
        f"{r['model']:7} {r['hidden']:>6} {r['batch']:>5} {r['order']:24} {r['float32_ms']:>8.2f} "
        f"{r['bfloat16_ms']:>8.2f} {r['bfloat16_ms'] / r['float32_ms']:>9.2f} "
        f"{SHORT[r['faster']]:>6} {auto:>12}  {verdict(r)}",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        default="sudoku,small,75M",
        help="comma list of sudoku, small, 75M and h<N> (the small preset at hidden size N, e.g. h192)",
    )
    ap.add_argument("--batches", default="1,8", help="batches for the small preset and the h<N> models")
    ap.add_argument("--batches-sudoku", default="1,2,8", help="batches for the Sudoku model")
    ap.add_argument("--batches-75m", default="1,2", help="batches for the 75M model (a step at batch 8 takes seconds)")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per canvas (fixed)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per dtype and row; the fastest counts")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="process: this process's CPU time, which other processes barely disturb (with --threads 1)",
    )
    ap.add_argument("--quick", action="store_true", help="a dry run: --repeat 1 --steps 2")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.steps = 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(cpu_line())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps per canvas, best of "
        f"{args.repeat}; {args.clock} ms per denoising step"
    )
    print(HEADER)
    print("-" * len(HEADER))
    rows = []
    with tempfile.TemporaryDirectory(prefix="dgemma-dtype-") as tmp:
        for name in args.models.split(","):
            batches = {"75M": args.batches_75m, "sudoku": args.batches_sudoku}.get(name, args.batches)
            rows += model_rows(name, checkpoint(name, tmp), [int(b) for b in batches.split(",")], args)
    ok = all(r["ok"] for r in rows)
    print(f"auto within {TOLERANCE:.0%} of the faster in every row: {'yes' if ok else 'no'}".replace("%", " %"))
    print(
        json.dumps(
            {
                "benchmark": "dtype",
                "cpu": cpu_line(),
                "threads": torch.get_num_threads(),
                "clock": args.clock,
                "steps": args.steps,
                "repeat": args.repeat,
                "all_ok": ok,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
