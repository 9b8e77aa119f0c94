"""`dgemma sudoku train | solve | eval`: the Sudoku experiment from the command line (registered as a CLI plugin).

dgemma sudoku solve --example                       # the bundled model solves a puzzle, live in a terminal
dgemma sudoku solve 000260701680070090... --json
dgemma sudoku solve --input puzzles.txt --output solutions.txt
dgemma sudoku eval --per-difficulty 100             # diffusion (with/without clamping) vs the AR baseline
dgemma sudoku train --output runs/sudoku            # both objectives from one initial checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from dgemma.entrypoints.cli import (
    DEVICE_HELP,
    DTYPE_HELP,
    EXIT_OK,
    placement,
    register,
    training_placement,
)
from dgemma.entrypoints.cli_train import PRECISION_HELP, RECIPE_FLAGS
from dgemma.entrypoints.flags import CLIError, add_flags, comma_choices, from_args, positive_int

# A held-out puzzle (40 clues, unique solution, never in the training data) that the bundled model solves in
# one denoising pass; `--example` uses it.
EXAMPLE = "000723000900560000230100057620000103050097800009000475002931586090006004506874320"


# `dgemma sudoku train`'s flags: one per Recipe field named here (the field gives its type and default).
TRAIN_FLAGS: dict[str, dict[str, Any]] = RECIPE_FLAGS | {
    "n_base": {"flag": "--puzzles", "ge": 1, "help": "distinct generated training puzzles"},
    "n_train": {"flag": "--examples", "ge": 1, "help": "training examples after symmetry augmentation"},
    "seed": {"help": "seed of the puzzles, the initial weights and the training"},
    "objectives": {"help": "what to train from the one initial checkpoint"},
    "precision": RECIPE_FLAGS["precision"]
    | {"help": PRECISION_HELP + " (the bundled models were trained in float32 on a CPU)"},
    "template_prob": {
        "help": "diffusion: share of examples whose clue cells stay uncorrupted, as clamped solving shows them"
    },
    "ar_weight": {
        "help": "diffusion: weight of the next-token loss on the solution; 0 skips its extra pass, so the same time "
        "buys more denoising steps"
    },
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `sudoku` actions and their flags."""
    from dgemma.tasks.sudoku_model import Recipe

    sub = p.add_subparsers(dest="sudoku_command", metavar="ACTION", title="actions")
    _add_solve(
        sub.add_parser(
            "solve",
            help="solve puzzles (81 characters each, 0 or . for blanks)",
            description="Solve Sudoku puzzles with a DiffusionGemma checkpoint (default: the bundled "
            "model). Prints one 81-digit line per puzzle, or 'error: ...' for an invalid "
            "one (the batch goes on). Exit status 1 if any puzzle was invalid or unsolved.",
        )
    )
    _add_eval(
        sub.add_parser(
            "eval",
            help="solve rate per difficulty: diffusion (clamped / free) vs AR",
            description="Solve held-out puzzles and report the solve rate (a valid grid that keeps every "
            "clue) per difficulty (easy >= 40 clues, medium 30-39, hard < 30) for the "
            "diffusion model with and without clue clamping and for the AR baseline. Prints "
            "a table and a final JSON line.",
        )
    )
    t = sub.add_parser(
        "train",
        help="train the diffusion model and the AR baseline from one random init",
        description="Generate puzzles, write one random initial checkpoint, and train it with the "
        "block-diffusion objective and with the AR objective (same data, same steps), in "
        "parallel processes when there are cores for both. Re-running resumes.",
    )
    add_flags(t, Recipe, TRAIN_FLAGS)
    t.set_defaults(_sudoku=run_train)


def _add_solve(s: argparse.ArgumentParser) -> None:
    s.add_argument("puzzles", nargs="*", metavar="PUZZLE", help="81 characters: digits, 0 or . for blanks")
    s.add_argument("--input", "-i", metavar="FILE", help="read puzzles from FILE, one per line ('-': stdin)")
    s.add_argument("--output", "-o", metavar="FILE", help="write results to FILE instead of stdout")
    s.add_argument("--example", action="store_true", help="solve a built-in example puzzle")
    _add_model(s)
    s.add_argument(
        "--json", action="store_true", help="one JSON object per puzzle: puzzle, grid, solved, error, steps, seconds"
    )
    s.add_argument(
        "--live",
        choices=["auto", "always", "never"],
        default="auto",
        help="draw the grid as it denoises (auto: when stdout is a terminal)",
    )
    s.set_defaults(_sudoku=run_solve)


