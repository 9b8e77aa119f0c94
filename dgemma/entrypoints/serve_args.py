"""The `dgemma serve` command line: its options (vLLM's spellings where dgemma has the feature), their checks, and
one-line answers for the vLLM options dgemma does not have.

    dgemma serve MODEL [--host 127.0.0.1] [--port 8000] [--max-num-seqs 8] [--api-key KEY] [--ssl-certfile F ...]

Only the standard library is imported here, so `dgemma serve --help` works without the `serve` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DEFAULT_MAX_BODY_BYTES = 16 << 20
API_KEY_ENV = "DGEMMA_API_KEY"

# vLLM options dgemma does not have -> the nearest dgemma option or why none is needed. Each is accepted by the
# parser (hidden from --help) only to be answered with one line naming the replacement.
VLLM_FLAGS: dict[str, str] = {
    "--gpu-memory-utilization": "the cache is sized by --max-model-len and --max-num-seqs",
    "--max-num-batched-tokens": "use --max-num-seqs (requests generated together)",
    "--kv-cache-dtype": "the cache has the model's dtype (--dtype)",
    "--block-size": "the cache is one ring buffer per row, sized by --max-model-len",
    "--swap-space": "not supported: the cache stays on the device",
    "--cpu-offload-gb": "not supported: use --quantization fp8 to halve the weights",
    "--enable-prefix-caching": "not needed: a shared prompt prefix is reused automatically",
    "--tokenizer": "not supported: the tokenizer is the checkpoint's tokenizer.json",
    "--tokenizer-mode": "not supported: the tokenizer is the checkpoint's tokenizer.json",
    "--chat-template": "not supported: the chat template is the checkpoint's tokenizer_config.json",
    "--trust-remote-code": "not needed: dgemma runs no code from the checkpoint",
    "--revision": "not supported: MODEL is a local directory or a bundled model's name",
    "--download-dir": "not supported: MODEL is a local directory or a bundled model's name",
    "--load-format": "not supported: checkpoints are safetensors",
    "--pipeline-parallel-size": "not supported: split a model over devices with --tensor-parallel-size",
    "--data-parallel-size": "not supported: run one `dgemma serve` per device",
    "--distributed-executor-backend": "not needed: --tensor-parallel-size starts its worker processes itself",
    "--enable-auto-tool-choice": "not needed: tool calls are on when the chat template has Gemma 4's syntax",
    "--tool-call-parser": "not needed: the tool-call format is read from the chat template",
    "--reasoning-parser": "not needed: the thinking format is read from the chat template",
    "--guided-decoding-backend": "not needed: structured output is built in (llguidance)",
    "--structured-outputs-config": "not needed: structured output is built in (llguidance)",
    "--override-generation-config": "use --generation-config DIR (a generation_config.json to use)",
    "--uvicorn-log-level": "use --log-level",
    "--disable-log-requests": "use --no-access-log",
    "--disable-log-stats": "use --no-access-log",
    "--enable-lora": "not supported: serve a merged checkpoint",
    "--lora-modules": "not supported: serve a merged checkpoint",
    "--speculative-config": "not supported: diffusion already commits several tokens per step",
    "--allowed-methods": "use --allowed-origins (methods and headers are all allowed for those origins)",
    "--allowed-headers": "use --allowed-origins (methods and headers are all allowed for those origins)",
    "--allow-credentials": "not supported: CORS requests carry no credentials (the key is a header)",
    "--ssl-ca-certs": "not supported: use --ssl-keyfile and --ssl-certfile",
    "--max-logprobs": "not needed: requests may ask for up to 20 alternatives",
    "--return-tokens-as-token-ids": "send return_tokens_as_token_ids in the request",
    "--enforce-eager-mode": "use --enforce-eager",
}


class _VllmFlag(argparse.Action):
    """A vLLM option dgemma lacks: print one line naming the nearest dgemma option and exit with status 2."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None):
        print(f"dgemma serve: error: {option} is vLLM's; {VLLM_FLAGS[str(option)]}", file=sys.stderr)
        raise SystemExit(2)


