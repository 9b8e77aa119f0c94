"""Tensor parallelism (dgemma/parallel): a model split over 2 ranks (gloo on the CPU) computes what it computes whole.

The model: sliding and full layers (the full layer has 1 KV head, fewer than the ranks: it is replicated), experts
split unevenly (5: 3 + 2), a vocabulary and a dense width that 2 does not divide (129: 65 + 64; 67: 34 + 33).
Each rank loads only its shard from the checkpoint; rank 0 compares every pass with the whole model, in float32,
within LOGIT_TOL (the shards sum their partial products in another order: rounding, nothing more).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from dgemma import DiffusionGemma, save_model
from dgemma.engine.sampler import draw_uniforms, rule_ids, sample_step
from dgemma.model.checkpoint import load_model
from dgemma.model.config import tiny_config
from dgemma.parallel import ShardError
from dgemma.parallel.comm import connect, disconnect
from dgemma.parallel.load import load_shard
from dgemma.parallel.plan import Plan, check, span
from dgemma.parallel.sampler import ShardSampler

LOGIT_TOL = 1e-5  # float32 logits (|logit| < 30): TP=2 against TP=1
WORLD = 2


def uneven_config(**over):
    """Sliding + full layers, 1 full KV head, 5 experts, a vocabulary of 129 and a dense width of 67."""
    kw = dict(
        vocab_size=129,
        intermediate_size=67,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        num_experts=5,
        top_k_experts=2,
        canvas_length=8,
        sliding_window=6,
    )
    kw.update(over)
    return tiny_config(**kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp") / "model"
    torch.manual_seed(0)
    model = DiffusionGemma(uneven_config())
    model.reset_parameters(std=0.1)  # activations well away from zero: the comparison means something
    save_model(model, d)
    return d


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """A checkpoint saved in FP8 (widths multiples of 16, as FP8 matmuls want them, per rank too)."""
    from dgemma.model.quant import quantize_fp8

    torch.manual_seed(0)
    text = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, head_dim=16, global_head_dim=32)
    model = DiffusionGemma(uneven_config(vocab_size=160, **text))
    model.reset_parameters(std=0.1)
    return save_model(quantize_fp8(model.to(torch.bfloat16)), tmp_path_factory.mktemp("tp-fp8"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the plan (no processes) -----------------------------------------------------------------------------------------
def test_spans_cover_unevenly():
    assert [span(129, 2, r) for r in range(2)] == [(0, 65), (65, 129)]
    assert [span(5, 3, r) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]


def test_plan_replicates_kv_heads_where_fewer_than_ranks():
    text = uneven_config().text  # 4 query heads; sliding layers 2 KV heads, the full layer 1
    p0, p1 = Plan(text, 0, 2), Plan(text, 1, 2)
    assert (p0.q_heads, p1.q_heads) == ((0, 2), (2, 4))
    assert (p0.kv_heads(0), p1.kv_heads(0)) == ((0, 1), (1, 2))  # sliding: one KV head each
    assert (p0.kv_heads(2), p1.kv_heads(2)) == ((0, 1), (0, 1))  # full: the one KV head on both ranks
    local = p1.local_text()
    assert (local.num_attention_heads, local.layer_kv_heads(0), local.layer_kv_heads(2)) == (2, 1, 1)
    assert p1.slice_of("layers.2.self_attn.q_proj.weight") == (0, 2 * 16, 4 * 16)
    assert p1.slice_of("layers.2.self_attn.k_proj.weight") == (0, 0, 16)
    assert p1.slice_of("layers.0.self_attn.o_proj.weight") == (1, 16, 32)
    assert p1.slice_of("layers.0.experts.down_proj") == (0, 3, 5)
    assert p1.slice_of("embed_tokens.weight") == (0, 65, 129)
    assert p1.slice_of("layers.0.router.proj.weight") is None


def test_a_model_that_cannot_split_says_why_in_one_line():
    text = uneven_config().text
    with pytest.raises(ShardError, match="does not divide the model's 4 attention heads") as e:
        check(text, 3)
    assert "\n" not in str(e.value)
    with pytest.raises(ShardError, match="exceeds the model's 5 experts"):
        check(uneven_config(num_attention_heads=8, num_key_value_heads=8, num_global_key_value_heads=8).text, 8)


# -- logits parity (2 processes) -------------------------------------------------------------------------------------
def _inputs(cfg, B: int = 2, T: int = 11):
    g = torch.Generator().manual_seed(1)
    V, C = cfg.text.vocab_size, cfg.canvas_length
    prompt = torch.randint(0, V, (B, T), generator=g)
    canvas = torch.randint(0, V, (B, C), generator=g)
    probs = torch.randn(B, C, V, generator=g).mul(3).softmax(-1)
    return prompt, canvas, probs


def _passes(model, prompt, canvas, probs_part, reduce):
    """Encode a prompt (past the sliding window), then a denoising pass self-conditioned on `probs_part`; the LM head
    of both. `reduce` sums the partial soft embeddings (the identity for the whole model)."""
    cache = model.new_cache(prompt.shape[0], 64, slack=canvas.shape[1])
    enc = model.logits(model.encode(prompt, cache))
    soft = reduce(model.soft_embedding(probs_part))
    dec = model.logits(model.denoise(canvas, cache, soft=soft, hidden_only=True))
    return enc, dec, soft


def _fp8_parity(rank: int, comm, path: str) -> None:
    """An FP8 checkpoint's shards hold exactly their slices of the whole model's FP8 weights and scales; the logits
    agree within FP8's own noise (a row-parallel rank quantizes each token over its columns only)."""
    from dgemma.model.quant import FP8

    shard = load_shard(path, rank, WORLD, comm, dtype=torch.bfloat16)
    plan = Plan(shard.config.text, rank, WORLD)
    whole = load_model(path, dtype=torch.bfloat16)
    full = whole.state_dict()
    assert shard.layers[0].self_attn.q_proj.weight.dtype == FP8
    for name, t in shard.state_dict().items():
        key = name.replace(".inner.", ".")
        part, ref = plan.slice_of(key), full[key]
        ref = ref if part is None else ref.narrow(part[0], part[1], part[2] - part[1])
        bits = (lambda x: x.view(torch.uint8)) if t.dtype == FP8 else (lambda x: x)
        assert t.dtype == ref.dtype and torch.equal(bits(t), bits(ref)), name
    prompt, canvas, probs = _inputs(shard.config)
    a, b = plan.vocab
    with torch.no_grad():
        enc, dec, _ = _passes(shard, prompt, canvas, probs[..., a:b], comm.all_reduce)
        enc, dec = comm.gather(enc, plan.vocab_sizes), comm.gather(dec, plan.vocab_sizes)
    if rank == 0:
        with torch.no_grad():
            want = _passes(whole, prompt, canvas, probs, lambda t: t)
        for got, ref in ((enc, want[0]), (dec, want[1])):
            rel = float((got - ref).norm() / ref.norm())
            assert rel < 0.3, rel  # FP8 against bf16 differs as much (test_quant: 0.16 measured on its model)


