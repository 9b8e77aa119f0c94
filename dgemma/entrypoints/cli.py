"""The `dgemma` command line: `dgemma generate` (one prompt) and `dgemma chat` (an interactive conversation).

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
import time
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, TextIO

from dgemma.entrypoints.flags import CLIError
from dgemma.entrypoints.flags import positive_int as _positive_int

if TYPE_CHECKING:  # imported lazily at run time: `dgemma --help` should not wait for torch more than needed
    from dgemma.model.device import Placement
    from dgemma.entrypoints.llm import LLM
    from dgemma.engine.params import Knob, SamplingParams

PROG = "dgemma"
EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130

# Modules imported before the parser is built, so that they can `register` their subcommands.
PLUGINS: list[str] = ["dgemma.entrypoints.server", "dgemma.tasks.sudoku_cli", "dgemma.tasks.code_cli"]


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


def _token_ids(s: str) -> list[int]:
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
    "and faster, i.e. with AMX, or AVX512-BF16 on AMD, for models of hidden size 160 and up; float32 elsewhere: "
    "smaller models run faster in it, and on AVX2-only CPUs bf16 is emulated, ~100x slower per matmul). "
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
    where = placement(args.device, args.dtype, quantization, model=args.model)
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


def placement(device: str, dtype: str, quantization: str | None = None, model: str | None = None) -> Placement:
    """--device and --dtype, checked and resolved ("auto" included, for `model`: see dgemma.model.device); the choice
    is printed as one line on stderr, e.g. `dgemma: device cpu, dtype float32 (auto: no CUDA; ...)`."""
    from dgemma.model.device import resolve

    where = resolve(check_device(device), dtype, quantization, model)
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


# -- output -----------------------------------------------------------------------------------------------------------
def _printable(text: str) -> str:
    """One display line: newlines shown as ⏎, other control characters as spaces (so drafts cannot move the cursor)."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("⏎")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def terminal_safe(text: str) -> str:
    """Model text for a terminal: control characters other than newline and tab (escape sequences, carriage
    returns, ...) become U+FFFD, so generated text cannot move the cursor or restyle the terminal."""
    return "".join("\ufffd" if unicodedata.category(ch) == "Cc" and ch not in "\n\t" else ch for ch in text)


class DraftLine:
    """Shows the canvas being denoised, live, after the committed text on the current terminal line.

    The committed text goes to stdout; the draft is drawn on stderr by returning to the line start (`\\r`),
    re-echoing the committed part of the line, then the dimmed draft truncated to the terminal width. `clear()`
    restores the line to just the committed text, so stdout can continue from there.
    """

    DIM, RESET, ERASE = "\x1b[2m", "\x1b[0m", "\x1b[K"

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.tail = ""  # committed text on the current terminal line
        self.active = False

    def _visible_tail(self, width: int) -> str:
        return self.tail[len(self.tail) - len(self.tail) % width :] if width > 0 else self.tail

    def committed(self, text: str) -> None:
        self.tail = text.rsplit("\n", 1)[1] if "\n" in text else self.tail + text

    def show(self, draft: str) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        tail = self._visible_tail(width)
        room = max(0, width - 1 - len(tail))
        self.out.flush()
        self.err.write("\r" + tail + self.DIM + _printable(draft)[:room] + self.RESET + self.ERASE)
        self.err.flush()
        self.active = True

    def clear(self) -> None:
        if self.active:
            width = shutil.get_terminal_size((80, 24)).columns
            self.err.write("\r" + self.ERASE + self._visible_tail(width))
            self.err.flush()
            self.active = False


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        m = self.metrics
        out: dict[str, Any] = {"token_ids": self.token_ids}
        if self.text is not None:
            out["text"] = self.text
        out.update(
            finish_reason=self.finish_reason,
            tokens_per_forward=m.get("tokens_per_forward"),
            denoising_steps=m.get("denoising_steps"),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
            timings=self.timings,
        )
        return out


