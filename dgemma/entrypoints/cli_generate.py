"""`dgemma generate` (one prompt), `dgemma chat` (an interactive conversation) and `dgemma init-random`, with the
terminal output they share (live drafts, streamed text, the JSON result)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from dgemma.entrypoints.flags import CLIError
from dgemma.entrypoints.flags import positive_int as _positive_int

from dgemma.entrypoints.cli import (
    EXIT_OK,
    PROG,
    one_line,
    parse_token_ids,
    add_model_arguments,
    add_sampling_arguments,
    load_llm,
    register,
    sampling_params_from_args,
)

if TYPE_CHECKING:  # imported lazily at run time: `dgemma --help` should not wait for torch more than needed
    from dgemma.entrypoints.llm import LLM
    from dgemma.engine.params import SamplingParams


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
        type=parse_token_ids,
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
            print(f"{PROG}: error: {one_line(e)}" + (" (/reset starts over)" if history[:-1] else ""), file=sys.stderr)
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