def _parity_rank(rank: int, port: int, path: str, fp8_path: str) -> None:
    torch.set_num_threads(1)
    comm = connect(rank, WORLD, torch.device("cpu"), f"tcp://127.0.0.1:{port}")
    try:
        shard = load_shard(path, rank, WORLD, comm)
        plan = Plan(shard.config.text, rank, WORLD)
        prompt, canvas, probs = _inputs(shard.config)
        a, b = plan.vocab
        with torch.no_grad():
            enc, dec, soft = _passes(shard, prompt, canvas, probs[..., a:b], comm.all_reduce)
            enc, dec = comm.gather(enc, plan.vocab_sizes), comm.gather(dec, plan.vocab_sizes)
            _sampler_parity(shard, comm, dec, plan) if rank == 0 else _sampler_parity(shard, comm, None, plan)
        if rank == 0:
            whole = load_model(path)
            with torch.no_grad():
                want = _passes(whole, prompt, canvas, probs, lambda t: t)
            for got, ref, what in zip((enc, dec, soft), want, ("encode", "denoise", "soft embedding")):
                err = (got - ref).abs().max().item()
                assert err < LOGIT_TOL, f"{what}: TP=2 differs from TP=1 by {err}"
            assert enc.shape[-1] == 129 and ref.abs().max() > 0.5
        _fp8_parity(rank, comm, fp8_path)
    finally:
        disconnect()


