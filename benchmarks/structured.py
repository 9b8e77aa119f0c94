"""What does constraining cost? Tokens per forward and tok/s with and without structured output, same prompts.

    python benchmarks/structured.py                       # a random ~5M model with a small BPE tokenizer
    python benchmarks/structured.py --model PATH          # any checkpoint with a tokenizer.json
    python benchmarks/structured.py --train-steps 600     # first teach the random model the JSON format

Runs, on the same prompts and seeds: diffusion free / JSON schema / regex, and the AR baseline free / JSON schema.
Random weights are the worst case for parallelism (every free choice is a coin toss, so only forced tokens come in
runs); a trained model accepts longer runs. Prints a table and a final JSON line. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "email", "tags", "address"],
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.com$"},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city", "zip"],
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
        },
    },
}
REGEX = r"[A-Z][a-z]{2,8} [0-9]{1,3} (street|road|avenue), [0-9]{5}"


def build_model(params: float, canvas: int) -> Path:
    from bpe import build_bpe_tokenizer

    from dgemma import DiffusionGemma, save_model
    from dgemma.model.config import sized_config

    d = Path(tempfile.mkdtemp(prefix="dgemma-structured-")) / "model"
    build_bpe_tokenizer(d, 300)
    cfg = sized_config(params, vocab_size=300, canvas_length=canvas)
    cfg.text.pad_token_id, cfg.text.eos_token_id, cfg.text.bos_token_id = 0, 1, 2
    torch.manual_seed(0)
    save_model(DiffusionGemma(cfg), d, tokenizer_dir=d)
    return d


def _record(rng) -> dict:
    """A random record that satisfies SCHEMA (training data for the --train-steps demo model)."""
    names = ["ada", "bob", "carla", "dan", "eve", "frank", "grace", "heidi", "ivan", "judy"]
    cities = ["paris", "rome", "oslo", "lima", "cairo", "tokyo", "quito", "perth"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    return {
        "name": rng.choice(names).capitalize() + " " + rng.choice(names).capitalize(),
        "age": rng.randint(0, 120),
        "email": "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
        + "@"
        + "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
        + ".com",
        "tags": rng.sample(["admin", "user", "guest"], rng.randint(0, 3)),
        "address": {"city": rng.choice(cities).capitalize(), "zip": f"{rng.randint(0, 99999):05d}"},
    }


def train_demo(path: Path, steps: int) -> Path:
    """Fine-tune the random model on JSON records (prompt "Write record number i as JSON:"), so that the benchmark
    also shows a model that has learned the format."""
    import random

    from dgemma.training.config import TrainConfig
    from dgemma.training.train import run_training

    rng = random.Random(0)
    data = path.parent / "records.jsonl"
    with data.open("w") as f:
        for i in range(4000):
            f.write(
                json.dumps(
                    {
                        "prompt": f"Write record number {i} as JSON:",
                        "completion": json.dumps(_record(rng), separators=(",", ":")),
                    }
                )
                + "\n"
            )
    cfg = TrainConfig(
        steps=steps,
        batch_size=16,
        lr=2e-3,
        warmup_steps=min(50, steps // 5),
        prompt_loss=False,
        weight_decay=0.01,
        betas=(0.9, 0.99),
        log_every=max(1, steps // 10),
    )
    return run_training(path, data, path.parent / "trained", cfg, resume=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint with tokenizer.json (default: a random model built here)")
    ap.add_argument("--params", type=float, default=5e6, help="size of the random model (default: %(default)g)")
    ap.add_argument("--canvas", type=int, default=64, help="canvas length of the random model (default: 64)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per run (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=256, help="(default: %(default)s)")
    ap.add_argument("--batch", type=int, default=4, help="engine batch size (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="first fine-tune the random model on JSON records for this many steps (dgemma train), "
        "to measure a model that knows the format as well (default: 0, random weights only)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import jsonschema

    from dgemma import LLM, SamplingParams
    from dgemma.engine.request import tokens_per_forward

    path = Path(args.model) if args.model else build_model(args.params, args.canvas)
    if args.train_steps:
        path = train_demo(path, args.train_steps)
    llm = LLM(path, max_batch=args.batch, max_model_len=4096)
    prompts = [f"Write record number {i} as JSON:" for i in range(args.prompts)]

    def check_json(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    # "valid" counts outputs that satisfy the schema (regex row: the regex), constrained or not: the prompts ask for
    # a JSON record, so the unconstrained rows show how often the model gets it right by itself.
    runs = [
        ("diffusion", "none", {}, check_json),
        ("diffusion", "json_schema", {"json_schema": SCHEMA}, check_json),
        ("diffusion", "regex", {"regex": REGEX}, lambda t: re.fullmatch(REGEX, t) is not None),
        ("ar", "none", {"temperature": 1.0}, check_json),
        ("ar", "json_schema", {"json_schema": SCHEMA, "temperature": 1.0}, check_json),
    ]
    llm.generate(prompts[:1], SamplingParams(max_new_tokens=8, seed=0, regex="[a-z]+"))  # warm-up, compile caches
    rows = []
    for mode, constraint, extra, check in runs:
        params = [
            SamplingParams(max_new_tokens=args.max_tokens, seed=i, mode=mode, **extra) for i in range(len(prompts))
        ]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        toks = sum(len(o.outputs[0].token_ids) for o in outs)
        fwd = sum(o.metrics.get("forwards", 0) for o in outs)
        valid = sum(check(o.outputs[0].text) for o in outs)
        stopped = sum(o.outputs[0].finish_reason == "stop" for o in outs)
        rows.append(
            {
                "mode": mode,
                "constraint": constraint,
                "requests": len(outs),
                "tokens": toks,
                "forwards": fwd,
                "tokens_per_forward": tokens_per_forward(toks, fwd),
                "tok_s": toks / wall,
                "wall_s": wall,
                "valid": valid,
                "finished_stop": stopped,
            }
        )
    print(f"model: {path}  threads: {torch.get_num_threads()}  prompts: {len(prompts)}  batch: {args.batch}")
    print(
        f"{'mode':<10}{'constraint':<13}{'tokens':>8}{'forwards':>10}{'tok/fwd':>9}{'tok/s':>9}{'valid':>8}{'stop':>6}"
    )
    for r in rows:
        v = f"{r['valid']}/{r['requests']}"
        print(
            f"{r['mode']:<10}{r['constraint']:<13}{r['tokens']:>8}{r['forwards']:>10}"
            f"{r['tokens_per_forward']:>9.2f}{r['tok_s']:>9.1f}{v:>8}{r['finished_stop']:>6}"
        )
    print(json.dumps({"benchmark": "structured", "model": str(path), "train_steps": args.train_steps, "rows": rows}))


if __name__ == "__main__":
    main()