def _add_eval(e: argparse.ArgumentParser) -> None:
    from dgemma.tasks.sudoku_model import VARIANTS

    e.add_argument(
        "--diffusion-model", default="sudoku", metavar="PATH", help="the diffusion model (default: the bundled one)"
    )
    e.add_argument(
        "--ar-model",
        default="sudoku-ar",
        metavar="PATH",
        help="the AR baseline trained from the same initial checkpoint (default: bundled)",
    )
    e.add_argument(
        "--data",
        metavar="FILE",
        help="JSONL puzzles with 'puzzle' (default: fresh puzzles from --seed, never in the training data)",
    )
    e.add_argument(
        "--per-difficulty",
        type=positive_int,
        default=100,
        metavar="N",
        help="puzzles per difficulty (default: %(default)s)",
    )
    e.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated: diffusion+clamp (one pass), diffusion (one pass, no clamping), "
        "diffusion+clamp+vote (4 samples x 4 rounds, see solve --samples), "
        "diffusion+clamp+vote-16x8 (16 samples x 8 rounds, the solve default), ar (greedy), "
        "ar+best-of-16 and ar+best-of-128 (that many samples, a valid one kept: the vote "
        "variants' most passes) (default: all; at the default --per-difficulty, vote-16x8 took "
        "27 min and ar+best-of-128 17 min on one CPU thread, the others 6 min together on two)",
    )
    e.add_argument("--seed", type=int, default=2026, help="puzzle and sampling seed (default: %(default)s)")
    e.add_argument("--batch-size", type=positive_int, default=16, help="puzzles solved together (default: %(default)s)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_placement(e)
    e.set_defaults(_sudoku=run_eval)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default="sudoku", metavar="PATH", help="checkpoint (default: the bundled 'sudoku' model)"
    )
    p.add_argument(
        "--mode",
        choices=["diffusion", "ar"],
        default="diffusion",
        help="diffusion: denoise the whole grid at once; ar: one cell per forward pass (default: %(default)s)",
    )
    p.add_argument("--no-clamp", action="store_true", help="do not fix the clues on the canvas (diffusion)")
    p.add_argument(
        "--samples",
        type=positive_int,
        default=16,
        metavar="K",
        help="clamped diffusion: canvases drawn per puzzle and round (different seeds); a valid grid "
        "that keeps the clues ends the search. --mode ar: K temperature-1 answers, a valid one "
        "kept (default: %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=8,
        metavar="N",
        help="clamped diffusion: rounds of sampling; each next round clamps the cells all samples agree "
        "on (minus rule conflicts) and re-noises the rest. --samples 1 --rounds 1 is a single "
        "denoising pass (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="puzzles solved together (default: %(default)s)")
    _add_placement(p)


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help=DTYPE_HELP)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_sudoku", None) is None:
        raise CLIError("choose an action: dgemma sudoku {solve,eval,train} (see dgemma sudoku --help)")
    return args._sudoku(args)


# -- solve ----------------------------------------------------------------------------------------------------------
def _read_puzzles(args: argparse.Namespace) -> list[str]:
    puzzles = list(args.puzzles)
    if args.example:
        puzzles.append(EXAMPLE)
    if args.input:
        src = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
        with src if src is not sys.stdin else contextlib.nullcontext(src) as f:
            puzzles += [line.strip() for line in f if line.strip()]
    if not puzzles:
        raise CLIError("no puzzles: give them as arguments, with --input FILE, or use --example")
    return puzzles


def run_solve(args: argparse.Namespace) -> int:
    from dgemma.tasks.sudoku_model import Solver

    puzzles = _read_puzzles(args)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    live = args.live == "always" or (
        args.live == "auto" and out is sys.stdout and sys.stdout.isatty() and not args.json
    )
    rows = min(args.batch_size, (1 if live else len(puzzles)) * args.samples)  # the most rows a step carries
    where = placement(args.device, args.dtype, model=args.model, max_batch=rows)
    solver = Solver(
        args.model,
        mode=args.mode,
        clamp=not args.no_clamp,
        max_batch=rows,
        seed=args.seed,
        rounds=args.rounds,
        samples=args.samples,
        device=where.device,
        dtype=where.dtype,
    )
    results = []
    if live:  # one at a time, redrawing the grid in place
        for p in puzzles:
            results.append(_solve_live(solver, p, out, args.json))
    else:
        for k in range(0, len(puzzles), args.batch_size):
            for r in solver.solve(puzzles[k : k + args.batch_size]):
                results.append(r)
                _print(r, out, args.json)
    if out is not sys.stdout:
        out.close()
    return EXIT_OK if all(r.solved for r in results) else 1