def _sampler_parity(shard, comm, full_logits, plan) -> None:
    """The sharded sampler against `sample_step` on the same logits (rank 0's gathered ones, broadcast)."""
    cfg = shard.config
    B, C, V = 2, cfg.canvas_length, cfg.vocab_size
    logits = comm.broadcast(full_logits.clone() if full_logits is not None else torch.empty(B, C, V))
    logits[0, 0, 70] = logits[0, 0, 3] = 40.0  # a tie across the shards: the first index wins, as x.max() picks it
    a, b = plan.vocab
    u = draw_uniforms([torch.Generator().manual_seed(s) for s in range(B)], C, "cpu")
    temp, bound = torch.tensor([0.8, 0.5]), torch.tensor([0.1, 0.3])
    rule = rule_ids(["entropy_bound", "confidence"])
    canvas = torch.zeros(B, C, dtype=torch.long)
    got = ShardSampler(comm, a, plan.vocab_sizes)(logits[..., a:b].clone(), canvas, temp, bound, rule, u, V)
    want = sample_step(logits.clone(), canvas, temp, bound, rule, u, V)
    assert torch.equal(got.argmax, want.argmax) and int(got.argmax[0, 0]) == 3
    assert torch.allclose(got.mean_entropy, want.mean_entropy, atol=1e-6)
    assert torch.equal(got.accepted, want.accepted)
    assert (got.probs - want.probs[..., a:b]).abs().max() < 1e-6
    assert torch.equal(got.canvas, want.canvas)  # draws: the same ids (no uniform this close to a CDF boundary)


def test_tp2_logits_equal_tp1(ckpt, fp8_ckpt):
    mp.spawn(_parity_rank, args=(free_port(), str(ckpt), str(fp8_ckpt)), nprocs=WORLD)


