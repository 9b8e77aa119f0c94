"""`dgemma code infill | eval | train`: Python fill-in-the-middle from the command line (a CLI plugin).

dgemma code train --output runs/code            # the three models from one initial checkpoint (docs/code.md)
dgemma code infill app.py --line 12 -m runs/code/diffusion/final   # rewrite line 12 from the lines around it
dgemma code infill app.py --span 12:14 -m CKPT --print-file       # any DiffusionGemma checkpoint with a tokenizer
printf 'def area(r):\\n    <FILL>\\n' | dgemma code infill -m CKPT   # stdin; the gap is marked <FILL>
dgemma code eval --run runs/code --per-kind 100 # diffusion (adaptive / fixed steps) vs FIM-AR vs prefix-only AR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TextIO

from dgemma.entrypoints.cli import DEVICE_HELP, DTYPE_HELP, EXIT_OK
from dgemma.entrypoints.cli_train import RECIPE_FLAGS
from dgemma.entrypoints.cli import placement, register, training_placement
from dgemma.entrypoints.flags import CLIError, add_flags, comma_choices, from_args
from dgemma.entrypoints.flags import positive_int as _positive_int
from dgemma.tasks.code_model import FORMATS, Recipe

MARKER = "<FILL>"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="code_command", metavar="ACTION", title="actions")
    _add_infill(
        sub.add_parser(
            "infill",
            help="fill a gap in a Python file (a line, a span of lines, or a <FILL> marker)",
            description="Remove line N (--line), lines A to B (--span) or the <FILL> marker from a Python file (or "
            "stdin) and let a checkpoint (--model) write what goes there, seeing the code before and after. "
            "Prints the middle (or the whole file with --print-file). The middle has half a canvas of room "
            "(the suffix is fixed in the other half): 31 tokens for the models `dgemma code train` writes.",
        )
    )
    _add_eval(
        sub.add_parser(
            "eval",
            help="held-out infilling: diffusion vs FIM-reordered AR vs prefix-only AR",
            description="Infill spans of held-out standard-library files (never trained on) with each variant and "
            "print a table and a final JSON line: single-line exact match, multi-line exact match and "
            "ast.parse rate, bracket and indentation consistency, tokens per forward, ms per infill. The "
            "models are those of a `dgemma code train` run (--run DIR) or named one by one.",
        )
    )
    _add_train(
        sub.add_parser(
            "train",
            help="train the diffusion model and both AR baselines from one random init",
            description="Build the data (this Python's standard library, split by file), train the tokenizer on the "
            "training files, write one random initial checkpoint and train it three ways (same items, "
            "steps and batch): block diffusion with the suffix on the canvas, FIM-reordered AR, and "
            "prefix-only AR. Re-running resumes.",
        )
    )


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help=DTYPE_HELP)


def _add_infill(s: argparse.ArgumentParser) -> None:
    s.add_argument("file", nargs="?", default="-", metavar="FILE", help="a Python file ('-' or none: stdin)")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--line", "-l", type=_positive_int, metavar="N", help="the line to rewrite (1-based)")
    where.add_argument("--span", "-s", metavar="A:B", help="the lines A to B to rewrite (1-based, inclusive)")
    s.add_argument(
        "--model",
        "-m",
        default=None,
        metavar="PATH",
        help="a DiffusionGemma checkpoint with a tokenizer (required; `dgemma code train` trains small code models)",
    )
    s.add_argument(
        "--format",
        choices=["diffusion", "fim", "ar"],
        default="diffusion",
        help="how the model sees the gap: the suffix fixed on the canvas (diffusion), a FIM-reordered AR prompt "
        "(fim: needs FIM tokens in the tokenizer) or the prefix alone (ar) (default: %(default)s)",
    )
    s.add_argument("--fixed-steps", action="store_true", help="diffusion: no adaptive stop")
    s.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    s.add_argument("--print-file", action="store_true", help="print the whole file with the gap filled")
    s.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: middle, original, lines, tokens, forwards, seconds, finish_reason",
    )
    s.add_argument(
        "--live",
        choices=["auto", "always", "never"],
        default="auto",
        help="draw the canvas as it denoises, between the lines around the gap (auto: when stdout is a terminal)",
    )
    _add_placement(s)
    s.set_defaults(_code=run_infill)


def _add_eval(e: argparse.ArgumentParser) -> None:
    from dgemma.tasks.code_model import VARIANTS

    e.add_argument(
        "--run",
        metavar="DIR",
        help="a `dgemma code train` output directory: its diffusion/final, fim/final and ar/final are the models",
    )
    e.add_argument("--diffusion-model", metavar="PATH", help="the diffusion model (default: DIR/diffusion/final)")
    e.add_argument("--fim-model", metavar="PATH", help="the FIM-reordered AR baseline (default: DIR/fim/final)")
    e.add_argument("--ar-model", metavar="PATH", help="the prefix-only AR baseline (default: DIR/ar/final)")
    e.add_argument(
        "--data",
        metavar="FILE",
        help="JSONL items (path, kind, start, end, prefix, middle, suffix) "
        "from held-out files, e.g. a training run's data/test.jsonl (default: drawn from --seed)",
    )
    e.add_argument(
        "--per-kind",
        type=_positive_int,
        default=100,
        metavar="N",
        help="items per span kind: line, lines, body, bracket (default: %(default)s)",
    )
    e.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated: diffusion (adaptive stopping), diffusion-fixed (all "
        "max_denoising_steps), fim-ar, ar, empty (the gap left empty: the do-nothing reference) (default: all)",
    )
    e.add_argument("--seed", type=int, default=2026, help="item and sampling seed (default: %(default)s)")
    e.add_argument(
        "--stdlib",
        metavar="DIR",
        default=None,
        help="the Lib/ directory the items come from (default: this Python's standard library)",
    )
    e.add_argument("--batch-size", type=_positive_int, default=16, help="(default: %(default)s)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_placement(e)
    e.set_defaults(_code=run_eval)


# `dgemma code train`'s flags: one per Recipe field named here (the field gives its type and default).
TRAIN_FLAGS: dict[str, dict[str, Any]] = RECIPE_FLAGS | {
    "vocab": {"ge": 1, "help": "BPE vocabulary size"},
    "n_train": {"flag": "--examples", "ge": 1, "help": "training spans drawn from the training files"},
    "per_kind_test": {
        "flag": "--held-out",
        "ge": 1,
        "help": "held-out spans per kind written to OUTPUT/data/test.jsonl",
    },
    "steps": {
        "ge": 1,
        "help": "the budget: optimizer steps per model (default: %(default)s, 50-75 min per model on one CPU thread)",
    },
    "prompt_loss": {
        "help": "next-token loss on the prompt too (the code before the gap; FIM's suffix) for every model"
    },
    "ar_weight": {"help": "diffusion: weight of the encoder's next-token loss; 0 skips its extra pass"},
    "seed": {"help": "seed of the spans, the initial weights and the training"},
    "objectives": {"choices": FORMATS, "help": "the models to train from the one initial checkpoint"},
    "parallel": {
        "ge": 1,
        "default": None,
        "help": "models trained at once, one process each (default: as many as the cores allow at --threads each, "
        "at most 2)",
    },
    "stdlib": {
        "metavar": "DIR",
        "help": "the Lib/ directory to learn from (default: this Python's standard library)",
    },
}


def _add_train(t: argparse.ArgumentParser) -> None:
    add_flags(t, Recipe, TRAIN_FLAGS)
    t.set_defaults(_code=run_train)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_code", None) is None:
        raise CLIError("choose an action: dgemma code {infill,eval,train} (see dgemma code --help)")
    return args._code(args)


# -- infill ---------------------------------------------------------------------------------------------------------
def read_source(name: str) -> tuple[str, str]:
    """(display name, text) of FILE or stdin; clear errors for missing, unreadable and binary input."""
    from dgemma.tasks.code import binary_reason

    if name == "-":
        label, raw = "<stdin>", sys.stdin.buffer.read()
    else:
        path = Path(name)
        if not path.exists():
            raise CLIError(f"{name}: no such file")
        if path.is_dir():
            raise CLIError(f"{name}: is a directory, not a Python file")
        label, raw = name, path.read_bytes()
    why = binary_reason(raw)
    if why is not None:
        raise CLIError(f"{label}: cannot infill: {why}")
    return label, raw.decode("utf-8")


def locate_gap(label: str, text: str, line: int | None, span: str | None) -> tuple[int, int, str]:
    """(start, end, what) of the gap: whole lines, or the <FILL> marker (removed)."""
    lines = text.splitlines(keepends=True)
    if line is not None or span is not None:
        a, b = (line, line) if line is not None else _parse_span(span or "")
        if not lines:
            raise CLIError(f"{label} is empty: there is no line {a}")
        if b > len(lines):
            raise CLIError(f"line {b} is out of range: {label} has {len(lines)} line{'s' * (len(lines) != 1)}")
        start = sum(len(ln) for ln in lines[: a - 1])
        return start, start + sum(len(ln) for ln in lines[a - 1 : b]), f"line {a}" if a == b else f"lines {a}-{b}"
    n = text.count(MARKER)
    if n != 1:
        raise CLIError(f"{label}: give --line N or --span A:B, or mark the gap with one {MARKER} (found {n} markers)")
    start = text.index(MARKER)
    return start, start + len(MARKER), f"the {MARKER} marker"


def _parse_span(span: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in span.split(":"))
    except ValueError:
        raise CLIError(f"--span takes A:B, two line numbers, got {span!r}") from None
    if not 1 <= a <= b:
        raise CLIError(f"--span {span}: need 1 <= A <= B")
    return a, b


class Canvas:
    """The gap redrawn in place on a terminal: a few lines before it (dim), the draft middle (bold), a few after."""

    def __init__(self, prefix: str, suffix: str, out: TextIO | None = None, context: int = 3):
        full, _, self.head = prefix.rpartition("\n")  # head: the gap's line up to the gap
        self.before = full.split("\n")[-context:] if "\n" in prefix else []
        after = suffix.split("\n")
        self.tail, self.after = after[0], after[1 : 1 + context]  # tail: the gap's line after the gap
        self.out, self.drawn = out or sys.stdout, 0

    def draw(self, middle: str) -> None:
        body = f"{self.head}\x1b[1;4m{middle}\x1b[0m\x1b[2m{self.tail}\x1b[0m".split("\n")
        rows = [f"\x1b[2m{ln}\x1b[0m" for ln in self.before] + body + [f"\x1b[2m{ln}\x1b[0m" for ln in self.after]
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
        self.out.write("\n".join(rows) + "\n")
        self.out.flush()
        self.drawn = len(rows)

    def clear(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.out.flush()


NO_MODEL = (
    "dgemma code infill needs a checkpoint: --model PATH (any DiffusionGemma checkpoint with a tokenizer; "
    "`dgemma code train --output DIR` trains small code models into DIR/diffusion/final, DIR/fim/final, DIR/ar/final)"
)


def run_infill(args: argparse.Namespace) -> int:
    from dgemma.tasks.code_model import Infiller

    if args.model is None:
        raise CLIError(NO_MODEL)
    fmt = args.format
    if fmt != "diffusion" and args.fixed_steps:
        raise CLIError("--fixed-steps applies only to --format diffusion")
    label, text = read_source(args.file)
    start, end, what = locate_gap(label, text, args.line, args.span)
    prefix, original, suffix = text[:start], text[start:end], text[end:]
    where = placement(args.device, args.dtype, model=args.model, max_batch=1)
    inf = Infiller(
        args.model,
        fmt,
        adaptive=not args.fixed_steps,
        max_batch=1,
        seed=args.seed,
        device=where.device,
        dtype=where.dtype,
    )
    live = fmt == "diffusion" and (
        args.live == "always" or (args.live == "auto" and sys.stdout.isatty() and not args.json)
    )
    canvas = Canvas(prefix, suffix) if live else None
    t0 = time.perf_counter()
    res = inf.infill([prefix], [suffix], on_draft=(lambda i, t: canvas.draw(t)) if canvas else None)[0]
    seconds = time.perf_counter() - t0
    if canvas is not None:
        canvas.clear()
    if args.json:
        print(
            json.dumps(
                {
                    "middle": res.text,
                    "original": original,
                    "gap": what,
                    "tokens": res.tokens,
                    "forwards": res.forwards,
                    "seconds": round(seconds, 4),
                    "finish_reason": res.finish_reason,
                },
                ensure_ascii=False,
            )
        )
    elif args.print_file:
        sys.stdout.write(prefix + res.text + suffix)
    else:
        sys.stdout.write(res.text if res.text.endswith("\n") else res.text + "\n")
    sys.stdout.flush()
    print(f"filled {what} of {label}: {res.tokens} tokens in {res.forwards} forwards, {seconds:.2f} s", file=sys.stderr)
    return EXIT_OK


# -- eval -------------------------------------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> int:
    from dgemma.tasks import code as C
    from dgemma.tasks.code_model import VARIANTS, evaluate, test_items

    variants = comma_choices(args.variants, VARIANTS, "variant")
    root = _stdlib(args.stdlib)
    models = eval_models(args, variants)
    where = placement(args.device, args.dtype, model=next(iter(models.values()), None), max_batch=args.batch_size)
    if args.data:
        if not Path(args.data).is_file():
            raise CLIError(f"{args.data}: no such file")
        items = [C.Item(**d) for d in C.load_jsonl(args.data)]
    else:
        counter = next(iter(models.values()), Path(args.run) / "data" / "tokenizer" if args.run else None)
        if counter is None:
            raise CLIError("drawing held-out items needs a tokenizer: give --run DIR, a model or --data FILE")
        items = test_items(args.per_kind, args.seed, counter, root)
    rows = evaluate(
        models,
        items,
        variants,
        max_batch=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
        root=root,
        device=where.device,
        dtype=where.dtype,
    )
    print(format_table(rows))
    print(json.dumps({"n": len(items), "results": [asdict(r) for r in rows]}))
    return EXIT_OK


def eval_models(args: argparse.Namespace, variants: list[str]) -> dict[str, str]:
    """{role: checkpoint} for the roles the variants use: a --ROLE-model flag, else --run DIR's ROLE/final."""
    from dgemma.tasks.code_model import VARIANTS

    named = {"diffusion": args.diffusion_model, "fim": args.fim_model, "ar": args.ar_model}
    models = {}
    for role in dict.fromkeys(VARIANTS[v][0] for v in variants if VARIANTS[v][0] != "none"):
        path = named[role] or (str(Path(args.run) / role / "final") if args.run else None)
        if path is None:
            users = ", ".join(v for v in variants if VARIANTS[v][0] == role)
            raise CLIError(f"{users} needs a model: --{role}-model PATH, or --run DIR (a `dgemma code train` output)")
        models[role] = path
    return models


