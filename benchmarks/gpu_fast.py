"""The fast GPU step at DiffusionGemma 26B-A4B shapes (random bf16 weights), every variant in one run.

    python benchmarks/gpu_fast.py --out "$OUT/gpu_fast.jsonl"          # on an H100/H200: about 5 minutes
    python benchmarks/gpu_fast.py --tiny --device cpu                  # a dry run of the script on CPU (seconds)

Per batch size (default 1 and 8), canvas 256, 16 fixed denoising steps, ms per step and tok/s for:

- `reference`: transformers' `generate` (one canvas; wall time / steps, prefill and commit included);
- `engine`: dgemma's `Engine` as `LLM` runs it: steps replayed per batch bucket (CUDA graphs on CUDA,
  dgemma/engine/graphs.py; the default sampler budget, an eighth of the free memory, holds batch 8 in one bucket);
- `engine-eager`: the same with `graphs=False` (the same step function on exact shapes);
- `step-eager`: `engine.step.denoise_step` and the next self-conditioning input, run eagerly;
- `step-graph`: the same step captured once in a CUDA graph and replayed (copy inputs in, replay);
- `step-compile-graph`: `torch.compile` of the step, then captured (skipped with --no-compile);
- `fp8-graph`: the model quantized to FP8 (`quant.quantize_fp8`), captured;
- `ar`: dgemma's AR path on the same weights (engine; on CUDA each decode step a captured graph per batch bucket,
  dgemma/engine/graphs.py);
- `ar-eager`: the same with `graphs=False`.

Step variants are timed with CUDA events after warm-up; their tok/s adds one commit encode per canvas
(C tokens per `steps` steps + 1 encode). A roofline line (weight bytes one step reads / HBM bandwidth), the top
kernels of one profiled eager step, a table and a final JSON line follow. Each result is also appended to --out as
a JSON line the moment it exists, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from gpu_bench import SHAPES_26B, TINY, build, roofline_ms  # noqa: E402

from dgemma.model.config import ModelConfig, TextConfig  # noqa: E402
from dgemma.engine.core import Engine  # noqa: E402
from dgemma.engine.sampler import rule_ids  # noqa: E402
from dgemma.engine.step import StepInputs, denoise_step  # noqa: E402
from dgemma.model.modeling import DiffusionGemma  # noqa: E402
from dgemma.engine.params import SamplingParams  # noqa: E402
from dgemma.engine.sampler import draw_uniforms  # noqa: E402


class Bench:
    """Shared state: the model, the device, the output file, the rows measured so far."""

    def __init__(self, args, hf, model):
        self.args, self.hf, self.model = args, hf, model
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.C = model.config.canvas_length
        self.rows: list[dict] = []

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def record(self, **row) -> None:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else 0.0
        self.rows.append(row)
        ms = f"{row['ms_per_step']:9.2f}" if row.get("ms_per_step") else f"{'-':>9}"
        print(f"{row['impl']:20} {row['batch']:>5} {row['tok_s']:>9.1f} {ms} {row['peak_gib']:>9.1f}", flush=True)
        if self.args.out:
            with open(self.args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    def timed(self, fn: Callable[[], object], n: int) -> float:
        """Milliseconds per call of `fn` after warm-up (CUDA events on a GPU, wall clock on CPU)."""
        for _ in range(2):
            fn()
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / n
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) * 1e3 / n


def step_inputs(b: Bench, batch: int):
    """A cache holding `batch` prompts, and the step's inputs (canvas, soft, uniforms, temperature, bound, masks)."""
    m, C = b.model, b.C
    V = m.config.text.vocab_size
    cache = m.new_cache(batch, b.args.prompt_len + 2 * C)
    g = torch.Generator(device=b.dev).manual_seed(0)
    with torch.no_grad():
        m.encode(torch.randint(3, V, (batch, b.args.prompt_len), device=b.dev, generator=g), cache)
    canvas = torch.randint(0, V, (batch, C), device=b.dev, generator=g)
    soft = torch.zeros(batch, C, m.config.text.hidden_size, dtype=m.dtype, device=b.dev)
    u = draw_uniforms([torch.Generator(device=b.dev).manual_seed(s) for s in range(batch)], C, b.dev)
    temp, bound = torch.full((batch,), 0.6, device=b.dev), torch.full((batch,), 0.1, device=b.dev)
    return cache, dict(canvas=canvas, soft=soft, u=u), temp, bound, cache.decoder_masks(C, in_place=True)


