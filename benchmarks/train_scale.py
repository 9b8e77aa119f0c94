"""Training throughput and memory per process: 1 and 2 processes, data parallel (ddp) and sharded (fsdp), on the CPU.

    python benchmarks/train_scale.py [--params 6e6] [--steps 10] [--batch-size 8] [--dry-run]

A random Gemma-4-shaped model (`sized_config`: `--params` parameters, a 4096-token vocabulary, canvas 32), the
diffusion objective on random token examples (prompts of 16 tokens, responses of 1-2 canvases), AdamW, float32,
gloo. Each configuration runs in its own `torchrun` (one torch thread per process, so 2 processes use 2 cores),
through `Trainer` itself (no checkpoints). Per configuration:

- steps/s: optimizer steps per second after `--warmup` untimed steps (the same global batch whatever the number of
  processes, so 2 processes each take half);
- per process: peak resident memory, its growth since just before the model was built, and the bytes of model
  state it holds (parameters, gradients and AdamW moments: its shards under fsdp, all of them under ddp).

Prints a table and a final JSON line. `--dry-run`: a tiny model (`tiny_config`, 0.17M parameters at this vocabulary)
and 2 steps, to check that it runs. The default full run takes about 2-3 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CONFIGS = [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]
MIB = 1 << 20


def rss() -> int:
    """Current resident memory in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- one process of one configuration (run by torchrun) ---------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch

    from dgemma import DiffusionGemma
    from dgemma.model.config import sized_config, tiny_config
    from dgemma.training.config import TrainConfig
    from dgemma.training.data import Example
    from dgemma.training.distributed import process_group
    from dgemma.training.fsdp import local
    from dgemma.training.trainer import Trainer

    torch.set_num_threads(1)
    cfg = TrainConfig(steps=10**6, batch_size=args.batch_size, warmup_steps=1, strategy=args.strategy)
    cfg.precision = "float32"
    g = torch.Generator().manual_seed(0)
    V, C = 4096, 32

    def tokens(n: int) -> list[int]:
        return torch.randint(3, V, (n,), generator=g).tolist()

    examples = [Example(tokens(16), tokens(C * (1 + i % 2) - 1)) for i in range(64)]  # responses of 1-2 canvases
    with process_group(cfg.strategy, cfg.dist_timeout) as info:
        before = rss()
        torch.manual_seed(0)
        spec = tiny_config(vocab_size=V, canvas_length=C) if args.tiny else sized_config(args.params, V, C)
        model = DiffusionGemma(spec)
        tr = Trainer(model, examples, cfg, out_dir="/nonexistent", dist=info)
        for _ in range(args.warmup):
            tr.train_step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tr.train_step()
        elapsed = time.perf_counter() - t0
        state = sum(local(p).numel() * 3 for p in model.parameters())  # weights, gradients, (AdamW below)
        state += sum(local(v).numel() for st in tr.opt.state.values() for k, v in st.items() if k != "step")
        row = {
            "steps_per_s": args.steps / elapsed,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,
            "rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / MIB,
            "state_mib": state * 4 / MIB,
            "params": sum(p.numel() for p in model.parameters()),
        }
        with open(os.path.join(args.out, f"rank-{info.rank}.json"), "w") as f:
            json.dump(row, f)


# -- the driver -------------------------------------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(strategy: str, ranks: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(_port()), os.path.abspath(__file__), "--worker", "--strategy", strategy]
    cmd += ["--params", str(args.params), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--batch-size", str(args.batch_size)] + (["--tiny"] if args.tiny else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([*cmd, "--out", d], env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"{strategy} x {ranks} failed:\n{out.stderr[-3000:]}")
        rows = [json.loads(open(os.path.join(d, f"rank-{r}.json")).read()) for r in range(ranks)]
    return {
        "strategy": strategy,
        "processes": ranks,
        "steps_per_s": round(min(r["steps_per_s"] for r in rows), 3),  # the step ends when the slowest process does
        "peak_rss_mib": [round(r["peak_rss_mib"], 1) for r in rows],
        "rss_growth_mib": [round(r["rss_growth_mib"], 1) for r in rows],
        "state_mib": [round(r["state_mib"], 1) for r in rows],
        "params": rows[0]["params"],
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=float, default=6e6, help="model parameters (default: 6e6)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=8, help="global examples per step")
    p.add_argument("--dry-run", action="store_true", help="a tiny model, 2 steps: check that it runs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.dry_run:
        args.tiny, args.steps, args.warmup = True, 2, 1
    t0 = time.perf_counter()
    runs = [run_config(s, n, args) for s, n in CONFIGS]
    print(f"{'strategy':<9}{'procs':>6}{'steps/s':>9}  {'peak RSS MiB':<16}{'growth MiB':<16}{'model state MiB':<16}")
    for r in runs:
        cells = [", ".join(f"{x:g}" for x in r[k]) for k in ("peak_rss_mib", "rss_growth_mib", "state_mib")]
        head = f"{r['strategy']:<9}{r['processes']:>6}{r['steps_per_s']:>9.3f}  "
        print(head + "".join(f"{c:<16}" for c in cells))
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "params": runs[0]["params"], "batch_size": args.batch_size}
    info |= {"steps": args.steps, "wall_s": round(time.perf_counter() - t0, 1), "runs": runs}
    print(json.dumps(info))


if __name__ == "__main__":
    main()
