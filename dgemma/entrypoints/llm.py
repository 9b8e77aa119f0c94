"""The offline Python API, following vLLM: `LLM(model=PATH).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from dgemma.text.chat_output import ChatMessage
from dgemma.model.checkpoint import load_generation_config, load_model, resolve_model_path
from dgemma.model.config import token_ids
from dgemma.structured.constraints import GuideFactory
from dgemma.model.device import resolve as resolve_placement
from dgemma.engine import reference
from dgemma.engine.core import Engine, Event
from dgemma.engine.logprobs import TokenLogprob
from dgemma.engine.params import SamplingParams
from dgemma.engine.request import EngineRequest
from dgemma.entrypoints.inputs import InputProcessor, Prompt, PromptInput
from dgemma.entrypoints.output import OutputProcessor, StopText, chat_decoder, parse_answer
from dgemma.text.tokenizer import IncrementalDecoder, Tokenizer

Prompts = Union[Prompt, Sequence[Prompt]]  # one prompt, or several
ParamsArg = Union[SamplingParams, Sequence[SamplingParams], None]  # one for all prompts, or one per prompt
logger = logging.getLogger(__name__)


@dataclass
class CompletionOutput:
    """One sample: `logprobs` when asked for (SamplingParams.logprobs); `message` for `LLM.chat`: the text split
    into content, reasoning and tool calls (then finish_reason is "tool_calls" when calls ended the answer)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    message: ChatMessage | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # SamplingParams.prompt_logprobs: one per prompt token


@dataclass
class StreamDelta:
    """One streaming update for prompt `index` (its sample `sample` when n > 1): newly committed text/tokens, or a
    draft of the current canvas."""

    index: int
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    draft_token_ids: list[int] | None = None
    finished: bool = False
    finish_reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    sample: int = 0
    logprobs: list[TokenLogprob] | None = None


