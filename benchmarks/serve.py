"""Serving benchmark: drive an OpenAI-compatible dgemma server at several concurrency levels.

    # against a running server
    python benchmarks/serve.py --url http://127.0.0.1:8000 --concurrency 1,2,4,8,16,32 --num-requests 64
    # or start one (python -m dgemma.entrypoints.server) on a free port for the run
    python benchmarks/serve.py --model PATH --max-batch 16 --concurrency 1,4,16 --num-requests 32

For each mode (diffusion, ar: the same checkpoint, `mode` request field) and each concurrency level, N streaming
/v1/completions requests are sent by `concurrency` closed-loop clients. Reported per level:

- request throughput (req/s) and output throughput (completion tokens/s) over the level's wall time;
- TTFT: request sent -> first non-empty text chunk;
- TPOT: (latency - TTFT) / (completion tokens - 1), per request;
- ITL: time between successive text chunks (a diffusion chunk is a whole canvas, an AR chunk one token, so
  compare TPOT across modes, not ITL);
- tokens per forward pass (from usage), end-to-end latency; mean / p50 / p99 of each (milliseconds).

Completion token counts come from the final usage chunk (`stream_options.include_usage`). `--ignore-eos` (default
on) keeps output lengths equal to --max-tokens, so the modes are comparable. A table is printed, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

WORDS = (
    "the quick brown fox jumps over lazy dog model user answer question name value city price count item "
    "result status hello world diffusion block token canvas sample step number list object array"
).split()


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    return {"mean": statistics.fmean(xs), "p50": pct(xs, 0.5), "p99": pct(xs, 0.99)}


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    chunk_times: list[float] = []
    usage: dict[str, Any] | None = None
    error: str | None = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    error = obj["error"].get("message", "error")
                    continue
                if obj.get("usage"):
                    usage = obj["usage"]
                if obj.get("choices") and obj["choices"][0].get("text"):
                    chunk_times.append(time.perf_counter())
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if error is not None:
        return {"error": error}
    n = (usage or {}).get("completion_tokens", 0)
    ttft = (chunk_times[0] - t0) if chunk_times else end - t0
    return {
        "latency": end - t0,
        "ttft": ttft,
        "tokens": n,
        "tpot": (end - t0 - ttft) / (n - 1) if n > 1 else None,
        "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
        "tokens_per_forward": (usage or {}).get("tokens_per_forward"),
    }


async def run_level(url: str, model: str, mode: str, concurrency: int, prompts: list[str], args) -> dict[str, Any]:
    bodies = [
        {
            "model": model,
            "prompt": p,
            "max_tokens": args.max_tokens,
            "seed": args.seed + i,
            "stream": True,
            "stream_options": {"include_usage": True},
            "mode": mode,
            "ignore_eos": args.ignore_eos,
        }
        for i, p in enumerate(prompts)
    ]
    if args.max_denoising_steps is not None and mode == "diffusion":
        for b in bodies:
            b["max_denoising_steps"] = args.max_denoising_steps
    todo = list(reversed(bodies))
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:

        async def worker() -> None:
            while todo:
                results.append(await one_request(client, url, todo.pop()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ms = lambda xs: {k: v * 1000 for k, v in summary(xs).items()}  # noqa: E731
    tokens = sum(r["tokens"] for r in ok)
    return {
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": wall,
        "request_throughput": len(ok) / wall,
        "output_throughput": tokens / wall,
        "completion_tokens": tokens,
        "tokens_per_forward": statistics.fmean(tpf)
        if (tpf := [r["tokens_per_forward"] for r in ok if r["tokens_per_forward"]])
        else None,
        "ttft_ms": ms([r["ttft"] for r in ok]),
        "tpot_ms": ms([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_ms": ms([x for r in ok for x in r["itl"]]),
        "e2e_ms": ms([r["latency"] for r in ok]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    conc = max(int(c) for c in args.concurrency.split(","))
    cmd = [
        sys.executable,
        "-m",
        "dgemma.entrypoints.server",
        "--model",
        args.model,
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        str(max(64, 2 * conc)),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not become healthy in time")


def fmt(d: dict[str, float]) -> str:
    return f"{d['mean']:8.1f} {d['p50']:8.1f} {d['p99']:8.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="base URL of a running server")
    src.add_argument("--model", help="checkpoint directory: start `python -m dgemma.entrypoints.server` for the run")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32", help="comma-separated client counts")
    ap.add_argument("--num-requests", type=int, default=32, help="requests per concurrency level and mode")
    ap.add_argument("--modes", default="diffusion,ar", help="comma-separated: diffusion, ar")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=32, help="words per synthetic prompt")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-denoising-steps", type=int, default=None, help="diffusion mode only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="requests sent before measuring each mode")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout (s)")
    # only with --model
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)

    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(c < 1 for c in levels) or not levels:
        ap.error("--concurrency needs positive integers")
    if any(m not in ("diffusion", "ar") for m in modes):
        ap.error("--modes: diffusion and/or ar")

    proc = None
    url = args.url
    if args.model:
        proc, url = start_server(args)
    url = url.rstrip("/")
    try:
        info = httpx.get(url + "/v1/models", timeout=30).json()
        model = info["data"][0]["id"]
        prompts = make_prompts(args.num_requests, args.prompt_words, args.seed)
        rows = []
        for mode in modes:
            if args.warmup:
                asyncio.run(run_level(url, model, mode, 1, prompts[: args.warmup], args))
            for c in levels:
                res = asyncio.run(run_level(url, model, mode, c, prompts, args))
                rows.append(res)
                print(
                    f"  {mode:9s} c={c:<3d} {res['request_throughput']:.2f} req/s "
                    f"{res['output_throughput']:.1f} tok/s errors={res['errors']}"
                    + (f" (first: {res['first_error']})" if res["errors"] else ""),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    head = (
        f"{'mode':9s} {'conc':>4s} {'req/s':>7s} {'tok/s':>8s} {'tok/fwd':>7s} | {'TTFT ms mean/p50/p99':>26s} | "
        f"{'TPOT ms mean/p50/p99':>26s} | {'ITL ms mean/p50/p99':>26s} | {'E2E ms mean/p50/p99':>26s} | err"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        tpf = f"{r['tokens_per_forward']:7.2f}" if r["tokens_per_forward"] else f"{'-':>7s}"
        print(
            f"{r['mode']:9s} {r['concurrency']:4d} {r['request_throughput']:7.2f} "
            f"{r['output_throughput']:8.1f} {tpf} | "
            f"{fmt(r['ttft_ms'])} | {fmt(r['tpot_ms'])} | {fmt(r['itl_ms'])} | {fmt(r['e2e_ms'])} | "
            f"{r['errors']}"
        )
    config = {k: v for k, v in vars(args).items()}
    print(json.dumps({"benchmark": "serve", "url": url, "model": model, "config": config, "results": rows}))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
