"""Long-prompt benchmark: chunked prefill of a long prompt on a ~100M-parameter random model, then one canvas.

Reports prefill time and tok/s, the KV-cache size, and the process's peak resident memory, side by side with the
same prompt prefilled in one chunk (the unchunked baseline) at a smaller length. Table + final JSON line.

    python benchmarks/long_prompt.py --tokens 32768 --chunk 1024
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dgemma import DiffusionGemma  # noqa: E402
from dgemma.model.config import sized_config  # noqa: E402
from dgemma.engine.core import Engine  # noqa: E402
from dgemma.engine.params import SamplingParams  # noqa: E402


def one(tokens: int, chunk: int, params: float, dtype: str) -> dict:
    torch.manual_seed(0)
    cfg = sized_config(params)
    model = DiffusionGemma(cfg).to(getattr(torch, dtype)).eval()
    C = cfg.canvas_length
    eng = Engine(model, max_batch=1, max_model_len=tokens + 2 * C, prefill_chunk=chunk)
    prompt = torch.randint(3, cfg.vocab_size, (tokens,)).tolist()
    t = time.perf_counter()
    eng.add_request(
        prompt, SamplingParams(max_new_tokens=C, max_denoising_steps=4, fixed_steps=True, ignore_eos=True, seed=0)
    )
    t_prefill = None
    for _ in eng.stream():
        pass
    # the prefill is everything before the first decoder pass; time it by a second run of the prefill alone
    wall = time.perf_counter() - t
    eng2 = Engine(model, max_batch=1, max_model_len=tokens + 2 * C, prefill_chunk=chunk)
    t = time.perf_counter()
    eng2.add_request(prompt, SamplingParams(max_new_tokens=1, mode="ar", ignore_eos=True))
    for _ in eng2.stream():
        pass
    t_prefill = time.perf_counter() - t
    return {
        "tokens": tokens,
        "chunk": chunk,
        "params": cfg.text.num_parameters(),
        "prefill_s": t_prefill,
        "prefill_tok_s": tokens / t_prefill,
        "total_s": wall,
        "cache_mib": eng.cache.nbytes() / 2**20,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--baseline-tokens", type=int, default=4096, help="length for the one-chunk baseline")
    ap.add_argument("--_one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(one(args._one[0], args._one[1], args.params, args.dtype)))
        return 0
    runs = [(args.baseline_tokens, args.baseline_tokens), (args.baseline_tokens, args.chunk), (args.tokens, args.chunk)]
    rows = []
    print(f"{'tokens':>7} {'chunk':>6} {'prefill s':>10} {'tok/s':>8} {'cache MiB':>10} {'peak MiB':>9}")
    for n, c in runs:
        res = subprocess.run(
            [sys.executable, __file__, "--_one", str(n), str(c), "--params", str(args.params), "--dtype", args.dtype],
            capture_output=True,
            text=True,
        )
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"{n:>7} {c:>6} {r['prefill_s']:>10.1f} {r['prefill_tok_s']:>8.0f} {r['cache_mib']:>10.0f} "
            f"{r['peak_mib']:>9.0f}"
        )
    print(json.dumps({"benchmark": "long_prompt", "dtype": args.dtype, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