# -- tokens through the engine: LLM(tensor_parallel_size=2) against LLM ---------------------------------------------
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}}, "required": ["n"]}
PEAK = 1e4  # the final norm's weights times this: logits ~1e4 apart, far past any rounding between TP=1 and TP=2


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A model with a tokenizer whose logits have no near-ties (no soft-cap; the final norm scaled by PEAK), so that
    rounding (1e-6 relative) cannot move a sampling decision: TP=1 and TP=2 must pick the same tokens."""
    from bpe import build_bpe_tokenizer

    d = tmp_path_factory.mktemp("tp-tokens") / "model"
    build_bpe_tokenizer(d, 300)
    torch.manual_seed(0)
    cfg = uneven_config(
        vocab_size=301, canvas_length=16, final_logit_softcapping=None, pad_token_id=0, eos_token_id=1, bos_token_id=2
    )
    model = DiffusionGemma(cfg)
    model.reset_parameters(std=0.1)
    with torch.no_grad():
        model.norm.weight.mul_(PEAK)
    save_model(model, d, tokenizer_dir=d)
    return d


@pytest.fixture(scope="module")
def pair(peaked):
    from dgemma.entrypoints.llm import LLM

    one = LLM(peaked, device="cpu", dtype="float32", max_batch=4, max_model_len=128)
    two = LLM(peaked, device="cpu", dtype="float32", max_batch=4, max_model_len=128, tensor_parallel_size=WORLD)
    yield one, two
    two.close()


def _same(a, b):
    assert [[o.token_ids for o in r.outputs] for r in a] == [[o.token_ids for o in r.outputs] for r in b]
    assert all(o.token_ids for r in a for o in r.outputs)


def test_tp2_diffusion_tokens_equal_tp1(pair):
    from dgemma.engine.params import SamplingParams

    prompts = ["hello world", "the quick brown fox", "a", "data"]
    params = [
        SamplingParams(max_new_tokens=40, seed=1, ignore_eos=True),  # three canvases: commits between them
        SamplingParams(max_new_tokens=20, seed=2, ignore_eos=True, template=[40, -1, 41, -1, 42]),
        SamplingParams(max_new_tokens=12, seed=3, suffix=" end"),  # infilling
        SamplingParams(max_new_tokens=16, seed=4, acceptance="confidence", entropy_bound=0.5),
    ]
    _same(*(llm.generate(prompts, params) for llm in pair))


def test_tp2_ar_tokens_equal_tp1(pair):
    from dgemma.engine.params import SamplingParams

    params = [SamplingParams(mode="ar", max_new_tokens=12, seed=5, temperature=0.7, ignore_eos=True, logprobs=2)]
    params.append(SamplingParams(mode="ar", max_new_tokens=12, temperature=0.0, ignore_eos=True))
    a, b = (llm.generate(["hello world", "city"], params) for llm in pair)
    _same(a, b)
    got, want = b[0].outputs[0].logprobs, a[0].outputs[0].logprobs
    assert [e.top[0][0] for e in got] == [e.top[0][0] for e in want]
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-3)


def test_tp2_constrained_json_and_n2_equal_tp1(pair):
    import json

    from dgemma.engine.params import SamplingParams

    params = [
        SamplingParams(max_new_tokens=48, seed=6, json_schema=SCHEMA),
        SamplingParams(max_new_tokens=20, seed=7, n=2, ignore_eos=True, logprobs=1),
    ]
    a, b = (llm.generate(["name", "value"], params) for llm in pair)
    _same(a, b)
    assert json.loads(b[0].outputs[0].text)["n"] is not None and len(b[1].outputs) == 2
    for x, y in zip(a[1].outputs, b[1].outputs):  # a committed canvas's log-probabilities, gathered on rank 0
        assert [e.logprob for e in y.logprobs] == pytest.approx([e.logprob for e in x.logprobs], abs=1e-3)


def test_tp2_prompt_logprobs_equal_tp1(pair):
    from dgemma.engine.params import SamplingParams

    sp = SamplingParams(max_new_tokens=4, seed=8, prompt_logprobs=2)
    a, b = (llm.generate(["the quick brown fox jumps"], sp)[0].prompt_logprobs for llm in pair)
    assert b[0] is None and [e.token_id for e in b[1:]] == [e.token_id for e in a[1:]]
    assert [e.logprob for e in b[1:]] == pytest.approx([e.logprob for e in a[1:]], rel=1e-4, abs=1e-2)


def test_cli_generate_at_tp2(pair, peaked, capsys):
    import json
    import subprocess
    import sys

    from dgemma.engine.params import SamplingParams

    cmd = [sys.executable, "-m", "dgemma.entrypoints.cli", "generate", "-m", str(peaked), "-p", "hello world"]
    cmd += ["--max-new-tokens", "20", "--seed", "3", "--ignore-eos", "--json", "--dtype", "float32", "--device", "cpu"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*cmd, "--tensor-parallel-size", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tensor parallel over 2 ranks (gloo)" in out.stderr
    want = pair[0].generate("hello world", SamplingParams(max_new_tokens=20, seed=3, ignore_eos=True))
    assert json.loads(out.stdout)["token_ids"] == want[0].outputs[0].token_ids
    from dgemma.entrypoints.cli import main

    capsys.readouterr()
    assert main([*cmd[3:], "-tp", "3"]) == 2  # refused before any process starts
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not divide the model's 4 attention heads" in err[-1] and len(err) <= 2  # no traceback


def test_chat_and_serve_take_the_flag(capsys):
    from dgemma.entrypoints.cli import main

    for command in ("chat", "serve"):
        try:
            assert main([command, "--help"]) == 0
        except SystemExit as e:
            assert e.code == 0
        assert "--tensor-parallel-size" in capsys.readouterr().out


def test_tp2_static_buffers_equal_tp1(pair):
    """The steps from static bucket-padded buffers (graphs.py; captured as CUDA graphs on CUDA, where they are the
    default): 3 rows padded to bucket 4, a constrained and an infilling row among them. (Near the end: both LLMs get
    new engines; the tensor-parallel group serves the newest, and the old engine refuses to run.)"""
    from dgemma.engine.core import Engine
    from dgemma.engine.params import SamplingParams

    params = [
        SamplingParams(max_new_tokens=24, seed=1, ignore_eos=True),
        SamplingParams(max_new_tokens=48, seed=6, json_schema=SCHEMA),
        SamplingParams(max_new_tokens=12, seed=3, suffix=" end"),
    ]
    outs = []
    for llm in pair:
        old = llm.engine
        eng = Engine(llm.model, llm.generation_config, 4, 128, guides=old.guides, graphs=True, parallel=llm.parallel)
        llm.engine = eng  # (requests are still validated by the old engine: the same limits)
        outs.append([o.outputs[0].token_ids for o in llm.generate(["hello world", "name", "a"], params)])
        assert ("denoise", 4) in eng.graphs._graphs
    assert outs[0] == outs[1]
    with pytest.raises(RuntimeError, match="a newer engine runs on this tensor-parallel group"):
        old.step() if old.add_request([5, 6], SamplingParams(max_new_tokens=4)) else None


def test_a_dead_worker_makes_the_next_call_raise(pair):
    """(last: it ends the module's tensor-parallel LLM) A killed worker is noticed within a poll, not a timeout."""
    import time

    from dgemma.parallel import WorkerFailure

    two = pair[1]
    two.parallel.procs[0].kill()
    deadline = time.time() + 10
    while two.failure is None and time.time() < deadline:
        time.sleep(0.05)
    assert two.failure is not None and "worker 1 exited" in two.failure
    with pytest.raises(WorkerFailure, match="worker 1 exited"):
        two.generate("hello", __import__("dgemma").SamplingParams(max_new_tokens=4))
