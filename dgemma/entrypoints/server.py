"""An OpenAI-compatible HTTP server over one `LLM` (vLLM's conventions, kept thin).

    python -m dgemma.entrypoints.server MODEL [--host 127.0.0.1] [--port 8000] [--max-num-seqs 8] [--api-key KEY]

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize, POST /detokenize,
GET /health, GET /version, GET /metrics (Prometheus). With API keys (`--api-key`, $DGEMMA_API_KEY) every path but
the last three needs `Authorization: Bearer KEY` (`security`); TLS, CORS and a proxy's root path are options
(`serve_args`). Request/response shapes and the accepted sampling fields are documented in
`dgemma.entrypoints.protocol`; in diffusion mode (the default) `temperature`/`top_p`/`top_k` are ignored (the denoising
temperature follows the t_max -> t_min schedule); they apply in `mode="ar"`.

The modules: `engine_loop` (the one thread that owns the engine, and the asyncio side's link to it), `serving`
(request -> prompt ids and `SamplingParams` -> engine -> response), `generation` (one sample's events -> text
updates), `streaming` (server-sent events), `request_io` (reading bodies), `errors` (OpenAI error bodies),
`metrics` (Prometheus), `tokenization` (/tokenize, /detokenize), `security` (API keys, CORS), `serve_args` (the
command line's options). This module builds the app and its routes, and runs it.

Admission control: at most `max_queue` requests are in flight (waiting + running); more get 429 with Retry-After.
A request that exceeds `request_timeout` is aborted (504). A client that disconnects (streaming or not) has its
request aborted, which frees its cache row at once. If the engine thread dies, /health answers 503 and requests get
500 error bodies; the process keeps serving those answers. If a tensor-parallel worker dies
(`--tensor-parallel-size`), /health answers 503 at once and the server exits with status 1 `FAILURE_GRACE_S`
seconds later. On SIGTERM/SIGINT the server stops admitting (503), lets in-flight requests finish (up to
--shutdown-timeout seconds, then aborts them), stops the engine thread and exits with status 0.

Heavy imports (fastapi, uvicorn, prometheus_client, pydantic) happen inside `create_app`/`run_serve`, so that
`add_serve_arguments` can be used by a CLI without the `serve` extras installed.
"""

import argparse
import asyncio
import importlib
import logging
import signal
import sys
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator

from dgemma import __version__
from dgemma.entrypoints.cli import CLIError, register
from dgemma.entrypoints.engine_loop import EngineLoop, TorchThread
from dgemma.entrypoints.errors import APIError, empty_response, exception_handlers, json_response
from dgemma.entrypoints.serve_args import DEFAULT_MAX_BODY_BYTES
from dgemma.entrypoints.security import secure
from dgemma.entrypoints.serve_args import add_serve_arguments, api_keys, arg_error
from dgemma.entrypoints.serving import ServerState, generate
from dgemma.entrypoints.tokenization import detokenize, tokenize

if TYPE_CHECKING:
    from dgemma.entrypoints.llm import LLM

__all__ = ["APIError", "EngineLoop", "TorchThread", "add_serve_arguments", "create_app", "main", "run_serve"]

logger = logging.getLogger(__name__)
FAILURE_GRACE_S = 2.0  # a dead tensor-parallel worker: /health says 503 this long before the process exits 1


async def health(request: Any) -> Any:
    from dgemma.entrypoints.protocol import error_body

    el = request.app.state.dgemma.engine_loop
    failure = request.app.state.dgemma.llm.failure  # a dead tensor-parallel worker
    if el.healthy and failure is None:
        return empty_response(200)
    reason = "the server is shutting down" if el.draining else f"the engine has failed: {failure or el.error}"
    return json_response(error_body(reason, "ServiceUnavailableError", None, 503), 503)


async def version(request: Any) -> Any:
    return json_response({"version": __version__})


