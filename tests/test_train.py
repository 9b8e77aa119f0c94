"""Fine-tuning (`dgemma/training/`): the objective against transformers and by hand, corruption statistics,
optimisation, resume, LoRA, bf16, data-parallel torchrun, and the `dgemma train` command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dgemma import DiffusionGemma, save_model
from dgemma.model.checkpoint import load_model
from dgemma.entrypoints.cli import main as cli_main
from dgemma.model.config import tiny_config
from dgemma.training.checkpoints import latest_checkpoint
from dgemma.training.config import TrainConfig, TrainError
from dgemma.training.data import Example, collate, corrupt, load_examples
from dgemma.training.objectives import counts, loss_parts
from dgemma.training.trainer import Trainer, lr_at

from oracle import build_hf, hf_logits

V = 40


def _model(seed: int = 0, **over) -> DiffusionGemma:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, canvas_length=8, sliding_window=8, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    cfg.update(over)
    m = DiffusionGemma(tiny_config(**cfg))
    m.reset_parameters(0.2)  # larger weights than the default init, so losses and gradients are far from trivial
    return m


def _examples(n: int = 16, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, V, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(3, V, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        out.append(Example([2] + p, r))
    return out


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- the objective ------------------------------------------------------------------------------------------------
def test_collate_cuts_response_plus_eos_into_canvases():
    b = collate(
        [Example([2, 5], [7] * 8), Example([2, 5, 6], [9, 9])], canvas_length=4, pad_id=0, eos_id=1, vocab_size=V
    )
    assert b.canvases.shape == (2, 3, 4)  # 8 tokens + EOS need 3 canvases of 4
    assert b.canvases[0].flatten().tolist() == [7] * 8 + [1, 0, 0, 0]
    assert b.canvases[1].flatten().tolist() == [9, 9, 1, 0] + [0] * 8
    # Supervised: whole canvases up to the one holding EOS (pads after EOS included); later canvases not.
    assert b.supervised[0].flatten().tolist() == [True] * 12
    assert b.supervised[1].flatten().tolist() == [True] * 4 + [False] * 8
    assert b.prompt_len.tolist() == [2, 3]
    with pytest.raises(TrainError, match="outside the vocabulary"):
        collate([Example([2, 500], [3])], 4, 0, 1, V)
    with pytest.raises(TrainError, match="empty prompt"):
        collate([Example([], [3])], 4, 0, 1, V)


def test_corruption_rate_matches_t():
    """Each supervised position is replaced by a uniform token with probability t (so it changes with probability
    t (V-1)/V); unsupervised positions never change."""
    C = 2048
    ex = [Example([2], [5] * (C - 1)) for _ in range(24)] + [Example([2], [5] * 10)]
    b = collate(ex, C, 0, 1, V)
    cfg = TrainConfig(eps=1e-3)
    g = torch.Generator().manual_seed(0)
    b = corrupt(b, V, cfg, g)
    assert b.t is not None and bool(((b.t >= cfg.eps) & (b.t <= 1)).all())
    changed = (b.noisy != b.canvases) & b.supervised
    frac = changed[:24].reshape(24, -1).float().mean(-1)
    expected = b.t[:24] * (V - 1) / V
    assert float((frac - expected).abs().max()) < 0.04
    assert float(torch.corrcoef(torch.stack([frac, expected]))[0, 1]) > 0.99
    assert bool((b.noisy[~b.supervised] == b.canvases[~b.supervised]).all())
    # t spreads over (eps, 1): a broken sampler (e.g. constant t) fails this
    many = corrupt(collate(ex * 20, C, 0, 1, V), V, cfg, torch.Generator().manual_seed(1)).t
    assert abs(float(many.mean()) - 0.5) < 0.08 and float(many.std()) > 0.2


def test_fixed_positions_stay_clean_with_template_prob():
    """Positions a template will fix at inference are left uncorrupted in a `template_prob` share of examples."""
    C = 512
    ex = [Example([2], [5] * (C - 1), fixed=list(range(0, C, 2))) for _ in range(64)]
    for prob, lo, hi in ((1.0, 64, 64), (0.0, 0, 0), (0.5, 16, 48)):
        b = corrupt(collate(ex, C, 0, 1, V), V, TrainConfig(template_prob=prob), torch.Generator().manual_seed(0))
        noisy = b.t > 0.05  # rows where an uncorrupted half would be a coincidence
        even_changed = (b.noisy != b.canvases)[:, 0, 0::2].float().mean(-1)
        clean_rows = int(((even_changed == 0) & noisy).sum())
        n = int(noisy.sum())
        assert lo * n // 64 <= clean_rows <= -(-hi * n // 64), (prob, clean_rows, n)
        odd_changed = (b.noisy != b.canvases)[:, 0, 1::2].float().mean(-1)
        assert float((odd_changed - b.t * (V - 1) / V).abs().max()) < 0.1  # the free half is corrupted as usual
    with pytest.raises(TrainError, match="fixed positions"):
        collate([Example([2], [5], fixed=[7])], 8, 0, 1, V)


def test_loss_by_hand_on_a_zero_model():
    """With all weights zero the logits are all zero: every cross-entropy is exactly log V."""
    m = _model()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    cfg = TrainConfig(self_cond_prob=1.0)
    b = corrupt(collate(_examples(4), 8, 0, 1, V), V, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        parts = loss_parts(m, b, cfg)
    assert parts.diffusion_count == int(b.supervised.sum())
    assert math.isclose(float(parts.diffusion_sum) / parts.diffusion_count, math.log(V), rel_tol=1e-6)
    assert math.isclose(float(parts.ar_sum) / parts.ar_count, math.log(V), rel_tol=1e-6)
    # AR targets: every prompt token but the first, every response token, EOS and the pads of its last canvas
    assert parts.ar_count == sum(len(e.prompt) - 1 for e in _examples(4)) + int(b.supervised.sum())


def test_ar_weight_zero_skips_the_clean_canvas_pass():
    """ar_weight 0: the same diffusion loss, no next-token loss, and one encoder pass fewer (the last clean canvas
    feeds nothing); the earlier canvases of a multi-canvas example are still encoded as context."""
    m = _model()
    ex = _examples(4) + [Example([2, 5, 6], list(range(3, 3 + 20)))]  # the last one spans 3 canvases
    calls = []
    orig = m.encode
    m.encode = lambda *a, **k: (calls.append(a[0].shape[1]), orig(*a, **k))[1]
    out = {}
    for w in (1.0, 0.0):
        cfg = TrainConfig(self_cond_prob=0.5, ar_weight=w)
        b = corrupt(collate(ex, 8, 0, 1, V), V, cfg, torch.Generator().manual_seed(0))
        calls.clear()
        with torch.no_grad():
            out[w] = (loss_parts(m, b, cfg), list(calls))
    (full, n_full), (skip, n_skip) = out[1.0], out[0.0]
    assert torch.equal(full.diffusion_sum, skip.diffusion_sum) and full.diffusion_count == skip.diffusion_count
    assert skip.ar_count == 0 and float(skip.ar_sum) == 0.0 and full.ar_count > 0
    assert counts(b, TrainConfig(ar_weight=0.0))[1] == 0 and counts(b, TrainConfig())[1] == full.ar_count
    assert len(n_full) == 1 + 3 and len(n_skip) == 1 + 2  # prompt + clean canvases (the last one skipped)


def test_ar_weight_zero_trains_and_logs_no_ar_loss(tmp_path):
    m = _model()
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, ar_weight=0.0, log_every=1)
    tr = Trainer(m, _examples(8), cfg, tmp_path / "out")
    rec = tr.train_step()
    assert rec["ar_loss"] is None and rec["loss"] == rec["diffusion_loss"] > 0
    tr.train(progress=False)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [e["ar_loss"] for e in log] == [None] and log[0]["diffusion_loss"] > 0


def test_batches_move_to_the_model_device(monkeypatch):
    """Training collates on the CPU and moves each micro-batch to the model's device; the default device is this
    process's GPU when there is one (under torchrun, the LOCAL_RANK-th)."""
    from dgemma.training.distributed import default_device

    b = corrupt(collate(_examples(3), 8, 0, 1, V), V, TrainConfig(), torch.Generator().manual_seed(0))
    moved = b.to(torch.device("meta"))
    for name in ("prompt", "prompt_len", "canvases", "supervised", "noisy", "self_cond", "t"):
        assert getattr(moved, name).device.type == "meta" and getattr(b, name).device.type == "cpu"
        assert getattr(moved, name).shape == getattr(b, name).shape
    assert moved.fixed is None
    assert default_device() == ("cuda:0" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() == "cuda:1"


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """transformers' DiffusionGemma and the same weights loaded by dgemma."""
    from dgemma.model.checkpoint import load_model as dg_load

    from test_modeling import tie_encoder_copies  # the HF oracle with encoder/decoder copies tied

    hf = tie_encoder_copies(build_hf(seed=5, canvas_length=8))
    d = tmp_path_factory.mktemp("hf") / "ckpt"
    hf.save_pretrained(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = dg_load(d)
    return hf, ours


@pytest.mark.parametrize("self_cond", [False, True])
def test_loss_matches_transformers(hf_pair, self_cond):
    """Our training loss (diffusion CE + encoder AR CE) equals one computed from transformers' forward passes."""
    hf, ours = hf_pair
    C = 8
    g = torch.Generator().manual_seed(3)
    B, P = 3, 5
    prompt = torch.randint(3, 96, (B, P), generator=g)
    resp = torch.randint(3, 96, (B, C - 1), generator=g)
    ex = [Example(prompt[i].tolist(), resp[i].tolist()) for i in range(B)]
    cfg = TrainConfig(self_cond_prob=0.5 if self_cond else 0.0)
    b = corrupt(collate(ex, C, 0, 1, 96), 96, cfg, g)
    if self_cond:
        b.self_cond = torch.tensor([True, False, True])
    parts = loss_parts(ours, b, cfg)
    noisy, clean = b.noisy[:, 0], b.canvases[:, 0]
    with torch.no_grad():
        sc_kwargs = {}
        if self_cond:
            first = hf(input_ids=prompt, decoder_input_ids=noisy).logits
            sc_kwargs = dict(self_conditioning_logits=first, self_conditioning_mask=b.self_cond)
        logits = hf(input_ids=prompt, decoder_input_ids=noisy, **sc_kwargs).logits  # (B, C, V)
        diff = F.cross_entropy(logits.reshape(-1, 96), clean.reshape(-1), reduction="sum")
        seq = torch.cat([prompt, clean], dim=1)
        enc = hf(input_ids=seq, decoder_input_ids=noisy).encoder_last_hidden_state
        ar_logits = hf_logits(hf, enc)[:, :-1]
        ar = F.cross_entropy(ar_logits.reshape(-1, 96), seq[:, 1:].reshape(-1), reduction="sum")
    assert parts.diffusion_count == B * C and parts.ar_count == B * (P + C - 1)
    assert abs(parts.diffusion_sum.item() - float(diff)) < 1e-3 * max(1.0, float(diff))
    assert abs(parts.ar_sum.item() - float(ar)) < 1e-3 * max(1.0, float(ar))


def test_multi_canvas_targets_are_block_causal():
    """Canvas k's loss must not depend on later canvases (it sees only prompt + clean canvases < k)."""
    m = _model()
    cfg = TrainConfig(self_cond_prob=0.0, objective="diffusion")
    ex = [Example([2, 5, 6], list(range(3, 3 + 20)))]
    b = corrupt(collate(ex, 8, 0, 1, V), V, cfg, torch.Generator().manual_seed(0))
    # Only canvas 0 supervised vs all: the loss of canvas 0 is the same whatever canvases 1-2 hold.
    b0 = corrupt(collate(ex, 8, 0, 1, V), V, cfg, torch.Generator().manual_seed(0))
    b0.canvases[:, 1:] = torch.randint(3, V, b0.canvases[:, 1:].shape)
    b0.noisy[:, 1:] = torch.randint(3, V, b0.noisy[:, 1:].shape)
    b.supervised[:, 1:] = False
    b0.supervised[:, 1:] = False
    with torch.no_grad():
        a = loss_parts(m, b, cfg).diffusion_sum
        c = loss_parts(m, b0, cfg).diffusion_sum
    assert torch.allclose(a, c, atol=1e-5)


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, final_lr_ratio=0.1)
    assert math.isclose(lr_at(0, cfg), 1e-4) and math.isclose(lr_at(9, cfg), 1e-3)
    assert math.isclose(lr_at(60, cfg), 0.55e-3, rel_tol=1e-6)
    assert math.isclose(lr_at(110, cfg), 1e-4, rel_tol=1e-6)


# -- optimisation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_one_step_reduces_loss_on_a_fixed_batch(tmp_path, objective):
    m = _model()
    cfg = TrainConfig(objective=objective, steps=10, batch_size=8, lr=3e-3, warmup_steps=1, self_cond_prob=0.5)
    tr = Trainer(m, _examples(8), cfg, tmp_path)
    batch = tr.global_batch(0)

    def total():
        with torch.no_grad():
            p = loss_parts(m, batch, cfg)
        ar = float(p.ar_sum) / p.ar_count
        return ar + (float(p.diffusion_sum) / p.diffusion_count if objective == "diffusion" else 0.0)

    before = total()
    for _ in range(3):
        tr.train_step()  # step 0 trains on exactly `batch` (same examples, same corruption)
        tr.step = 0
    assert total() < before - 0.05
    if objective == "ar":
        assert tr.train_step()["diffusion_loss"] is None


def test_diffusion_step_with_next_token_loss_when_the_canvas_fits_in_place(tmp_path):
    """A window wide enough for the cache's in-place canvas view (what inference uses): the training denoise pass
    must not write the noisy canvas into the cache's future slots, where the clean canvas's encoder pass (the
    next-token loss, the next canvas's context) overwrites what autograd saved. Several canvases per example."""
    m = _model(sliding_window=64)
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, ar_weight=1.0, self_cond_prob=0.5)
    ex = [Example([2, 5, 6], list(range(3, 3 + n))) for n in (9, 17, 12, 20)]  # 2-3 canvases of 8
    tr = Trainer(m, ex, cfg, tmp_path)
    before = _params(m)
    out = tr.train_step()
    assert out["diffusion_loss"] > 0 and out["ar_loss"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_training_learns_a_toy_copy_task(tmp_path):
    """A few dozen steps on a copy task cut the diffusion loss by a quarter or more."""
    m = _model(seed=1)
    m.reset_parameters()  # the default small init: trains fast
    ex = [
        Example([2] + p, p)
        for p in (torch.randint(3, V, (6,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(64))
    ]
    tr = Trainer(
        m, ex, TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, self_cond_prob=0.5, log_every=10), tmp_path
    )
    tr.train(progress=False)
    first, last = tr.log[0], tr.log[-1]
    assert last["diffusion_loss"] < 0.75 * first["diffusion_loss"]  # a step that does not learn stays flat
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") == 6
    assert (tmp_path / "loss.svg").read_text().startswith("<svg")
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = dict(steps=6, batch_size=4, lr=5e-3, warmup_steps=2, log_every=1)
    ex = _examples(10)
    a = Trainer(_model(), ex, TrainConfig(**cfg), tmp_path / "a")
    for _ in range(6):
        a.train_step()
    b = Trainer(_model(), ex, TrainConfig(**cfg, save_every=3), tmp_path / "b")
    for _ in range(3):
        b.train_step()
    ck = b.save()
    assert latest_checkpoint(tmp_path / "b") == ck
    # a fresh process would start from the initial checkpoint and resume from the newest checkpoint-N/
    c = Trainer(_model(seed=123), ex, TrainConfig(**cfg), tmp_path / "b")
    c.resume(ck)
    assert c.step == 3
    for _ in range(3):
        c.train_step()
    pa, pc = _params(a.model), _params(c.model)
    assert max(float((pa[k] - pc[k]).abs().max()) for k in pa) < 1e-6
    with pytest.raises(TrainError, match="batch_size"):
        Trainer(_model(), ex, TrainConfig(**{**cfg, "batch_size": 2}), tmp_path / "b").resume(ck)


def test_lora_trains_adapters_only_and_merges_on_save(tmp_path):
    m = _model()
    base = _params(m)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, lora_rank=4, lora_alpha=8.0)
    tr = Trainer(m, _examples(8), cfg, tmp_path)
    n_lora = sum(p.numel() for p in tr.trainable())
    assert 0 < n_lora < 0.5 * sum(p.numel() for p in m.parameters())
    for _ in range(3):
        tr.train_step()
    after = _params(m)
    assert all(torch.equal(base[k], after[k]) for k in base)  # frozen base
    # every adapter learned, q/k/v and gate/up included (a fused matmul over them would skip their hooks)
    assert all(b.abs().max() > 0 for b in tr.lora.B.values()), [k for k, b in tr.lora.B.items() if not b.any()]
    path = tr.save(final=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = load_model(path)
    tokens = torch.tensor([[2, 5, 6, 7]])
    canvas = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])

    def run(model):
        with torch.no_grad():
            cache = model.new_cache(1, 32)
            model.encode(tokens, cache)
            return model.denoise(canvas, cache)

    with_hooks = run(m)
    assert torch.allclose(run(merged), with_hooks, atol=1e-4)
    tr.lora.remove()
    assert not torch.allclose(run(m), with_hooks, atol=1e-3)  # the adapters did change the function
    # resuming restores the adapters from the train state
    tr2 = Trainer(_model(), _examples(8), cfg, tmp_path)
    tr2.resume(path)
    assert all(torch.equal(tr2.lora.B[k], tr.lora.B[k]) for k in tr.lora.B)


