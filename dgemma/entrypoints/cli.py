"""The `dgemma` command line: the subcommand registry, the options commands share, and `main`.

    dgemma generate --model ./ckpt --prompt "Write a haiku about rain" --max-new-tokens 64
    dgemma generate --model ./ckpt --prompt-ids 2,651,1234 --seed 0 --json
    dgemma chat --model ./ckpt

Subcommands live in the `SUBCOMMANDS` registry; another module adds one with
`register(name, help, add_arguments, run)`. A module listed in `PLUGINS` is imported before the
parser is built, so registering at import time is enough for `dgemma <name>` to appear. Such a module imports heavy
or optional dependencies inside its `run`, not at import time: `dgemma serve` without the `serve` extra says which
packages to install and exits with status 2.

User errors (bad paths, malformed checkpoints, invalid sampling knobs, prompts that do not fit) print one line,
`dgemma: error: ...`, on stderr and exit with status 2, like argparse usage errors. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from dgemma.entrypoints.flags import CLIError
from dgemma.entrypoints.flags import positive_int as _positive_int

if TYPE_CHECKING:  # imported lazily at run time: `dgemma --help` should not wait for torch more than needed
    from dgemma.model.device import Placement
    from dgemma.entrypoints.llm import LLM
    from dgemma.engine.params import Knob, SamplingParams

PROG = "dgemma"
EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130

# Modules imported before the parser is built, so that they can `register` their subcommands.
PLUGINS: list[str] = [
    "dgemma.entrypoints.cli_generate",
    "dgemma.entrypoints.cli_train",
    "dgemma.entrypoints.server",
    "dgemma.tasks.sudoku_cli",
    "dgemma.tasks.code_cli",
]


# -- the subcommand registry ------------------------------------------------------------------------------------------
class Subcommand(NamedTuple):
    """One `dgemma <name>` command: `add_arguments(parser)` declares its options, `run(args) -> int` executes it."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str = ""
    description: str | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    description: str | None = None,
    replace: bool = False,
) -> Subcommand:
    """Add the subcommand `dgemma <name>`.

    `help` is the one-line summary shown by `dgemma --help`; `description` (default: `help`) heads
    `dgemma <name> --help`. `add_arguments(parser)` adds the command's options to its argparse parser (the helpers
    `add_model_arguments` and `add_sampling_arguments` give the shared ones). `run(args)` returns the exit status;
    it may raise ValueError (or CLIError) for user errors, which `main` reports as one line with status 2.
    Registering a taken name raises ValueError unless `replace=True`.
    """
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"invalid subcommand name {name!r}")
    if name in SUBCOMMANDS and not replace:
        raise ValueError(f"subcommand {name!r} is already registered")
    SUBCOMMANDS[name] = Subcommand(add_arguments, run, help, description)
    return SUBCOMMANDS[name]


def _load_plugins() -> None:
    """Import the `PLUGINS` modules (each registers its subcommands once, when first imported). They are part of
    dgemma and need none of its optional extras at import time, so an error here is a bug and propagates."""
    for mod in PLUGINS:
        importlib.import_module(mod)


# -- shared options ---------------------------------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=min(110, shutil.get_terminal_size((100, 24)).columns))


