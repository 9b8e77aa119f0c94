"""The offline Python API, following vLLM: `LLM(model=PATH).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch

from .checkpoint import load_generation_config, load_model
from .engine import Engine, Event, reference_generate
from .sampler import SamplingParams, resolve
from .tokenizer import Tokenizer

Prompt = Union[str, list[dict[str, Any]], dict[str, Any]]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


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


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


class LLM:
    """A DiffusionGemma checkpoint ready to generate: model + tokenizer (optional) + engine.

    `model`: a checkpoint directory in the HF format. `dtype`: "float32" (default) or "bfloat16".
    `max_batch`: rows generated together; `max_model_len`: context length the cache is sized for.
    """

    def __init__(self, model: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                 max_batch: int = 8, max_model_len: int | None = None, prefill_chunk: int = 1024):
        self.path = Path(model)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = load_model(self.path, dtype=self.dtype, device=self.device)
        self.generation_config = load_generation_config(self.path)
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.engine = Engine(self.model, self.generation_config, max_batch=max_batch, max_model_len=max_model_len,
                             prefill_chunk=prefill_chunk)

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
    def generate_stream(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                        stream_drafts: bool = False) -> Iterator[StreamDelta]:
        """Stream deltas for several prompts at once (batched by the engine)."""
        plist, params_list = self._normalise(prompts, params)
        encoded = [self.encode_prompt(p) for p in plist]
        ids: dict[str, int] = {}
        try:
            for i, ((_, toks), sp) in enumerate(zip(encoded, params_list)):
                ids[self.engine.add_request(toks, sp, stream_drafts=stream_drafts)] = i
        except ValueError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        state = {rid: {"tokens": [], "text": "", "stopped": False} for rid in ids}
        try:
            while any(not s["stopped"] for s in state.values()):
                if not self.engine.has_unfinished():
                    break
                for ev in self.engine.step():
                    if ev.request_id not in ids:
                        continue
                    yield from self._on_event(ev, ids[ev.request_id], params_list[ids[ev.request_id]], state)
        finally:  # a consumer that stops early (or a disconnect) frees the rows
            for rid, s in state.items():
                if not s["stopped"]:
                    self.engine.abort(rid)

    def _on_event(self, ev: Event, index: int, sp: SamplingParams, state: dict) -> Iterator[StreamDelta]:
        s = state[ev.request_id]
        if s["stopped"]:
            return
        if ev.kind == "draft":
            yield StreamDelta(index, ev.request_id, draft_token_ids=ev.token_ids)
        elif ev.kind == "tokens":
            s["tokens"].extend(ev.token_ids)
            text = self.decode(s["tokens"])
            hit = self._find_stop(text, sp.stop)
            if hit is not None:
                # Keep the shortest token prefix whose text reaches the stop string; the text ends before it.
                cut = next(k for k in range(1, len(s["tokens"]) + 1)
                           if self._find_stop(self.decode(s["tokens"][:k]), sp.stop) is not None)
                new_ids = s["tokens"][len(s["tokens"]) - len(ev.token_ids):cut]
                s["tokens"] = s["tokens"][:cut]
                self.engine.abort(ev.request_id)
                s["stopped"] = True
                yield StreamDelta(index, ev.request_id, text[len(s["text"]):hit], new_ids, finished=True,
                                  finish_reason="stop", metrics={"completion_tokens": len(s["tokens"])})
                return
            delta, s["text"] = text[len(s["text"]):], text
            yield StreamDelta(index, ev.request_id, delta, ev.token_ids)
        elif ev.kind == "finished":
            s["stopped"] = True
            yield StreamDelta(index, ev.request_id, finished=True, finish_reason=ev.finish_reason, metrics=ev.metrics)

    @staticmethod
    def _find_stop(text: str, stops: list[str]) -> int | None:
        found = [text.find(x) for x in stops if x in text]
        return min(found) if found else None

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 reference_sampling: bool = False) -> list[RequestOutput]:
        """Generate for each prompt; returns one RequestOutput per prompt, in order.

        `reference_sampling=True` runs transformers' exact algorithm and random-number order (one left-padded
        batch, every row at every step): with the same seed on CPU in float32 it reproduces `model.generate`.
        """
        plist, params_list = self._normalise(prompts, params)
        encoded = [self.encode_prompt(p) for p in plist]
        if reference_sampling:
            return self._generate_reference(encoded, params_list)
        t0 = time.perf_counter()
        results: dict[int, dict[str, Any]] = {i: {"tokens": [], "reason": None, "metrics": {}, "id": ""}
                                              for i in range(len(plist))}
        for d in self.generate_stream(plist, params_list):
            r = results[d.index]
            r["id"] = d.request_id
            r["tokens"].extend(d.token_ids)
            if d.finished:
                r["reason"] = d.finish_reason
                r["metrics"] = dict(d.metrics)
        outs = []
        for i, (text, ids) in enumerate(encoded):
            r = results[i]
            m = r["metrics"]
            m.setdefault("completion_tokens", len(r["tokens"]))
            m["wall_s"] = time.perf_counter() - t0
            outs.append(RequestOutput(r["id"], text, ids, [CompletionOutput(0, self.decode(r["tokens"]), r["tokens"],
                                                                           r["reason"])], True, m))
        return outs

    def _generate_reference(self, encoded, params_list) -> list[RequestOutput]:
        sp = params_list[0]
        if any(p != sp for p in params_list):
            raise ValueError("reference_sampling needs the same SamplingParams for every prompt (one batch)")
        sp = resolve(sp.validate(self.model.config.vocab_size), self.generation_config)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(sp.seed if sp.seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item()))
        pad = self.model.config.text.pad_token_id or 0
        t0 = time.perf_counter()
        res = reference_generate(self.model, [ids for _, ids in encoded], sp, pad,
                                 sorted(self.engine.eos | set(sp.stop_token_ids)), gen)
        wall = time.perf_counter() - t0
        return [RequestOutput(f"ref-{i}", text, ids,
                              [CompletionOutput(0, self.decode(toks), toks, reason)],
                              True, {"completion_tokens": len(toks), "decoder_passes": passes,
                                     "tokens_per_forward": len(toks) / passes if passes else 0.0, "wall_s": wall})
                for i, ((text, ids), (toks, reason, passes)) in enumerate(zip(encoded, res))]

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([messages], params)[0]

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