def test_bfloat16_autocast_trains(tmp_path):
    m = _model()
    tr = Trainer(m, _examples(8), TrainConfig(steps=2, batch_size=4, precision="bfloat16", warmup_steps=1), tmp_path)
    rec = tr.train_step()
    assert math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """Four micro-batches accumulate the gradient of the whole batch. Compared before the optimizer: Adam's first
    update is about lr * sign(g), so a parameter whose gradient is ~0 may move by +-lr on rounding alone (seen with
    AVX2 kernels), which says nothing about accumulation."""
    runs = []
    for accum in (1, 4):
        m = _model()
        tr = Trainer(m, _examples(8), TrainConfig(steps=2, batch_size=8, grad_accum=accum, warmup_steps=1), tmp_path)
        rec = tr.train_step()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        runs.append((rec, grads, _params(m)))
    (rec1, g1, p1), (rec4, g4, p4) = runs
    assert abs(rec1["loss"] - rec4["loss"]) < 1e-5
    assert g1.keys() == g4.keys() and g1
    scale = max(float(g.abs().max()) for g in g1.values())
    assert scale > 1e-3  # the gradients are not all ~0
    assert max(float((g1[k] - g4[k]).abs().max()) for k in g1) < 1e-5 * scale
    lr = TrainConfig().lr  # and the parameters moved alike: within a small fraction of one step
    assert max(float((p1[k] - p4[k]).abs().max()) for k in p1) < 0.1 * lr