def parse_token_ids(s: str) -> list[int]:
    """'1,2,3' (spaces allowed) -> [1, 2, 3]."""
    parts = [p for p in s.replace(",", " ").split()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated token ids, e.g. 2,651,1234")
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer token ids, got {s!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids must be non-negative, got {s!r}")
    return ids


EAGER_HELP = (
    "never replay denoising steps as CUDA graphs (on CUDA, unconstrained steps are captured per batch bucket by "
    "default: see dgemma/engine/graphs.py); for debugging and profiling"
)
COMPILE_HELP = (
    "run the graphed denoising step through torch.compile (fused norms and soft-capping) before capture; compiles "
    "once per batch bucket, falls back to eager with a warning if compiling fails (default: off)"
)
TP_HELP = (
    "split the model over N ranks, each holding its shard of the weights: attention heads, MLP widths, experts "
    "and the vocabulary (GPUs cuda:0..N-1 with nccl, or N CPU processes with gloo); dgemma starts the worker "
    "processes itself (several machines: docs/parallel.md) (default 1)"
)
DEVICE_HELP = "torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:1, ... (default: auto)"
DTYPE_HELP = (
    "weight and activation dtype (default: auto: bfloat16 on CUDA, and on CPUs where bf16 matmul is native "
    "and faster, i.e. with AMX, or AVX512-BF16 on AMD, when hidden size² x batch rows is 256² or more; float32 "
    "elsewhere: narrow models at small batches run faster in it, and on AVX2-only CPUs bf16 is emulated, ~100x "
    "slower per matmul). "
    "bfloat16 halves memory; float32 reproduces transformers bit for bit"
)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device, --max-model-len, --threads."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="PATH",
        help="checkpoint directory in the Hugging Face format (config.json, model.safetensors or a "
        "sharded index, optional generation_config.json and tokenizer files)",
    )
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help=DTYPE_HELP)
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument(
        "--quantization",
        choices=["fp8"],
        default=None,
        help="fp8: FP8 (e4m3) dense and expert weights with per-channel scales and bf16 activations, "
        "quantized at load (about half the weight memory; needs a device with FP8 matmuls: "
        "Ada/Hopper GPUs, or torch's CPU kernel); a checkpoint saved in FP8 loads as FP8 without it",
    )
    g.add_argument("--enforce-eager", action="store_true", help=EAGER_HELP)
    g.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    g.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1, metavar="N", help=TP_HELP)
    g.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        metavar="N",
        help="context length in tokens (prompt + generated) that the KV cache is sized for "
        "(default: the checkpoint's max_position_embeddings, at most 8192)",
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: torch's choice, usually one per core)",
    )


_GROUPS = {
    None: "generation",
    "diffusion": "diffusion sampler (--mode diffusion)",
    "ar": "autoregressive sampler (--mode ar)",
}


def _add_knob(g: argparse._ArgumentGroup, knob: Knob) -> None:
    """One `KNOBS` entry as an option: unset (None) unless given, so that `sampling_params_from_args` can tell."""
    if knob.kind is bool:
        g.add_argument(knob.flag, action="store_true", help=knob.help)
        return
    default = f" (default: {knob.default})" if knob.default is not None else ""
    if knob.kind is str:
        g.add_argument(knob.flag, choices=list(knob.choices()), default=None, help=knob.help + default)
        return
    kind = _positive_int if knob.strict_flag else knob.kind
    g.add_argument(
        knob.flag, type=kind, default=None, metavar=knob.metavar, help=f"{knob.help}, {knob.range_text()}{default}"
    )


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Every SamplingParams knob as an option (from `params.KNOBS`; unset diffusion knobs come from the checkpoint)."""
    from dgemma.engine.params import DEFAULTS, KNOBS

    groups = {mode: p.add_argument_group(title) for mode, title in _GROUPS.items()}
    groups["diffusion"].description = (
        "Unset knobs come from the checkpoint's generation_config.json, then the published defaults:\n"
        + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items())
        + "."
    )
    for knob in KNOBS:
        _add_knob(groups[knob.mode], knob)
    g = groups[None]
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="STR",
        help="stop when the generated text contains STR (repeatable); the text ends before it. Needs a tokenizer",
    )
    g.add_argument(
        "--stop-token-id",
        action="append",
        type=int,
        default=None,
        metavar="ID",
        help="stop at this token id, as at EOS (repeatable)",
    )
    c = p.add_argument_group("structured output and infilling (docs/structured.md)")
    c.add_argument(
        "--json-schema",
        metavar="JSON|FILE",
        default=None,
        help="the output must validate against this JSON schema (inline JSON or a file)",
    )
    c.add_argument("--json-object", action="store_true", help="the output must be a JSON object")
    c.add_argument("--regex", metavar="RE", default=None, help="the output must match this regular expression")
    c.add_argument(
        "--choice",
        action="append",
        default=None,
        metavar="STR",
        help="the output must be one of these strings (repeatable)",
    )
    c.add_argument(
        "--grammar",
        metavar="LARK|FILE",
        default=None,
        help="the output must match this Lark grammar (or GBNF, if it uses ::=); inline or a file",
    )
    c.add_argument(
        "--suffix",
        metavar="STR",
        default=None,
        help="infill: generate the text between the prompt and STR (diffusion mode)",
    )


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    """Build and validate SamplingParams from `add_sampling_arguments` options (raises ValueError naming the field)."""
    from dgemma.engine.params import KNOBS, SamplingParams

    values = {k.name: getattr(args, k.name) for k in KNOBS}
    given = {name: v for name, v in values.items() if v is not None and v is not False}  # 0 is a given value
    mode = given.get("mode", "diffusion")
    bad = [k.flag for k in KNOBS if k.name in given and k.mode not in (None, mode)]
    if bad:
        raise CLIError(
            f"{', '.join(bad)} {'applies' if len(bad) == 1 else 'apply'} only to --mode "
            f"{'diffusion' if mode == 'ar' else 'ar'}"
        )
    kw: dict[str, Any] = dict(given, stop=list(args.stop or []), stop_token_ids=list(args.stop_token_id or []))
    kw.update(_constraint_args(args))
    return SamplingParams(**kw).validate()


def _constraint_args(args: argparse.Namespace) -> dict[str, Any]:
    """SamplingParams fields from the structured-output and infilling options."""
    kw: dict[str, Any] = {}
    if getattr(args, "json_schema", None) is not None:
        text = _inline_or_file(args.json_schema, "--json-schema")
        try:
            kw["json_schema"] = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"--json-schema is not valid JSON: {e.msg}") from None
    if getattr(args, "grammar", None) is not None:
        kw["grammar"] = _inline_or_file(args.grammar, "--grammar")
    for name in ("regex", "choice", "suffix"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    if getattr(args, "json_object", False):
        kw["json_object"] = True
    return kw


def _inline_or_file(value: str, flag: str) -> str:
    """A flag's value, or the contents of the file it names."""
    from pathlib import Path

    if value.lstrip().startswith(("{", "[")) or "\n" in value or ":" in value or "::=" in value:
        return value
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise CLIError(f"{flag}: {value!r} is neither inline text nor an existing file")