def step_variant(b: Bench, batch: int, impl: str, graph: bool, compile_: bool = False) -> None:
    """Time `denoise_step` eagerly or replayed from a CUDA graph; the next step's inputs are the last outputs."""
    m = b.model
    cache, static, temp, bound, masks = step_inputs(b, batch)

    rule, free = rule_ids(["entropy_bound"] * batch, b.dev), torch.full((batch, b.C), -1, device=b.dev)

    def step(canvas, soft, u):  # the step and the next self-conditioning input, as the engine runs them
        out = denoise_step(m, cache, StepInputs(canvas, soft, u, temp, bound, rule, free), masks)
        return out.canvas, m.soft_embedding(out.probs)

    fn = torch.compile(step, dynamic=False) if compile_ else step
    with torch.no_grad():
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up (and compilation) outside the capture
                    fn(**static)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out_canvas, out_soft = fn(**static)

            def run():
                g.replay()
                static["canvas"].copy_(out_canvas)
                static["soft"].copy_(out_soft)
        else:

            def run():
                c, s = fn(**static)
                static["canvas"], static["soft"] = c, s

        ms = b.timed(run, b.args.steps)
        commit = torch.randint(0, m.config.text.vocab_size, (batch, b.C), device=b.dev)
        enc_ms = b.timed(lambda: (cache.reset_rows(), m.encode(commit, cache)), 2)
    tok_s = batch * b.C / ((b.args.steps * ms + enc_ms) / 1e3)
    b.record(impl=impl, batch=batch, ms_per_step=ms, commit_ms=enc_ms, tok_s=tok_s)


def engine_variant(b: Bench, batch: int, mode: str, graphs: bool = True) -> None:
    """dgemma's `Engine` (diffusion or AR): wall time of one canvas (or C AR tokens) per row, after warm-up."""
    a, C = b.args, b.C
    V = b.model.config.text.vocab_size
    eng = Engine(b.model, max_batch=batch, max_model_len=a.prompt_len + 3 * C, graphs=graphs)
    print(f"  engine: {eng.describe()}", flush=True)
    prompts = torch.randint(3, V, (batch, a.prompt_len)).tolist()
    sp = SamplingParams(
        max_new_tokens=C, max_denoising_steps=a.steps, fixed_steps=True, ignore_eos=True, seed=0, mode=mode
    )
    for p in prompts:
        eng.add_request(p[:8], SamplingParams(max_new_tokens=8, max_denoising_steps=1, ignore_eos=True, mode=mode))
    list(eng.stream())
    b.sync()
    t = time.perf_counter()
    for p in prompts:
        eng.add_request(p, sp)
    list(eng.stream())
    b.sync()
    wall = time.perf_counter() - t
    b.record(
        impl=("engine" if mode == "diffusion" else "ar") + ("" if graphs else "-eager"),
        batch=batch,
        tok_s=batch * C / wall,
        ms_per_step=1e3 * wall / a.steps if mode == "diffusion" else None,
    )


def reference_variant(b: Bench, batch: int) -> None:
    a, C = b.args, b.C
    ids = torch.randint(3, b.model.config.text.vocab_size, (batch, a.prompt_len), device=b.dev)
    kw = dict(
        max_new_tokens=C, max_denoising_steps=a.steps, confidence_threshold=1e-30, eos_token_id=None, pad_token_id=0
    )
    b.hf.generate(ids[:, :8], **dict(kw, max_new_tokens=8, max_denoising_steps=1))
    b.sync()
    t = time.perf_counter()
    b.hf.generate(ids, **kw)
    b.sync()
    wall = time.perf_counter() - t
    b.record(impl="reference", batch=batch, tok_s=batch * C / wall, ms_per_step=1e3 * wall / a.steps)