def test_bad_configs_and_data(tmp_path):
    with pytest.raises(TrainError, match="objective"):
        TrainConfig(objective="mlm").validate()  # type: ignore[arg-type]
    with pytest.raises(TrainError, match="divisible"):
        Trainer(_model(), _examples(4), TrainConfig(batch_size=6, grad_accum=4), tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [2, 3], "completion_ids": [4]}\nnot json\n')
    with pytest.raises(TrainError, match=r"bad.jsonl:2: not JSON"):
        load_examples(bad, None)
    bad.write_text('{"prompt": "hi", "completion": "there"}\n')
    with pytest.raises(TrainError, match="tokenizer"):
        load_examples(bad, None)
    bad.write_text('{"prompt_ids": [2, "x"], "completion_ids": [4]}\n')
    with pytest.raises(TrainError, match="lists of integers"):
        load_examples(bad, None)
    bad.write_text('{"prompt_ids": [2], "completion_ids": [4, 5], "fixed": [0, 2]}\n')
    assert load_examples(bad, None)[0].fixed == [0, 2]  # position 2 is the EOS
    bad.write_text('{"prompt_ids": [2], "completion_ids": [4, 5], "fixed": [3]}\n')
    with pytest.raises(TrainError, match="'fixed'"):
        load_examples(bad, None)


