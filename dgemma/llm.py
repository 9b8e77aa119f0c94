"""The offline Python API, following vLLM: `LLM(model=PATH).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch

from .checkpoint import load_generation_config, load_model, resolve_model_path
from .constraints import GuideFactory
from .device import resolve as resolve_placement
from . import reference
from .engine import Engine, Event
from .sampler import SamplingParams
from .tokenizer import Tokenizer

Prompt = Union[str, list[dict[str, Any]], dict[str, Any]]
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


class TextAssembler:
    """Committed token ids -> text that is safe to print now.

    Holds back a trailing incomplete UTF-8 character (U+FFFD that later bytes may complete) and a trailing partial
    match of a stop string; cuts the text at the first stop string. The concatenation of everything `push` and
    `finish` return equals `text` after `finish`.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Iterable[str] = ()) -> None:
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.printed = ""
        self.text = ""

    @property
    def stopped(self) -> bool:
        """True once the text contains a stop string."""
        return self._stop_at(self.decode(self.tokens)) is not None

    def _stop_at(self, text: str) -> int | None:
        found = [text.find(s) for s in self.stops if s in text]
        return min(found) if found else None

    def _advance(self, safe: str) -> str:
        if not safe.startswith(self.printed):  # the decoder revised printed text: cannot unprint, print nothing
            return ""
        delta, self.printed = safe[len(self.printed):], safe
        return delta

    def push(self, ids: Iterable[int]) -> str:
        self.tokens.extend(ids)
        full = self.decode(self.tokens)
        hit = self._stop_at(full)
        if hit is not None:
            return self._advance(full[:hit])
        safe = full.rstrip("\ufffd")
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(safe)), hold, -1):
                if safe.endswith(s[:k]):
                    hold = k
                    break
        return self._advance(safe[:len(safe) - hold])

    def finish(self) -> str:
        full = self.decode(self.tokens)
        hit = self._stop_at(full)
        self.text = full[:hit] if hit is not None else full
        if not self.text.startswith(self.printed):
            return ""
        delta, self.printed = self.text[len(self.printed):], self.text
        return delta


def stop_prefix(tokens: list[int], decode: Callable[[list[int]], str], stops: list[str]) -> int:
    """The shortest token prefix whose text contains a stop string (len(tokens) if none does)."""
    for k in range(1, len(tokens) + 1):
        text = decode(tokens[:k])
        if any(x in text for x in stops):
            return k
    return len(tokens)