class LLM:
    """A DiffusionGemma checkpoint ready to generate: model + tokenizer (optional) + engine.

    `model`: a checkpoint directory in the HF format, or a bundled model's name ("sudoku", "sudoku-ar").
    `device`: "auto" (default: CUDA when available, else the CPU), or a torch device such as "cpu", "cuda:1".
    `dtype`: "auto" (default: bfloat16 on CUDA and, when hidden size x `max_batch` is 256 or more, on CPUs with fast
    native bf16 matmul, AMX or AMD's AVX512-BF16; float32 elsewhere: narrow models at small batches, and AVX2-only
    CPUs, where bf16 is emulated and ~100x slower), "float32", "bfloat16" or "float16". The choice is logged (logger
    "dgemma.entrypoints.llm": INFO when "auto" chose, DEBUG otherwise); see dgemma.model.device for the rules.
    `max_batch`: rows generated together; `max_model_len`: context length the cache is sized for.
    `quantization`: None, or "fp8" (FP8 dense and expert weights, bf16 activations; dgemma/model/quant.py): a bf16
    checkpoint is quantized at load, an FP8 checkpoint is read as it is (and needs no argument).
    `enforce_eager`: never replay steps as CUDA graphs (on CUDA they are, by default; dgemma/engine/graphs.py).
    `compile`: run the graphed denoising step through `torch.compile` first (off by default; falls back to eager).
    `generation_config`: sampling defaults used instead of the checkpoint's generation_config.json.
    `tensor_parallel_size`: split the model over this many ranks (devices, or CPU processes), each holding its shard
    of the weights; dgemma starts and stops the worker processes itself (dgemma/parallel, docs/parallel.md). A
    script that uses it guards its entry point with `if __name__ == "__main__":` (the workers are spawned).
    """

    def __init__(
        self,
        model: str | Path,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        max_batch: int = 8,
        max_model_len: int | None = None,
        prefill_chunk: int = 1024,
        quantization: str | None = None,
        enforce_eager: bool = False,
        compile: bool = False,
        generation_config: dict[str, Any] | None = None,
        tensor_parallel_size: int = 1,
    ):
        self.path = resolve_model_path(model)
        placement = resolve_placement(device, dtype, quantization, model=self.path, max_batch=max_batch)
        auto = placement.why_device or placement.why_dtype  # an automatic choice is INFO, an explicit one DEBUG
        logger.log(logging.INFO if auto else logging.DEBUG, "dgemma: %s", placement.describe())
        self.device, self.dtype = placement.device, placement.dtype
        self.parallel = None
        if tensor_parallel_size > 1:  # rank 0's shard here, the other ranks in worker processes
            from dgemma.parallel import launch

            self.parallel = launch(self.path, tensor_parallel_size, self.dtype, self.device, quantization)
            self.model = self.parallel.model
        else:
            self.model = load_model(self.path, dtype=self.dtype, device=self.device, quantization=quantization)
        self.generation_config = load_generation_config(self.path) if generation_config is None else generation_config
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.token_ids = token_ids(self.model.config.text, self.generation_config)
        guides = None
        if self.tokenizer is not None:  # structured output: matchers over this tokenizer, ending at EOS
            guides = GuideFactory(
                self.tokenizer.backend.to_str(), self.model.config.text.vocab_size, sorted(self.token_ids.eos_set)
            )
        self.engine = Engine(
            self.model,
            self.generation_config,
            max_batch=max_batch,
            max_model_len=max_model_len,
            prefill_chunk=prefill_chunk,
            guides=guides,
            graphs=False if enforce_eager else None,
            compile=compile and not enforce_eager,
            parallel=self.parallel,
        )
        logger.log(logging.INFO if auto else logging.DEBUG, "dgemma: %s", self.engine.describe())
        self.inputs = InputProcessor(self.tokenizer, self.engine, str(self.path))

    # -- prompts ------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """A string, a chat message list, or {"prompt_token_ids": [...]} -> (text or None, token ids)
        (entrypoints.inputs: BOS first for text, the chat template for messages, token ids as given)."""
        p = self.inputs.tokenize(prompt)
        return p.text, p.ids

    @property
    def failure(self) -> str | None:
        """Why this LLM cannot run any more (a tensor-parallel worker died), or None."""
        return None if self.parallel is None else self.parallel.failure

    def close(self) -> None:
        """Stop the tensor-parallel workers (also done at exit); nothing to do on one device."""
        if self.parallel is not None:
            self.parallel.stop()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def decoder(self) -> IncrementalDecoder | None:
        """A fresh incremental detokeniser (None without a tokenizer: no text)."""
        return chat_decoder(self.tokenizer)

    def _requests(self, prompts: Prompts, params: ParamsArg) -> tuple[list[PromptInput], list[EngineRequest]]:
        """Every prompt tokenized and its request validated (once), before any of them is queued."""
        plist, params_list = _normalise(prompts, params)
        encoded = [self.inputs.tokenize(p) for p in plist]
        return encoded, [self.inputs.request(e.ids, sp) for e, sp in zip(encoded, params_list)]

    # -- generation ---------------------------------------------------------------------------------------------
    def generate_stream(
        self, prompts: Prompts, params: ParamsArg = None, stream_drafts: bool = False
    ) -> Iterator[StreamDelta]:
        """Stream deltas for several prompts at once (batched by the engine)."""
        return self._stream(self._requests(prompts, params)[1], stream_drafts, self.decoder)

    def _stream(
        self, requests: list[EngineRequest], stream_drafts: bool, decoder: Callable[[], IncrementalDecoder | None]
    ) -> Iterator[StreamDelta]:
        procs = self._submit(requests, stream_drafts, decoder)
        try:
            while any(not p.done for _, _, p in procs.values()) and self.engine.has_unfinished():
                for ev in self.engine.step():
                    index, sample, proc = procs.get(ev.request_id, (-1, 0, None))
                    d = proc.on_event(ev) if proc is not None else None
                    if d is not None:
                        yield StreamDelta(
                            index,
                            ev.request_id,
                            d.text,
                            d.token_ids,
                            d.draft_token_ids,
                            d.finished,
                            d.finish_reason,
                            d.metrics,
                            sample,
                            d.logprobs,
                        )
        finally:  # a consumer that stops early (or a disconnect) frees the rows
            for rid, (_, _, p) in procs.items():
                if not p.done:
                    self.engine.abort(rid)

    def _submit(
        self, requests: list[EngineRequest], drafts: bool, decoder: Callable[[], Any]
    ) -> dict[str, tuple[int, int, OutputProcessor]]:
        """Queue every validated request's n samples: request id -> (prompt index, sample index, its output
        processor); `decoder()` makes each one's detokeniser."""
        procs: dict[str, tuple[int, int, OutputProcessor]] = {}
        for i, req in enumerate(requests):
            for k, rid in enumerate(self.engine.submit(req, stream_drafts=drafts)):
                procs[rid] = (i, k, OutputProcessor(decoder(), req.params.stop, self._finisher(rid)))
        return procs

    def _finisher(self, rid: str) -> Callable[[int], Event]:
        """Ends `rid` at once keeping n tokens (the engine runs in this thread). If it had already finished in
        this step, its output ends here all the same (without metrics)."""

        def finish(n: int) -> Event:
            return self.engine.finish_request(rid, "stop", completion_tokens=n) or Event(rid, "finished")

        return finish

    def generate(
        self,
        prompts: Prompts,
        params: ParamsArg = None,
        reference_sampling: bool = False,
    ) -> list[RequestOutput]:
        """Generate for each prompt; returns one RequestOutput per prompt, in order.

        `reference_sampling=True` runs transformers' exact algorithm and random-number order (one left-padded
        batch, every row at every step): with the same seed on CPU in float32 it reproduces `model.generate`.
        """
        encoded, requests = self._requests(prompts, params)
        if reference_sampling:
            if self.parallel is not None:
                raise ValueError("reference_sampling runs on one device: use tensor_parallel_size=1")
            return self._generate_reference(encoded, requests)
        t0 = time.perf_counter()
        outs = _collect(encoded, self._stream(requests, False, self.decoder), t0)
        self._prompt_logprobs(outs, requests)
        return outs

    def _prompt_logprobs(self, outs: list[RequestOutput], requests: list[EngineRequest]) -> None:
        """Prompt tokens' log-probabilities where asked for: one causal encoder pass over each prompt."""
        for out, req in zip(outs, requests):
            if req.params.prompt_logprobs is not None:
                out.prompt_logprobs = self.engine.prompt_logprobs(out.prompt_token_ids, req.params.prompt_logprobs)

    def _generate_reference(self, encoded: list[PromptInput], requests: list[EngineRequest]) -> list[RequestOutput]:
        res = reference.generate(self.model, requests, self.generation_config, self.engine.eos)
        stops = requests[0].params.stop
        outs = []
        for i, (p, r) in enumerate(zip(encoded, res)):
            toks, reason, out_text = r.token_ids, r.finish_reason, self.decode(r.token_ids)
            if stops and self.tokenizer is not None:  # stop strings cut the finished output
                cut = StopText(self.decoder(), stops)
                cut.push(toks)
                if cut.stopped:
                    toks, reason = cut.tokens, "stop"
                cut.finish()
                out_text = cut.text
            outs.append(
                RequestOutput(
                    f"ref-{i}",
                    p.text,
                    p.ids,
                    [CompletionOutput(0, out_text, toks, reason)],
                    True,
                    r.metrics(len(p.ids), len(toks)),
                )
            )
        return outs

    def chat(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> RequestOutput:
        """Answer a conversation, as vLLM's `LLM.chat`: `tools` (OpenAI function declarations), `tool_choice`
        ("none", "auto", "required" or {"type": "function", "function": {"name": ...}}), `parallel_tool_calls` and
        `chat_template_kwargs` (e.g. {"enable_thinking": True}) as in the server. Each output's `message` holds the
        content, the reasoning and the parsed tool calls; calls are constrained to the declared tools' schemas
        (see dgemma/text/chat.py). Raises ValueError (chat.ChatRequestError naming the field) for a bad request."""
        prompt = self.inputs.render_chat(messages, tools, tool_choice, parallel_tool_calls, chat_template_kwargs)
        ids = self.inputs.chat_ids(prompt)
        req = self.inputs.request(ids, params, prompt)
        deltas = self._stream([req], False, lambda: chat_decoder(self.tokenizer, prompt))
        out = _collect([PromptInput(prompt.text, ids)], deltas, time.perf_counter())[0]
        self._prompt_logprobs([out], [req])
        for o in out.outputs:
            o.message, o.finish_reason = parse_answer(prompt, o.text, o.finish_reason)
        return out


def _normalise(
    prompts: Prompts,
    params: ParamsArg,
) -> tuple[list[Prompt], list[SamplingParams]]:
    """One prompt or several, and one SamplingParams for all or one per prompt -> two lists of equal length."""
    if isinstance(prompts, (str, dict)) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], dict) and "role" in prompts[0]
    ):
        prompts = [prompts]
    plist = list(prompts)
    if not plist:
        raise ValueError("no prompts given")
    if params is None or isinstance(params, SamplingParams):
        params_list = [params or SamplingParams()] * len(plist)
    else:
        params_list = list(params)
        if len(params_list) != len(plist):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(plist)} prompts")
    return plist, params_list


def _collect(encoded: list[PromptInput], deltas: Iterator[StreamDelta], t0: float) -> list[RequestOutput]:
    """Streamed deltas -> one finished RequestOutput per prompt (one output per sample), in order."""
    outs = [RequestOutput("", p.text, list(p.ids), []) for p in encoded]
    texts: dict[tuple[int, int], list[str]] = {}
    for d in deltas:
        out = outs[d.index]
        while len(out.outputs) <= d.sample:
            out.outputs.append(CompletionOutput(len(out.outputs), "", [], None))
        o = out.outputs[d.sample]
        if d.sample == 0:
            out.request_id = d.request_id
        o.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            o.logprobs = (o.logprobs or []) + d.logprobs
        texts.setdefault((d.index, d.sample), []).append(d.text)
        if d.finished:
            o.finish_reason = d.finish_reason
            if d.sample == 0:
                out.metrics = dict(d.metrics)
    for i, out in enumerate(outs):
        for o in out.outputs:
            o.text = "".join(texts.get((i, o.index), []))
        out.metrics.setdefault("completion_tokens", sum(len(o.token_ids) for o in out.outputs))
        out.metrics["wall_s"] = time.perf_counter() - t0
    return outs