# -- the command line and torchrun ----------------------------------------------------------------------------------
@pytest.fixture
def ckpt_and_data(tmp_path):
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from bpe import build_bpe_tokenizer

    d = tmp_path / "init"
    build_bpe_tokenizer(d, 300)
    torch.manual_seed(0)
    m = DiffusionGemma(tiny_config(vocab_size=300, canvas_length=8, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    save_model(m, d, tokenizer_dir=d)
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"count to {i}", "completion": " ".join(str(k) for k in range(i))} for i in range(1, 9)]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    rows.append({"prompt_ids": [2, 10, 11], "completion_ids": [12, 13]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, data


def test_train_cli_writes_checkpoints_and_resumes(ckpt_and_data, tmp_path, capsys):
    d, data = ckpt_and_data
    out = tmp_path / "out"
    args = [
        "train",
        "--model",
        str(d),
        "--data",
        str(data),
        "--output",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--save-every",
        "2",
        "--log-every",
        "1",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert cli_main(args) == 0
    assert (out / "final" / "tokenizer.json").is_file() and (out / "checkpoint-000002").is_dir()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_model(out / "final")  # the result is a loadable checkpoint
    # More steps: resumes from checkpoint-000002 rather than starting over.
    args[args.index("--steps") + 1] = "6"
    assert cli_main(args) == 0
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]  # the log file is appended; steps 3-4 were redone from the checkpoint
    capsys.readouterr()
    assert cli_main(["train", "--model", str(d), "--data", str(tmp_path / "missing.jsonl"), "--output", str(out)]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert cli_main(args + ["--device", "nonsense"]) == 2  # a clear error, not a traceback
    assert "invalid --device 'nonsense'" in capsys.readouterr().err


def _self_conditions(tr: Trainer, seed: int) -> list[bool]:
    """Whether the first global batch of `seed` self-conditions some row of each of two processes' halves."""
    tr.cfg.seed = seed
    sc = tr.global_batch(0).self_cond
    return [bool(sc[:2].any()), bool(sc[2:].any())]


def test_torchrun_two_processes_match_one(ckpt_and_data, tmp_path):
    """Data-parallel (gloo) over 2 processes computes the same losses and weights as 1 process, same global batch.
    The seed is one whose first batch self-conditions rows of the first process only: the self-conditioning MLP then
    has a gradient in one process and none in the other, which must still all-reduce alike."""
    d, data = ckpt_and_data
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    from dgemma.text.tokenizer import Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = Trainer(load_model(d), load_examples(data, Tokenizer.from_dir(d)), TrainConfig(batch_size=4), tmp_path)
    seed = next(s for s in range(100) if _self_conditions(tr, s) == [True, False])
    common = [
        "--model",
        str(d),
        "--data",
        str(data),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--quiet",
        "--threads",
        "1",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "1",
        "--precision",
        "float32",
        "--seed",
        str(seed),
    ]
    one = subprocess.run(
        [sys.executable, "-m", "dgemma.entrypoints.cli", "train", *common, "--output", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "-m",
            "dgemma.entrypoints.cli",
            "train",
            *common,
            "--output",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    la = [json.loads(line)["loss"] for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(line)["loss"] for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 3
    assert max(abs(a - b) for a, b in zip(la, lb)) < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wa, wb = load_model(tmp_path / "one" / "final"), load_model(tmp_path / "two" / "final")
        p0 = _params(load_model(d))
    pa, pb = _params(wa), _params(wb)
    # The same updates, up to rounding: Adam divides each gradient by its own running scale, so an element whose
    # gradient is a near-cancellation (rounded differently when summed over two processes) moves by a different
    # fraction of the learning rate: 1.7e-4 at most, measured (AVX2 kernels). Over all the updates together that is
    # 1e-4 to 2.4e-4 of their norm; a data-parallel bug (a shard's gradient alone, a wrong average) is O(1).
    da = torch.cat([(pa[k] - p0[k]).flatten() for k in pa])
    db = torch.cat([(pb[k] - p0[k]).flatten() for k in pa])
    assert float((da - db).norm() / da.norm()) < 1e-2


def test_activation_checkpointing_recomputes_the_feed_forward(tmp_path):
    """The same loss and gradients with the feed-forward blocks recomputed in the backward pass, and far fewer bytes
    kept for it (counted by a saved-tensors hook; the recomputed blocks keep only their inputs)."""
    runs = []
    for ac in (False, True):
        m = _model()
        cfg = TrainConfig(steps=2, batch_size=8, warmup_steps=1, activation_checkpointing=ac)
        tr = Trainer(m, _examples(8), cfg, tmp_path)
        kept: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rec = tr.train_step()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        runs.append((rec["loss"], grads, sum(kept)))
    (l0, g0, kept0), (l1, g1, kept1) = runs
    assert l0 == l1 and g0.keys() == g1.keys()
    assert max(float((g0[k] - g1[k]).abs().max()) for k in g0) <= 1e-6 * max(float(g.abs().max()) for g in g0.values())
    print(f"bytes kept for backward: {kept0:,} without, {kept1:,} with activation checkpointing")
    assert kept1 < 0.7 * kept0