class LLM:
    """A DiffusionGemma checkpoint ready to generate: model + tokenizer (optional) + engine.

    `model`: a checkpoint directory in the HF format, or a bundled model's name ("sudoku", "sudoku-ar").
    `device`: "auto" (default: CUDA when available, else the CPU), or a torch device such as "cpu", "cuda:1".
    `dtype`: "auto" (default: bfloat16 on CUDA and on CPUs with fast native bf16 matmul, AMX or AMD's AVX512-BF16;
    float32 elsewhere, e.g. AVX2-only CPUs, where bf16 is emulated and ~100x slower), "float32", "bfloat16" or
    "float16". The choice is logged (logger "dgemma.llm": INFO when "auto" chose, DEBUG otherwise); see
    dgemma.device for the rules.
    `max_batch`: rows generated together; `max_model_len`: context length the cache is sized for.
    `quantization`: None, or "fp8" (FP8 dense and expert weights, bf16 activations; see dgemma/quant.py): a bf16
    checkpoint is quantized at load, an FP8 checkpoint is read as it is (and needs no argument).
    """

    def __init__(self, model: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                 max_batch: int = 8, max_model_len: int | None = None, prefill_chunk: int = 1024,
                 quantization: str | None = None):
        self.path = resolve_model_path(model)
        placement = resolve_placement(device, dtype, quantization)
        auto = placement.why_device or placement.why_dtype  # an automatic choice is INFO, an explicit one DEBUG
        logger.log(logging.INFO if auto else logging.DEBUG, "dgemma: %s", placement.describe())
        self.device, self.dtype = placement.device, placement.dtype
        self.model = load_model(self.path, dtype=self.dtype, device=self.device, quantization=quantization)
        self.generation_config = load_generation_config(self.path)
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.engine = Engine(self.model, self.generation_config, max_batch=max_batch, max_model_len=max_model_len,
                             prefill_chunk=prefill_chunk)
        logger.log(logging.INFO if auto else logging.DEBUG, "dgemma: %s", self.engine.describe())
        if self.tokenizer is not None:  # structured output: matchers over this tokenizer, ending at the engine's EOS
            self.engine.guides = GuideFactory(self.tokenizer.backend.to_str(), self.model.config.text.vocab_size,
                                              sorted(self.engine.eos))

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

    # -- generation ---------------------------------------------------------------------------------------------
    def generate_stream(self, prompts: Prompt | Sequence[Prompt],
                        params: SamplingParams | Sequence[SamplingParams] | None = None,
                        stream_drafts: bool = False) -> Iterator[StreamDelta]:
        """Stream deltas for several prompts at once (batched by the engine)."""
        plist, params_list = self._normalise(prompts, params)
        params_list = [self.prepare_params(sp) for sp in params_list]
        encoded = [self.encode_prompt(p) for p in plist]
        ids: dict[str, int] = {}
        try:
            for i, ((_, toks), sp) in enumerate(zip(encoded, params_list)):
                ids[self.engine.add_request(toks, sp, stream_drafts=stream_drafts)] = i
        except ValueError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        state = {rid: {"asm": TextAssembler(self.decode if self.tokenizer else (lambda t: ""), sp.stop),
                       "stopped": False} for rid, sp in zip(ids, params_list)}
        try:
            while any(not s["stopped"] for s in state.values()):
                if not self.engine.has_unfinished():
                    break
                for ev in self.engine.step():
                    if ev.request_id not in ids:
                        continue
                    yield from self._on_event(ev, ids[ev.request_id], state)
        finally:  # a consumer that stops early (or a disconnect) frees the rows
            for rid, s in state.items():
                if not s["stopped"]:
                    self.engine.abort(rid)

    def _on_event(self, ev: Event, index: int, state: dict) -> Iterator[StreamDelta]:
        s = state[ev.request_id]
        if s["stopped"]:
            return
        asm: TextAssembler = s["asm"]
        if ev.kind == "draft":
            yield StreamDelta(index, ev.request_id, draft_token_ids=ev.token_ids)
        elif ev.kind == "tokens":
            before = len(asm.tokens)
            delta = asm.push(ev.token_ids)
            if asm.stopped:
                # Keep the shortest token prefix whose text reaches the stop string; the text ends before it.
                cut = stop_prefix(asm.tokens, self.decode, asm.stops)
                new_ids = asm.tokens[before:cut]
                del asm.tokens[cut:]
                s["stopped"] = True
                done = self.engine.finish_request(ev.request_id, "stop", completion_tokens=cut)
                yield StreamDelta(index, ev.request_id, delta + asm.finish(), new_ids, finished=True,
                                  finish_reason="stop", metrics=done.metrics if done else {})
                return
            yield StreamDelta(index, ev.request_id, delta, ev.token_ids)
        elif ev.kind == "finished":
            s["stopped"] = True
            yield StreamDelta(index, ev.request_id, asm.finish(), finished=True, finish_reason=ev.finish_reason,
                              metrics=ev.metrics)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 reference_sampling: bool = False) -> list[RequestOutput]:
        """Generate for each prompt; returns one RequestOutput per prompt, in order.

        `reference_sampling=True` runs transformers' exact algorithm and random-number order (one left-padded
        batch, every row at every step): with the same seed on CPU in float32 it reproduces `model.generate`.
        """
        plist, params_list = self._normalise(prompts, params)
        params_list = [self.prepare_params(sp) for sp in params_list]
        encoded = [self.encode_prompt(p) for p in plist]
        if reference_sampling:
            return self._generate_reference(encoded, params_list)
        t0 = time.perf_counter()
        results: dict[int, dict[str, Any]] = {i: {"tokens": [], "text": "", "reason": None, "metrics": {}, "id": ""}
                                              for i in range(len(plist))}
        for d in self.generate_stream(plist, params_list):
            r = results[d.index]
            r["id"] = d.request_id
            r["tokens"].extend(d.token_ids)
            r["text"] += d.text
            if d.finished:
                r["reason"] = d.finish_reason
                r["metrics"] = dict(d.metrics)
        outs = []
        for i, (text, ids) in enumerate(encoded):
            r = results[i]
            m = r["metrics"]
            m.setdefault("completion_tokens", len(r["tokens"]))
            m["wall_s"] = time.perf_counter() - t0
            outs.append(RequestOutput(r["id"], text, ids, [CompletionOutput(0, r["text"], r["tokens"], r["reason"])],
                                      True, m))
        return outs

    def _generate_reference(self, encoded, params_list) -> list[RequestOutput]:
        res = reference.generate(self.model, [ids for _, ids in encoded], params_list, self.generation_config,
                                 self.engine.max_model_len, self.engine.eos)
        stops = params_list[0].stop
        outs = []
        for i, ((text, ids), r) in enumerate(zip(encoded, res)):
            toks, reason, out_text = r.token_ids, r.finish_reason, self.decode(r.token_ids)
            if stops and self.tokenizer is not None:  # stop strings cut the finished output
                asm = TextAssembler(self.decode, stops)
                asm.push(toks)
                if asm.stopped:
                    toks, reason = toks[:stop_prefix(toks, self.decode, stops)], "stop"
                asm.finish()
                out_text = asm.text
            outs.append(RequestOutput(f"ref-{i}", text, ids, [CompletionOutput(0, out_text, toks, reason)], True,
                                      r.metrics(len(ids), len(toks))))
        return outs

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([messages], params)[0]

    def prepare_params(self, sp: SamplingParams) -> SamplingParams:
        """Text-level fields to token ids: `suffix` becomes `suffix_token_ids` (ValueError when invalid)."""
        if sp.suffix is None:
            return sp
        sp.validate(self.model.config.vocab_size)
        if self.tokenizer is None:
            raise ValueError(f"invalid suffix={sp.suffix!r}: {self.path} has no tokenizer.json (pass suffix_token_ids)")
        return replace(sp, suffix=None, suffix_token_ids=self.tokenizer.encode(sp.suffix))

    @staticmethod
    def _normalise(prompts, params) -> tuple[list[Prompt], list[SamplingParams]]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)
                                                and "role" in prompts[0]):
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