class _Printer:
    """Writes committed text (or, without a tokenizer, token ids) to `out` as it arrives, keeping the draft line
    after it; `terminal` writes control characters as U+FFFD."""

    def __init__(self, out: TextIO | None, drafts: DraftLine | None, terminal: bool, tokenized: bool) -> None:
        self.out, self.drafts, self.tokenized = out, drafts, tokenized
        self.show = terminal_safe if terminal else (lambda t: t)
        self.pieces: list[str] = []  # the text, unaltered

    def emit(self, res: GenerationResult, text: str, ids: list[int]) -> None:
        piece = text if self.tokenized else ("" if not res.token_ids else " ") + " ".join(map(str, ids))
        res.token_ids.extend(ids)
        self.pieces.append(text)
        if self.out is None or not piece:
            return
        if self.drafts is not None:
            self.drafts.clear()
        piece = self.show(piece)
        self.out.write(piece)
        self.out.flush()
        if self.drafts is not None:
            self.drafts.committed(piece)


def generate_one(
    llm: LLM,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    out: TextIO | None = None,
    drafts: DraftLine | None = None,
    terminal: bool = False,
    reference_sampling: bool = False,
) -> GenerationResult:
    """Generate for one tokenized prompt. Text (or, without a tokenizer, token ids) is written to `out` as each
    canvas commits; `drafts`, if given, shows the canvas being denoised; `terminal` writes control characters as
    U+FFFD (see `terminal_safe`). Returns tokens, text (unaltered), finish reason and metrics."""
    printer = _Printer(out, drafts, terminal, llm.tokenizer is not None)
    res = GenerationResult(prompt_tokens=len(prompt_ids))
    t0 = time.perf_counter()
    prompt = [{"prompt_token_ids": prompt_ids}]
    if reference_sampling:
        o = llm.generate(prompt, params, reference_sampling=True)[0]
        res.metrics, res.finish_reason = dict(o.metrics), o.outputs[0].finish_reason
        res.timings["ttft_s"] = time.perf_counter() - t0
        printer.emit(res, o.outputs[0].text, o.outputs[0].token_ids)
    else:
        _print_stream(llm, llm.generate_stream(prompt, params, stream_drafts=drafts is not None), res, printer, t0)
    if drafts is not None:
        drafts.clear()
    res.text = "".join(printer.pieces) if llm.tokenizer is not None else None
    res.timings["generate_s"] = time.perf_counter() - t0
    res.timings.setdefault("ttft_s", res.timings["generate_s"])
    return res


def _print_stream(llm: LLM, stream: Any, res: GenerationResult, printer: _Printer, t0: float) -> None:
    """Consume one prompt's stream of deltas into `res`, printing as it goes."""
    try:
        for d in stream:
            if d.draft_token_ids is not None:
                ids = d.draft_token_ids
                printer.drafts.show(llm.decode(ids) if printer.tokenized else " ".join(map(str, ids)))
                continue
            if d.token_ids and "ttft_s" not in res.timings:
                res.timings["ttft_s"] = time.perf_counter() - t0
            if d.token_ids or d.text:
                printer.emit(res, d.text, d.token_ids)
            if d.finished:
                res.finish_reason = d.finish_reason
                res.metrics = dict(d.metrics)
    finally:
        stream.close()  # on Ctrl-C or an error, free the engine row at once