def _origins(value: str) -> list[str]:
    """`--allowed-origins`: comma-separated, or vLLM's JSON list (`'["https://a.example"]'`)."""
    text = value.strip()
    if text.startswith("["):
        import json

        try:
            items = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a JSON list of origins, got {value!r}") from None
        if not isinstance(items, list) or not all(isinstance(o, str) for o in items):
            raise argparse.ArgumentTypeError(f"expected a JSON list of origins, got {value!r}")
        return items
    return [o.strip() for o in text.split(",") if o.strip()]


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from dgemma.entrypoints.cli import COMPILE_HELP, DEVICE_HELP, DTYPE_HELP, EAGER_HELP, TP_HELP  # same words

    parser.add_argument("model_tag", nargs="?", metavar="MODEL", help="checkpoint directory or bundled model name")
    parser.add_argument("--model", default=None, help="the same as MODEL (either may be given)")
    parser.add_argument(
        "--served-model-name", default=None, help="model name clients must use (default: the MODEL argument)"
    )
    parser.add_argument(
        "--max-num-seqs", "--max-batch", dest="max_batch", type=int, default=8, metavar="N",
        help="requests generated together, i.e. cache rows (default 8)",
    )  # fmt: skip
    parser.add_argument("--max-model-len", type=int, default=None, help="context length the cache is sized for")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help=DTYPE_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--quantization", choices=["fp8"], default=None,
        help="fp8: FP8 dense and expert weights, bf16 activations (see `dgemma generate --help`)",
    )  # fmt: skip
    parser.add_argument("--enforce-eager", action="store_true", help=EAGER_HELP)
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N", help=TP_HELP)
    parser.add_argument(
        "--seed", type=int, default=None,
        help="seed torch's generator at start-up: requests without a `seed` then draw theirs reproducibly, in order",
    )  # fmt: skip
    parser.add_argument(
        "--generation-config", default="auto", metavar="auto|default|DIR",
        help="sampling defaults: auto (the checkpoint's generation_config.json), default (dgemma's own) or a "
        "directory holding a generation_config.json",
    )  # fmt: skip
    parser.add_argument(
        "--torch-threads", type=int, default=None,
        help="torch intra-op threads (default: torch's choice; 1 is often best for small models)",
    )  # fmt: skip


def _add_http_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("HTTP and security")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    g.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY[,KEY...]",
        help=f"require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize; several keys (comma-"
        f"separated) for rotation; default ${API_KEY_ENV} (safer: not visible in the process list)",
    )  # fmt: skip
    g.add_argument("--ssl-keyfile", default=None, help="TLS private key file (PEM): serve HTTPS")
    g.add_argument("--ssl-certfile", default=None, help="TLS certificate file (PEM), with --ssl-keyfile")
    g.add_argument(
        "--allowed-origins", type=_origins, default=[], metavar="ORIGINS",
        help="CORS: origins browsers may call from, comma-separated or a JSON list ('*' for any; default none)",
    )  # fmt: skip
    g.add_argument("--root-path", default="", help="the path prefix a reverse proxy serves this API under")
    g.add_argument("--max-queue", type=int, default=64, help="requests in flight (running + waiting) before 429")
    g.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds before a request is aborted (default 600)"
    )
    g.add_argument(
        "--shutdown-timeout", type=int, default=30,
        help="seconds to let in-flight requests finish on SIGTERM before aborting them",
    )  # fmt: skip
    g.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
        help="largest accepted request body (default 16 MiB)",
    )  # fmt: skip
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--no-access-log", action="store_true", help="do not log every request")


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `serve` options (for `dgemma serve` and `python -m dgemma.entrypoints.server`)."""
    _add_model_options(parser)
    _add_http_options(parser)
    for flag in VLLM_FLAGS:
        parser.add_argument(flag, nargs="?", action=_VllmFlag, help=argparse.SUPPRESS)
    return parser


def _model_error(args: argparse.Namespace) -> str | None:
    tag, flag = getattr(args, "model_tag", None), args.model
    if tag is None and flag is None:
        return "give the model: dgemma serve MODEL (or --model MODEL)"
    if tag is not None and flag is not None and tag != flag:
        return f"two models given: {tag!r} and --model {flag!r}"
    args.model = flag or tag
    return None


def _security_error(args: argparse.Namespace) -> str | None:
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        return "--ssl-keyfile and --ssl-certfile go together"
    for name in ("ssl_keyfile", "ssl_certfile"):
        path = getattr(args, name)
        if path is not None and not os.path.isfile(path):
            return f"--{name.replace('_', '-')} {path}: no such file"
    if args.api_key is not None and not api_keys(args.api_key):
        return "--api-key is empty"
    if args.root_path and not args.root_path.startswith("/"):
        return f"--root-path must start with '/', got {args.root_path!r}"
    return None


def arg_error(args: argparse.Namespace) -> str | None:
    """The first missing or out-of-range `serve` option, as a message (None when all are fine); sets `args.model`
    from the positional MODEL."""
    error = _model_error(args) or _security_error(args)
    if error is not None:
        return error
    for name, lo, hi in (("max_batch", 1, 1 << 16), ("max_queue", 1, 1 << 20), ("port", 0, 65535)):
        v = getattr(args, name)
        if not lo <= v <= hi:
            return f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {v}"
    threads = getattr(args, "torch_threads", None)
    if threads is not None and threads < 1:
        return f"--torch-threads must be >= 1, got {threads}"
    if getattr(args, "tensor_parallel_size", 1) < 1:
        return f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}"
    return None


def api_keys(value: str | None) -> list[str]:
    """`--api-key` / $DGEMMA_API_KEY -> the accepted keys (comma-separated, blanks dropped)."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


__all__ = ["API_KEY_ENV", "VLLM_FLAGS", "add_serve_arguments", "api_keys", "arg_error"]