def top_kernels(b: Bench, n: int = 12) -> list[dict]:
    """The most expensive kernels of one eager step at batch 1."""
    from torch.profiler import ProfilerActivity, profile

    cache, static, temp, bound, masks = step_inputs(b, 1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        free = torch.full_like(static["canvas"], -1)
        x = StepInputs(
            static["canvas"], static["soft"], static["u"], temp, bound, rule_ids(["entropy_bound"], b.dev), free
        )
        denoise_step(b.model, cache, x, masks)
        b.sync()
    key = "self_device_time_total" if b.cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:n]
    return [{"name": e.key[:80], "ms": getattr(e, key, 0) / 1e3, "calls": e.count} for e in events]


def build_models(text: dict, canvas: int, device: str, no_reference: bool):
    """transformers' model and dgemma's sharing its weights (`gpu_bench.build`); dgemma's alone, randomly
    initialised on the device, with --no-reference or where transformers has no DiffusionGemma (no wheel carried)."""
    if not no_reference:
        try:
            return build(text, canvas, device, torch.bfloat16)
        except ImportError as e:
            print(f"reference skipped: {e}", flush=True)
    with torch.device("meta"):
        model = DiffusionGemma(ModelConfig(text=TextConfig(**text), canvas_length=canvas))
    model = model.to_empty(device=device).to(torch.bfloat16)
    model.init_buffers()
    model.reset_parameters()
    return None, model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a dry run of the script)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (slow to build)")
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--out", help="append each result to this JSON-lines file as it is measured")
    args = ap.parse_args()
    torch.manual_seed(0)
    hf, model = build_models(
        TINY if args.tiny else SHAPES_26B, 16 if args.tiny else 256, args.device, args.no_reference
    )
    b = Bench(args, hf, model)
    name = torch.cuda.get_device_name() if b.cuda else "cpu"
    roof = roofline_ms(model, name)
    print(
        f"device {name}; torch {torch.__version__}; steps/canvas {args.steps}; canvas {b.C}; roofline "
        f"{roof and round(roof, 2)} ms/step (weights read once per step at batch 1)",
        flush=True,
    )
    print(f"{'impl':20} {'batch':>5} {'tok/s':>9} {'ms/step':>9} {'peak GiB':>9}")
    batches = [int(x) for x in args.batch_sizes.split(",")]
    plan: list[tuple[str, Callable[[int], None]]] = [
        ("reference", lambda n: None if hf is None else reference_variant(b, n)),
        ("engine", lambda n: engine_variant(b, n, "diffusion")),
        ("engine-eager", lambda n: engine_variant(b, n, "diffusion", graphs=False)),
        ("step-eager", lambda n: step_variant(b, n, "step-eager", graph=False)),
        ("step-graph", lambda n: b.cuda and step_variant(b, n, "step-graph", graph=True)),
        ("ar", lambda n: engine_variant(b, n, "ar")),
        ("ar-eager", lambda n: engine_variant(b, n, "ar", graphs=False)),
        (
            "step-compile-graph",
            lambda n: (
                b.cuda and not args.no_compile and step_variant(b, n, "step-compile-graph", graph=True, compile_=True)
            ),
        ),
    ]
    for label, run in plan:
        for n in batches:
            try:
                run(n)
            except Exception as e:  # one variant failing must not lose the others' numbers
                print(f"{label} batch {n} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    kernels = top_kernels(b)
    print("top kernels of one eager step (batch 1):")
    for k in kernels:
        print(f"  {k['ms']:8.3f} ms {k['calls']:5}x  {k['name']}")
    if not args.no_fp8:
        from dgemma.model.quant import quantize_fp8

        try:
            quantize_fp8(model)
            for n in batches:
                step_variant(b, n, "fp8-graph" if b.cuda else "fp8-eager", graph=b.cuda)
        except Exception as e:
            print(f"fp8 failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    print(
        json.dumps(
            {
                "benchmark": "gpu_fast",
                "device": name,
                "torch": torch.__version__,
                "roofline_ms_per_step": roof,
                "top_kernels": kernels,
                "rows": b.rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