def load_llm(args: argparse.Namespace, max_batch: int = 1) -> LLM:
    """The LLM for `add_model_arguments` options."""
    import torch

    from dgemma.entrypoints.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    quantization = getattr(args, "quantization", None)
    where = placement(args.device, args.dtype, quantization, model=args.model, max_batch=max_batch)
    llm = LLM(
        args.model,
        device=where.device,
        dtype=where.dtype,
        max_batch=max_batch,
        max_model_len=args.max_model_len,
        quantization=quantization,
        enforce_eager=getattr(args, "enforce_eager", False),
        compile=getattr(args, "compile", False),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
    )
    print(f"dgemma: {llm.engine.describe()}", file=sys.stderr)
    return llm


def placement(
    device: str, dtype: str, quantization: str | None = None, model: str | None = None, max_batch: int = 1
) -> Placement:
    """--device and --dtype, checked and resolved ("auto" included, for `model` run by an engine of `max_batch` rows:
    see dgemma.model.device); the choice is printed as one line on stderr, e.g. `dgemma: device cpu, dtype float32
    (auto: no CUDA; ...)`."""
    from dgemma.model.device import resolve

    where = resolve(check_device(device), dtype, quantization, model, max_batch)
    print(f"{PROG}: {where.describe()}", file=sys.stderr, flush=True)
    return where


def training_placement(device: str, precision: str) -> Placement:
    """Training's --device and --precision, checked and resolved (see dgemma.model.device.resolve_training); printed as
    one line on stderr by the first process."""
    import os

    from dgemma.model.device import resolve_training

    where = resolve_training(check_device(device), precision)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG}: {where.describe()}", file=sys.stderr, flush=True)
    return where


def check_device(device: str) -> str:
    """A --device value, checked: "auto" or a torch device string, and CUDA only where this machine has it."""
    from dgemma.model.device import resolve_device

    try:
        resolve_device(device, what="--device")
    except ValueError as e:
        raise CLIError(str(e)) from None
    return device


# -- main -------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from dgemma import __version__

    _load_plugins()
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_Formatter,
        description="dgemma: run DiffusionGemma block-diffusion language models.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, cmd in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help, formatter_class=_Formatter)
        cmd.add_arguments(sp)
        sp.set_defaults(_run=cmd.run)
    return parser


def one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dgemma` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code = args._run(args)
        return EXIT_OK if code is None else int(code)
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `dgemma generate ... | head -c 10`
        try:
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, TokenizerError, bad knobs and prompts
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    # Run the canonical `dgemma.entrypoints.cli` module, not this `__main__` copy, so that plugins that
    # `from dgemma.entrypoints.cli import register` register into the registry that main() reads.
    from dgemma.entrypoints.cli import main as _main

    sys.exit(_main())