TABLE_COLUMNS = (
    ("variant", "variant", "{:<16}"),
    ("1-line exact", "single_line_exact", "{:>13.1%}"),
    ("multi exact", "multi_line_exact", "{:>12.1%}"),
    ("multi parse", "multi_line_parse", "{:>12.1%}"),
    ("brackets", "brackets_ok", "{:>9.1%}"),
    ("indent", "indent_ok", "{:>8.1%}"),
    ("tok/fwd", "tokens_per_forward", "{:>8.2f}"),
    ("ms/infill", "ms_per_infill", "{:>10.1f}"),
)


def format_table(rows) -> str:
    head = "".join(
        f"{name:<16}" if key == "variant" else f"{name:>{len(fmt.format(0.0))}}" for name, key, fmt in TABLE_COLUMNS
    )
    return "\n".join([head] + ["".join(fmt.format(getattr(r, key)) for _, key, fmt in TABLE_COLUMNS) for r in rows])


def _stdlib(d: str | None) -> Path | None:
    if d is not None and not Path(d).is_dir():
        raise CLIError(f"--stdlib {d}: no such directory")
    return Path(d) if d else None


# -- train ------------------------------------------------------------------------------------------------------------
def run_train(args: argparse.Namespace) -> int:
    from dgemma.tasks.code_model import train_recipe

    recipe = from_args(Recipe, args, TRAIN_FLAGS)
    _stdlib(recipe.stdlib)
    training_placement(recipe.device, recipe.precision)  # checked and printed here; each process resolves it again
    parallel = recipe.parallel or max(1, min(2, len(recipe.objectives), (os.cpu_count() or 1) // recipe.threads))
    recipe = replace(recipe, parallel=parallel)
    t0 = time.perf_counter()
    finals = train_recipe(recipe)
    for obj, path in finals.items():
        print(f"{obj}: {path}")
    print(f"trained in {time.perf_counter() - t0:.0f} s; evaluate with: {eval_command(recipe.out_dir, list(finals))}")
    return EXIT_OK


def eval_command(out_dir: str, objectives: list[str]) -> str:
    """The `dgemma code eval` command for a run that trained `objectives` (the variants their models serve)."""
    from dgemma.tasks.code_model import VARIANTS

    variants = [v for v, (role, _, _) in VARIANTS.items() if role in objectives or role == "none"]
    only = "" if len(variants) == len(VARIANTS) else f" --variants {','.join(variants)}"
    return f"dgemma code eval --run {out_dir}{only}"


register(
    "code",
    "infill Python with any checkpoint; train and evaluate the fill-in-the-middle experiment (diffusion vs AR)",
    add_arguments,
    run,
    __doc__.split("\n\n", 1)[1] if __doc__ else None,
)