def _solve_live(solver, puzzle: str, out, as_json: bool):
    """Solve one puzzle, redrawing its grid on stdout at every denoising step; the final grid stays on screen, then
    the answer line (to `out`) and a summary line (to stderr). Returns the solver's result."""
    from dgemma.tasks import sudoku as S
    from dgemma.tasks.sudoku_model import render

    drawn = 0

    def draw(i: int, tokens: list[int]) -> None:
        nonlocal drawn
        lines = render(tokens, clean)
        if drawn:
            sys.stdout.write(f"\x1b[{drawn}F")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        drawn = len(lines)

    try:
        clean = _clean(puzzle)
    except ValueError:  # the solver reports it
        clean = None
    r = solver.solve([puzzle], on_draft=draw if clean else None)[0]
    if drawn and r.grid is not None:
        draw(0, [S.DIGIT_BASE_ID + int(c) for c in r.grid])
    _print(r, out, as_json)
    if r.error is None:
        print(
            f"{'solved' if r.solved else 'not solved'}: {r.steps} denoising passes (all samples), {r.seconds:.2f} s",
            file=sys.stderr,
        )
    return r


def _clean(p: str) -> str:
    from dgemma.tasks import sudoku as S

    return S.parse_puzzle(p)


def _print(r, out, as_json: bool) -> None:
    if as_json:
        d = r.to_json()
        d["seconds"] = round(d["seconds"], 4)
        print(json.dumps(d), file=out, flush=True)
    elif r.error:
        print(f"error: {r.error}", file=out, flush=True)
    elif r.grid is None:
        print("error: the model did not produce 81 digits", file=out, flush=True)
    else:
        print(r.grid if r.solved else f"{r.grid}  # not a valid solution", file=out, flush=True)


# -- eval -------------------------------------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> int:
    import random

    from dgemma.tasks import sudoku as S
    from dgemma.tasks.sudoku_model import VARIANTS, evaluate

    variants = comma_choices(args.variants, VARIANTS, "variant")
    where = placement(args.device, args.dtype, model=args.diffusion_model, max_batch=args.batch_size)
    if args.data:
        items = S.load_jsonl(args.data)
    else:  # fresh puzzles: clue counts spread over each difficulty band
        rng = random.Random(args.seed)
        items = []
        for lo, hi in ((40, 50), (30, 39), (24, 29)):
            for _ in range(args.per_difficulty):
                p, sol = S.generate(rng.randint(lo, hi), rng)
                items.append({"puzzle": p, "solution": sol})
    rows = evaluate(
        {"diffusion": args.diffusion_model, "ar": args.ar_model},
        items,
        args.per_difficulty,
        variants,
        progress=not args.quiet,
        max_batch=args.batch_size,
        seed=args.seed,
        device=where.device,
        dtype=where.dtype,
    )
    w = max([len("variant")] + [len(r.variant) for r in rows]) + 2
    print(f"{'variant':<{w}}{'difficulty':<11}{'n':>5}{'solved':>8}{'rate':>8}{'puzzles/s':>11}{'forwards':>10}")
    for r in rows:
        print(
            f"{r.variant:<{w}}{r.difficulty:<11}{r.n:>5}{r.solved:>8}{r.rate:>8.1%}{r.n / r.seconds:>11.2f}"
            f"{r.steps:>10.1f}"
        )
    print(json.dumps({"results": [{**asdict(r), "rate": r.rate, "puzzles_per_s": r.n / r.seconds} for r in rows]}))
    return EXIT_OK


# -- train ------------------------------------------------------------------------------------------------------------
def run_train(args: argparse.Namespace) -> int:
    from dgemma.tasks.sudoku_model import Recipe, train_recipe

    recipe = from_args(Recipe, args, TRAIN_FLAGS)
    training_placement(recipe.device, recipe.precision)  # checked and printed here; each process resolves it again
    t0 = time.perf_counter()
    finals = train_recipe(recipe)
    for obj, path in finals.items():
        print(f"{obj}: {path}")
    print(
        f"trained in {time.perf_counter() - t0:.0f} s; evaluate with: dgemma sudoku eval "
        f"--diffusion-model {finals.get('diffusion', 'sudoku')} --ar-model {finals.get('ar', 'sudoku-ar')}"
    )
    return EXIT_OK


register(
    "sudoku",
    "solve, evaluate and train the Sudoku model (diffusion vs AR)",
    add_arguments,
    run,
    __doc__.split("\n\n", 1)[1] if __doc__ else None,
)