async def models(request: Any) -> Any:
    srv: ServerState = request.app.state.dgemma
    return json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": srv.model_name,
                    "object": "model",
                    "created": srv.created,
                    "owned_by": "dgemma",
                    "root": str(srv.llm.path),
                    "parent": None,
                    "max_model_len": srv.llm.engine.max_model_len,
                }
            ],
        }
    )


async def metrics(request: Any) -> Any:
    from starlette.responses import Response

    data, ctype = request.app.state.dgemma.metrics.render()
    return Response(content=data, media_type=ctype)


async def completions(request: Any) -> Any:
    return await generate(request, request.app.state.dgemma.endpoints["completions"])


async def chat_completions(request: Any) -> Any:
    return await generate(request, request.app.state.dgemma.endpoints["chat"])


_ROUTES = (
    ("/health", health, "GET"),
    ("/version", version, "GET"),
    ("/v1/models", models, "GET"),
    ("/metrics", metrics, "GET"),
    ("/v1/completions", completions, "POST"),
    ("/v1/chat/completions", chat_completions, "POST"),
    ("/tokenize", tokenize, "POST"),
    ("/detokenize", detokenize, "POST"),
)


def create_app(
    llm: "LLM",
    *,
    model_name: str,
    max_queue: int = 64,
    request_timeout: float = 600,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    torch_thread: TorchThread | None = None,
    api_keys: list[str] | None = None,
    allowed_origins: list[str] | None = None,
) -> Any:
    """The FastAPI app serving `llm` under `model_name`. The engine runs for the app's lifespan on `torch_thread`
    (pass the one the model was loaded on; by default a new one). `api_keys`: the Bearer tokens `/v1/*`,
    `/tokenize` and `/detokenize` require (none: open); `allowed_origins`: CORS origins (none: no CORS headers)."""
    from fastapi import FastAPI

    if max_queue < 1:
        raise ValueError("max_queue must be >= 1")
    srv = ServerState(llm, model_name, max_queue, float(request_timeout), max_body_bytes, torch_thread or TorchThread())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        srv.engine_loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await srv.engine_loop.shutdown()

    app = FastAPI(title="dgemma OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.state.dgemma = srv
    for exc, handler in exception_handlers():
        app.add_exception_handler(exc, handler)
    for path, endpoint, method in _ROUTES:
        app.add_route(path, endpoint, methods=[method])
    secure(app, list(api_keys or []), list(allowed_origins or []))
    return app


# -- command line ---------------------------------------------------------------------------------------------------
def _generation_config(value: str) -> dict[str, Any] | None:
    """`--generation-config`: None for the checkpoint's own (auto), {} for dgemma's defaults, or a directory's."""
    from pathlib import Path

    from dgemma.model.checkpoint import load_generation_config

    if value == "auto":
        return None
    if value in ("default", "vllm"):
        return {}
    if not (Path(value) / "generation_config.json").is_file():
        raise ValueError(f"--generation-config {value}: no generation_config.json there (or give auto, default)")
    return load_generation_config(value)


def _load(args: argparse.Namespace, where: Any, generation_config: dict[str, Any] | None) -> "LLM":
    """Load the model (on the torch thread that will run it)."""
    import torch

    from dgemma.entrypoints.llm import LLM

    if getattr(args, "torch_threads", None) is not None:
        torch.set_num_threads(args.torch_threads)
    if getattr(args, "seed", None) is not None:  # unseeded requests draw their seeds from this generator
        torch.manual_seed(args.seed)
    llm = LLM(
        args.model,
        device=where.device,
        dtype=where.dtype,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        quantization=getattr(args, "quantization", None),
        enforce_eager=getattr(args, "enforce_eager", False),
        compile=getattr(args, "compile", False),
        generation_config=generation_config,
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
    )
    print(f"dgemma: {llm.engine.describe()}", file=sys.stderr, flush=True)
    return llm


def _prepare(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """The device placement and generation config the options ask for (ValueError naming the bad option)."""
    from dgemma.model.device import resolve

    error = arg_error(args)
    if error is not None:
        raise ValueError(error)
    gen = _generation_config(getattr(args, "generation_config", "auto"))
    where = resolve(args.device, args.dtype, getattr(args, "quantization", None), args.model, args.max_batch)
    return where, gen


def run_serve(args: argparse.Namespace) -> int:
    """Load the model and serve it until SIGTERM/SIGINT; returns the process exit status."""
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        where, gen = _prepare(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"dgemma: {where.describe()}", file=sys.stderr, flush=True)
    torch_thread = TorchThread()  # the model is loaded and run on this one thread
    try:
        llm = torch_thread.call(lambda: _load(args, where, gen))
    except (ValueError, OSError) as e:
        print(f"error: cannot load {args.model}: {e}", file=sys.stderr)
        return 2
    keys = api_keys(getattr(args, "api_key", None))
    app = create_app(
        llm,
        model_name=args.served_model_name or args.model,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        torch_thread=torch_thread,
        api_keys=keys,
        allowed_origins=getattr(args, "allowed_origins", []),
    )
    scheme = "https" if getattr(args, "ssl_certfile", None) else "http"
    print(
        f"dgemma: serving {args.model} as {args.served_model_name or args.model} on {scheme}://{args.host}:"
        f"{args.port}{getattr(args, 'root_path', '')}: {args.max_batch} requests at a time, context "
        f"{llm.engine.max_model_len} tokens, {'an API key required' if keys else 'no API key'}",
        file=sys.stderr,
        flush=True,
    )
    return _run_uvicorn(app, args)


def _run_uvicorn(app: Any, args: argparse.Namespace) -> int:
    """Serve `app` until SIGTERM/SIGINT, draining in-flight requests first; the exit status."""
    import uvicorn

    engine_loop: EngineLoop = app.state.dgemma.engine_loop

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine_loop.draining = True  # /health -> 503 and no new requests while in-flight ones finish
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after shutting down; a graceful stop should exit 0 instead.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured[:] = [s for s in captured if s not in (signal.SIGTERM, signal.SIGINT)]

    server = Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            lifespan="on",
            access_log=not args.no_access_log,
            timeout_graceful_shutdown=args.shutdown_timeout,
            ssl_keyfile=getattr(args, "ssl_keyfile", None),
            ssl_certfile=getattr(args, "ssl_certfile", None),
            root_path=getattr(args, "root_path", ""),
        )
    )
    llm = app.state.dgemma.llm
    if llm.parallel is not None:  # a dead worker: exit (status 1) once /health has said so for a moment
        llm.parallel.on_failure(
            lambda why: threading.Timer(FAILURE_GRACE_S, setattr, (server, "should_exit", True)).start()
        )
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits on e.g. a port already in use
        return int(e.code) if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        return 0
    return 0 if server.started and llm.failure is None else 1


SERVE_HELP = "serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics)"


SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client", "pydantic")  # the `serve` extra's modules


def run_serve_command(args: argparse.Namespace) -> int:
    """`dgemma serve`: `run_serve`, once the `serve` extra is known to be installed (else one line saying how)."""
    missing = []
    for name in SERVE_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise CLIError(f"dgemma serve needs {', '.join(missing)}: pip install 'dgemma[serve]'")
    return run_serve(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dgemma.entrypoints.server", description="OpenAI-compatible dgemma server"
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

register(
    "serve",
    SERVE_HELP,
    add_serve_arguments,
    run_serve_command,
    (__doc__ or "").split("\n\n")[0] + "\n\n"
    "    dgemma serve MODEL [--host 127.0.0.1] [--port 8000] [--max-num-seqs 8] [--api-key KEY]\n\n"
    "API keys also from $DGEMMA_API_KEY; vLLM's option names work where dgemma has the feature (docs/server.md).",
)