def _want_drafts(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_drafts", False) and sys.stdout.isatty()


def _stop_at_end_of_turn(llm: LLM, params: SamplingParams) -> None:
    """Chat replies end where the chat template ends an assistant turn (entrypoints.inputs.end_of_turn_ids)."""
    params.stop_token_ids = sorted(set(params.stop_token_ids) | set(llm.inputs.end_of_turn_ids()))


# -- dgemma generate --------------------------------------------------------------------------------------------------
GENERATE_DESCRIPTION = """\
Generate a completion for one prompt.

Without --json the text is written to stdout as it is committed (one canvas at a time); on a terminal the canvas
being denoised is shown live on stderr, and control characters in the text are shown as U+FFFD. A checkpoint
without a tokenizer prints token ids, space-separated.

--json prints one JSON object instead:
  {"token_ids": [...], "text": "..." (checkpoints with a tokenizer), "finish_reason": "stop" | "length",
   "tokens_per_forward": F, "denoising_steps": N, "prompt_tokens": N, "completion_tokens": N,
   "timings": {"load_s": F, "ttft_s": F, "generate_s": F, "total_s": F}}   (wall-clock seconds)

examples:
  dgemma generate -m ./ckpt --prompt "The capital of France is" --max-new-tokens 32
  dgemma generate -m ./ckpt --prompt "Tell me a joke" --chat --seed 0
  dgemma generate -m ./ckpt --prompt-ids 2,651,1234 --json
"""


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("prompt (one of)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompt",
        "-p",
        metavar="TEXT",
        help="prompt text, tokenized with the checkpoint's tokenizer (BOS prepended); '-' reads it from stdin",
    )
    src.add_argument(
        "--prompt-ids",
        type=_token_ids,
        metavar="IDS",
        help="prompt as comma-separated token ids, e.g. 2,651,1234 (works without a tokenizer)",
    )
    g.add_argument(
        "--chat",
        action="store_true",
        help="wrap --prompt as a user message and apply the checkpoint's chat template (Gemma turns if "
        "it has none); generation also stops where the template ends a turn (Gemma: <end_of_turn>)",
    )
    add_sampling_arguments(p)
    o = p.add_argument_group("output")
    o.add_argument(
        "--reference-sampling",
        action="store_true",
        help="run transformers' exact sampling loop and random-number order instead of the fast engine: "
        "with the same --seed and --device cpu --dtype float32 it reproduces transformers' "
        "generate() token for token (slower; output is printed when done)",
    )
    o.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the tokens, text, finish reason and statistics (see above)",
    )
    o.add_argument(
        "--no-drafts",
        action="store_true",
        help="do not show the canvas being denoised (shown on stderr only when stdout is a terminal)",
    )


