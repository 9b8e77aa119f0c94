"""The offline Python API, following vLLM: `LLM(model=PATH).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from .checkpoint import load_generation_config, load_model, resolve_model_path
from .config import token_ids
from .constraints import GuideFactory
from .device import resolve as resolve_placement
from . import reference
from .engine import Engine, Event
from .output import OutputProcessor, StopText
from .params import SamplingParamError, SamplingParams
from .tokenizer import IncrementalDecoder, Tokenizer

Prompt = Union[str, list[dict[str, Any]], dict[str, Any]]
Prompts = Union[Prompt, Sequence[Prompt]]  # one prompt, or several
ParamsArg = Union[SamplingParams, Sequence[SamplingParams], None]  # one for all prompts, or one per prompt
logger = logging.getLogger(__name__)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamDelta:
    """One streaming update for prompt `index`: newly committed text/tokens, or a draft of the current canvas."""

    index: int
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    draft_token_ids: list[int] | None = None
    finished: bool = False
    finish_reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class LLM:
    """A DiffusionGemma checkpoint ready to generate: model + tokenizer (optional) + engine.

    `model`: a checkpoint directory in the HF format, or a bundled model's name ("sudoku", "sudoku-ar", "code", ...).
    `device`: "auto" (default: CUDA when available, else the CPU), or a torch device such as "cpu", "cuda:1".
    `dtype`: "auto" (default: bfloat16 on CUDA and on CPUs with fast native bf16 matmul, AMX or AMD's AVX512-BF16;
    float32 elsewhere, e.g. AVX2-only CPUs, where bf16 is emulated and ~100x slower), "float32", "bfloat16" or
    "float16". The choice is logged (logger "dgemma.llm": INFO when "auto" chose, DEBUG otherwise); see
    dgemma.device for the rules.
    `max_batch`: rows generated together; `max_model_len`: context length the cache is sized for.
    `quantization`: None, or "fp8" (FP8 dense and expert weights, bf16 activations; see dgemma/quant.py): a bf16
    checkpoint is quantized at load, an FP8 checkpoint is read as it is (and needs no argument).
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
    ):
        self.path = resolve_model_path(model)
        placement = resolve_placement(device, dtype, quantization)
        auto = placement.why_device or placement.why_dtype  # an automatic choice is INFO, an explicit one DEBUG
        logger.log(logging.INFO if auto else logging.DEBUG, "dgemma: %s", placement.describe())
        self.device, self.dtype = placement.device, placement.dtype
        self.model = load_model(self.path, dtype=self.dtype, device=self.device, quantization=quantization)
        self.generation_config = load_generation_config(self.path)
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.engine = Engine(
            self.model,
            self.generation_config,
            max_batch=max_batch,
            max_model_len=max_model_len,
            prefill_chunk=prefill_chunk,
        )
        logger.log(logging.INFO if auto else logging.DEBUG, "dgemma: %s", self.engine.describe())
        self.token_ids = token_ids(self.model.config.text, self.generation_config)
        if self.tokenizer is not None:  # structured output: matchers over this tokenizer, ending at EOS
            self.engine.guides = GuideFactory(
                self.tokenizer.backend.to_str(), self.model.config.text.vocab_size, sorted(self.token_ids.eos_set)
            )

    # -- prompts ------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """A string, a chat message list, or {"prompt_token_ids": [...]} -> (text or None, token ids)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt must have 'prompt_token_ids'")
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return None, list(ids)
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: pass {{'prompt_token_ids': [...]}} instead of text")
        if isinstance(prompt, str):
            text = prompt
            ids = self.tokenizer.encode(text)
            if self.tokenizer.bos_token_id is not None and (not ids or ids[0] != self.tokenizer.bos_token_id):
                ids = [self.tokenizer.bos_token_id] + ids
            return text, ids
        if isinstance(prompt, list):
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            return text, self.tokenizer.encode(text)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def decoder(self) -> IncrementalDecoder | None:
        """A fresh incremental detokeniser (None without a tokenizer: no text)."""
        return self.tokenizer.incremental_decoder() if self.tokenizer is not None else None

    # -- generation ---------------------------------------------------------------------------------------------
    def generate_stream(
        self, prompts: Prompts, params: ParamsArg = None, stream_drafts: bool = False
    ) -> Iterator[StreamDelta]:
        """Stream deltas for several prompts at once (batched by the engine)."""
        plist, params_list = _normalise(prompts, params)
        params_list = [self.prepare_params(sp) for sp in params_list]
        encoded = [self.encode_prompt(p) for p in plist]
        procs = self._submit([ids for _, ids in encoded], params_list, stream_drafts)
        try:
            while any(not p.done for _, p in procs.values()) and self.engine.has_unfinished():
                for ev in self.engine.step():
                    index, proc = procs.get(ev.request_id, (-1, None))
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
                        )
        finally:  # a consumer that stops early (or a disconnect) frees the rows
            for rid, (_, p) in procs.items():
                if not p.done:
                    self.engine.abort(rid)

    def _submit(
        self, prompt_ids: list[list[int]], params_list: list[SamplingParams], stream_drafts: bool
    ) -> dict[str, tuple[int, OutputProcessor]]:
        """Queue every request, or none (ValueError): request id -> (prompt index, its output processor)."""
        procs: dict[str, tuple[int, OutputProcessor]] = {}
        try:
            for i, (ids, sp) in enumerate(zip(prompt_ids, params_list)):
                rid = self.engine.add_request(ids, sp, stream_drafts=stream_drafts)
                procs[rid] = (i, OutputProcessor(self.decoder(), sp.stop, self._finisher(rid)))
        except ValueError:
            for rid in procs:
                self.engine.abort(rid)
            raise
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
        plist, params_list = _normalise(prompts, params)
        params_list = [self.prepare_params(sp) for sp in params_list]
        encoded = [self.encode_prompt(p) for p in plist]
        if reference_sampling:
            return self._generate_reference(encoded, params_list)
        t0 = time.perf_counter()
        return _collect(encoded, self.generate_stream(plist, params_list), t0)

    def _generate_reference(self, encoded, params_list) -> list[RequestOutput]:
        res = reference.generate(self.model, [ids for _, ids in encoded], params_list, self.generation_config,
                                 self.engine.max_model_len, self.engine.eos)
        stops = params_list[0].stop
        outs = []
        for i, ((text, ids), r) in enumerate(zip(encoded, res)):
            toks, reason, out_text = r.token_ids, r.finish_reason, self.decode(r.token_ids)
            if stops and self.tokenizer is not None:  # stop strings cut the finished output
                cut = StopText(self.decoder(), stops)
                cut.push(toks)
                if cut.stopped:
                    toks, reason = cut.tokens, "stop"
                cut.finish()
                out_text = cut.text
            outs.append(RequestOutput(f"ref-{i}", text, ids, [CompletionOutput(0, out_text, toks, reason)], True,
                                      r.metrics(len(ids), len(toks))))
        return outs

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([messages], params)[0]

    def prepare_params(self, sp: SamplingParams) -> SamplingParams:
        """Text-level fields to token ids: `suffix` becomes `suffix_token_ids` (SamplingParamError when invalid)."""
        if sp.suffix is None:
            return sp
        sp.validate(self.model.config.vocab_size)
        if self.tokenizer is None:
            raise SamplingParamError("suffix", sp.suffix, f"{self.path} has no tokenizer.json (pass suffix_token_ids)")
        return replace(sp, suffix=None, suffix_token_ids=self.tokenizer.encode(sp.suffix))


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


def _collect(
    encoded: list[tuple[str | None, list[int]]], deltas: Iterator[StreamDelta], t0: float
) -> list[RequestOutput]:
    """Streamed deltas -> one finished RequestOutput per prompt, in order."""
    outs = [RequestOutput("", text, ids, [CompletionOutput(0, "", [], None)]) for text, ids in encoded]
    texts: list[list[str]] = [[] for _ in encoded]
    for d in deltas:
        out = outs[d.index]
        out.request_id = d.request_id
        out.outputs[0].token_ids.extend(d.token_ids)
        texts[d.index].append(d.text)
        if d.finished:
            out.outputs[0].finish_reason = d.finish_reason
            out.metrics = dict(d.metrics)
    for out, text in zip(outs, texts):
        out.outputs[0].text = "".join(text)
        out.metrics.setdefault("completion_tokens", len(out.outputs[0].token_ids))
        out.metrics["wall_s"] = time.perf_counter() - t0
    return outs