def run_generate(args: argparse.Namespace) -> int:
    if args.chat and args.prompt_ids is not None:
        raise CLIError("--chat needs a text --prompt, not --prompt-ids")
    params = sampling_params_from_args(args)
    text = args.prompt
    if text == "-":
        text = sys.stdin.read()
    t0 = time.perf_counter()
    llm = load_llm(args)
    load_s = time.perf_counter() - t0
    if llm.tokenizer is None:
        if text is not None:
            raise CLIError(f"{args.model} has no tokenizer.json: pass the prompt with --prompt-ids")
        if params.stop:
            raise CLIError(f"--stop needs a tokenizer, and {args.model} has no tokenizer.json (use --stop-token-id)")
    if text is not None:
        _, ids = llm.encode_prompt([{"role": "user", "content": text}] if args.chat else text)
    else:
        _, ids = llm.encode_prompt({"prompt_token_ids": args.prompt_ids})
    if args.chat:
        _stop_at_end_of_turn(llm, params)
    if args.json:
        res = generate_one(llm, ids, params, reference_sampling=args.reference_sampling)
    else:
        drafts = DraftLine(sys.stdout, sys.stderr) if _want_drafts(args) else None
        res = generate_one(
            llm,
            ids,
            params,
            out=sys.stdout,
            drafts=drafts,
            terminal=sys.stdout.isatty(),
            reference_sampling=args.reference_sampling,
        )
    res.timings = {"load_s": load_s, **res.timings, "total_s": time.perf_counter() - t0}
    if args.json:
        sys.stdout.write(json.dumps(res.to_json(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return EXIT_OK


# -- dgemma chat ------------------------------------------------------------------------------------------------------
CHAT_DESCRIPTION = """\
Chat with the model. Each line read from stdin is a user message; the reply is streamed to stdout. The whole
conversation is formatted with the checkpoint's chat template (Gemma turns if it has none) for every reply.

commands:
  /reset   forget the conversation so far
  /exit    quit (so does end of input, Ctrl-D)
Ctrl-C while a reply is generated cancels that reply; at the prompt it quits.
"""

CHAT_HELP = "commands: /reset forgets the conversation, /exit quits"


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--system",
        metavar="TEXT",
        default=None,
        help="a system message placed before the conversation (kept across /reset)",
    )
    add_sampling_arguments(p)
    p.add_argument(
        "--no-drafts",
        action="store_true",
        help="do not show the canvas being denoised (shown on stderr only when stdout is a terminal)",
    )


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None


def run_chat(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    llm = load_llm(args)
    if llm.tokenizer is None:
        raise CLIError(
            f"{args.model} has no tokenizer.json; chat needs a tokenizer (use `dgemma generate --prompt-ids` instead)"
        )
    _stop_at_end_of_turn(llm, params)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - e.g. Windows
            pass
        print(f"{PROG} chat: {args.model} ({CHAT_HELP})", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    while True:
        line = _read_line(interactive)
        if line is None:
            if interactive:
                sys.stderr.write("\n")
            break
        msg = line.rstrip("\r\n")
        cmd = msg.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            history.clear()
            if interactive:
                print("(conversation cleared)", file=sys.stderr)
            continue
        if cmd.startswith("/") and " " not in cmd:
            print(f"{PROG}: unknown command {cmd} ({CHAT_HELP})", file=sys.stderr)
            continue
        history.append({"role": "user", "content": msg})
        drafts = DraftLine(sys.stdout, sys.stderr) if _want_drafts(args) else None
        try:
            _, ids = llm.encode_prompt(system + history)
            res = generate_one(llm, ids, params, out=sys.stdout, drafts=drafts, terminal=sys.stdout.isatty())
        except KeyboardInterrupt:
            if drafts is not None:
                drafts.clear()
            sys.stdout.write("\n")
            print("(reply cancelled)", file=sys.stderr)
            history.pop()
            continue
        except ValueError as e:
            sys.stdout.flush()
            print(f"{PROG}: error: {_one_line(e)}" + (" (/reset starts over)" if history[:-1] else ""), file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": res.text or ""})
        sys.stdout.write("\n")
        sys.stdout.flush()
    return EXIT_OK


register("generate", "generate a completion for one prompt", add_generate_arguments, run_generate, GENERATE_DESCRIPTION)
register("chat", "chat interactively (reads user messages from stdin)", add_chat_arguments, run_chat, CHAT_DESCRIPTION)


def add_init_random_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="directory to write the checkpoint to (created if missing)")
    p.add_argument(
        "--params",
        type=float,
        default=5e6,
        help="approximate parameter count of the Gemma-4-shaped model (default: 5e6)",
    )
    p.add_argument("--vocab", type=_positive_int, default=4096, help="vocabulary size (default: 4096)")
    p.add_argument("--canvas-length", type=_positive_int, default=64, help="canvas length (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights (default: 0)")


def run_init_random(args: argparse.Namespace) -> int:
    """Write a random-weights DiffusionGemma checkpoint in the HF format (for demos, tests and benchmarks)."""
    import torch

    from dgemma.model.checkpoint import save_model
    from dgemma.model.config import sized_config
    from dgemma.model.modeling import DiffusionGemma

    if not 1e4 <= args.params <= 5e9:
        raise CLIError(f"--params {args.params:g} is outside [1e4, 5e9]")
    cfg = sized_config(args.params, vocab_size=args.vocab, canvas_length=args.canvas_length)
    torch.manual_seed(args.seed)
    path = save_model(DiffusionGemma(cfg), args.out)
    print(f"wrote a random {cfg.text.num_parameters() / 1e6:.1f}M-parameter DiffusionGemma to {path}")
    return EXIT_OK


register(
    "init-random",
    "write a random-weights model in the HF checkpoint format",
    add_init_random_arguments,
    run_init_random,
    "Write a random-weights DiffusionGemma checkpoint (config.json, model.safetensors,\n"
    "generation_config.json) for demos, tests and benchmarks: no weights are downloaded.",
)


# -- train ------------------------------------------------------------------------------------------------------------
PRECISIONS = ("auto", "float32", "bfloat16")
PRECISION_HELP = (
    "bfloat16: autocast matmuls with float32 master weights; auto: bfloat16 on a GPU with native bf16, float32 "
    "elsewhere"
)

# `dgemma train`'s flags: one per TrainConfig field named here (type, default and choices come from the field).
TRAIN_FLAGS: dict[str, dict[str, Any]] = {
    "objective": {
        "group": "objective",
        "help": "diffusion: the published block-diffusion SFT loss (+ the encoder's AR loss); ar: a plain causal LM, "
        "the baseline",
    },
    "steps": {"group": "optimisation", "ge": 1, "help": "optimizer steps"},
    "batch_size": {"group": "optimisation", "ge": 1, "help": "global examples per step, over all processes"},
    "grad_accum": {"group": "optimisation", "ge": 1, "help": "micro-batches per step per process"},
    "lr": {"group": "optimisation", "help": "peak learning rate (cosine decay after the warm-up)"},
    "warmup_steps": {"group": "optimisation", "help": "steps of linear learning-rate warm-up"},
    "weight_decay": {"group": "optimisation", "help": "AdamW weight decay of the matrices"},
    "clip_norm": {"group": "optimisation", "help": "gradient-norm clipping; 0 turns it off"},
    "ar_weight": {"group": "objective", "help": "weight of the encoder AR loss"},
    "prompt_loss": {"group": "objective", "help": "next-token loss on prompt tokens too"},
    "self_cond_prob": {"group": "objective", "help": "probability of training with self-conditioning"},
    "template_prob": {
        "group": "objective",
        "help": "examples with a 'fixed' list keep those response positions uncorrupted with this probability, to "
        "train for inference with templates",
    },
    "lora_rank": {"group": "optimisation", "help": "LoRA rank; 0 trains every weight"},
    "lora_alpha": {"group": "optimisation", "help": "LoRA scale: the adapters' update is multiplied by alpha / rank"},
    "lora_targets": {
        "group": "optimisation",
        "help": "comma-separated linear layer names (default: all attention and MLP projections)",
    },
    "precision": {"group": "optimisation", "help": PRECISION_HELP + " (float32 stays the CPU default)"},
    "seed": {"group": "run", "help": "seed of the batch order, the corruption and new LoRA weights"},
    "save_every": {"group": "run", "help": "checkpoint every N steps (default: end only)"},
    "log_every": {"group": "run", "ge": 1, "help": "log the loss to train_log.jsonl every N steps"},
    "strategy": {
        "group": "processes and memory",
        "help": "single: one process; ddp: data parallel, every process holds the whole model and gradients are "
        "all-reduced; fsdp: FSDP2, parameters, gradients and optimizer state sharded over the processes (bf16 "
        "weights with float32 gradient reduction at --precision bfloat16); ddp and fsdp run under torchrun; auto: "
        "ddp under torchrun with several processes, else single",
    },
    "activation_checkpointing": {
        "group": "processes and memory",
        "help": "recompute each layer's feed-forward block in the backward pass instead of keeping its activations",
    },
    "dist_timeout": {
        "group": "processes and memory",
        "metavar": "SECONDS",
        "help": "how long a collective waits for the other processes: a process that died or hung ends the run with "
        "an error after at most this",
    },
}


# The task recipes' flags (`dgemma sudoku train`, `dgemma code train`) for the fields that both recipes have.
RECIPE_FLAGS: dict[str, dict[str, Any]] = {
    "out_dir": {
        "flag": "--output",
        "short": "-o",
        "metavar": "DIR",
        "help": "where data/, init/ and one checkpoint directory per objective go; re-running resumes",
    },
    "hidden": {"ge": 1, "help": "hidden size of the model"},
    "layers": {"ge": 1, "help": "transformer layers"},
    "steps": {"ge": 1, "help": "optimizer steps per objective"},
    "batch_size": {"ge": 1, "help": "examples per optimizer step"},
    "lr": {"help": "peak learning rate"},
    "threads": {"ge": 1, "help": "torch threads per process"},
    "precision": {"choices": PRECISIONS, "help": PRECISION_HELP},
    "device": {"help": "auto (this process's GPU if there is one, else the CPU), cpu, cuda or cuda:N"},
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """`dgemma train`'s flags: the data and output paths, then `TRAIN_FLAGS`, then how the run goes."""
    from dgemma.entrypoints.flags import add_flags
    from dgemma.training.config import TrainConfig

    p.add_argument("--model", "-m", required=True, metavar="PATH", help="checkpoint to start from (HF format)")
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help='JSONL training data: {"prompt": ..., "completion": ...}, {"messages": [...]} (the last '
        'turn, an assistant one, is learned) or {"prompt_ids": [...], "completion_ids": [...]}',
    )
    p.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="DIR",
        help="where checkpoint-N/, final/, train_log.jsonl and loss.svg go; re-running resumes from "
        "the newest checkpoint-N/ there",
    )
    g = add_flags(p, TrainConfig, TRAIN_FLAGS)["run"]
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="torch threads per process")
    g.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda or cuda:N (default: auto: this process's GPU if there is one, under torchrun the "
        "LOCAL_RANK-th, else the CPU)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint-N/ in OUTPUT, and fail if there is none (without --resume or "
        "--no-resume: continue when there is one)",
    )
    g.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has checkpoints")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dgemma.entrypoints.flags import from_args
    from dgemma.model.device import dtype_name
    from dgemma.training.checkpoints import latest_checkpoint
    from dgemma.training.config import TrainConfig
    from dgemma.training.train import run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume and args.no_resume:
        raise CLIError("--resume and --no-resume contradict each other")
    if args.resume and latest_checkpoint(Path(args.output)) is None:
        raise CLIError(f"--resume: {args.output} has no complete checkpoint-N/ to continue from")
    where = training_placement(args.device, args.precision)
    cfg = from_args(TrainConfig, args, TRAIN_FLAGS, precision=dtype_name(where.dtype))
    final = run_training(
        args.model, args.data, args.output, cfg, resume=not args.no_resume, progress=not args.quiet, device=where.device
    )
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"wrote {final}")
    return EXIT_OK


register(
    "train",
    "fine-tune a checkpoint (block-diffusion SFT or the AR baseline; LoRA; torchrun)",
    add_train_arguments,
    run_train,
    "Fine-tune a DiffusionGemma checkpoint on JSONL data with the published block-diffusion objective\n"
    "(or --objective ar). Writes HF-format checkpoints; re-running the same command resumes.\n"
    "Several processes: torchrun --nproc-per-node N -m dgemma.entrypoints.cli train ... [--strategy fsdp]\n"
    "(data parallel by default, FSDP2-sharded with --strategy fsdp; gloo on CPU, nccl on GPU).",
)


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


def _one_line(e: BaseException) -> str:
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
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    # Run the canonical `dgemma.entrypoints.cli` module, not this `__main__` copy, so that plugins that
    # `from dgemma.entrypoints.cli import register` register into the registry that main() reads.
    from dgemma.entrypoints.cli import main as _main

    sys.exit(_main())
