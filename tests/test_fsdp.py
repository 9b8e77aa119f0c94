"""Sharded training (`dgemma train --strategy fsdp`, dgemma/training/fsdp.py) on the CPU: 2 gloo processes on a tiny
random model.

- Two-process FSDP (with gradient accumulation and activation checkpointing) gives the losses and the weights of one
  process on the same global batch, and each process holds half of the parameters and of the optimizer's state.
- A process killed mid-run ends the job (the other exits on its own with a clear message, within the collective
  timeout); resuming gives the uninterrupted run's weights, also in another number of processes.
- LoRA over a sharded base trains and exports one file per layer; the export loads in `LLM` and transformers and
  generates what the same weights saved by `save_model` generate.
- Bad launches and resuming another model's or other data's checkpoint are refused with a clear error.

Tolerances: FSDP and one process compute the same sums in another order (a reduce-scatter of two half-batch
gradients against one backward over the whole batch; the clipping norm from two partial sums), so they agree to
float32 rounding. Measured: losses within 2e-6 per step, updates (final - initial weights) within 1e-5 of their norm.
The bounds (1e-4 on losses, 1e-3 on updates) leave a wide margin for other CPUs' kernels while a sharding bug (a
gradient summed twice or over one process only, a stale or missing shard) is O(1). Runs of the same number of
processes (a resumed run against an uninterrupted one) do the same arithmetic in the same order: equal to 1e-6.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from dgemma import DiffusionGemma, save_model
from dgemma.entrypoints.cli import main as cli_main
from dgemma.model.checkpoint import load_model
from dgemma.model.config import tiny_config
from dgemma.training.config import TrainConfig
from dgemma.training.data import Example
from dgemma.training.trainer import Trainer
from dgemma.training.train import run_training

V, C = 40, 8
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
STEPS = 4
# The reference run: 2 processes, 2 micro-batches each, activation checkpointing, a checkpoint every 2 steps
FLAGS = ["--steps", str(STEPS), "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1", "--log-every", "1"]
FLAGS += ["--save-every", "2", "--precision", "float32", "--quiet", "--threads", "1", "--device", "cpu"]
FSDP = ["--strategy", "fsdp", "--grad-accum", "2", "--activation-checkpointing"]
LOSS_TOL, UPDATE_TOL = 1e-4, 1e-3

# Runs `dgemma train` with rank 1 killing itself (SIGKILL) when it is about to take step DIE_AT + 1
DYING = """
import os, signal, sys
from dgemma.training.trainer import Trainer
from dgemma.entrypoints.cli import main
step = Trainer.train_step
def dying(self):
    if self.dist.rank == 1 and self.step == int(os.environ["DIE_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self)
Trainer.train_step = dying
sys.exit(main(sys.argv[1:]))
"""


def _examples(n: int = 12) -> list[Example]:
    """Prompts of 2-7 tokens, responses of 1-20 (1 to 3 canvases): the processes' rows need different numbers of
    canvases and self-conditioning passes, which FSDP must not let change the sequence of collectives."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        p = torch.randint(3, V, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(3, V, (int(torch.randint(1, 21, (1,), generator=g)),), generator=g).tolist()
        out.append(Example([2] + p, r))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An initial checkpoint and its data (token ids)."""
    d = tmp_path_factory.mktemp("fsdp")
    torch.manual_seed(0)
    m = DiffusionGemma(tiny_config(vocab_size=V, canvas_length=C, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    m.reset_parameters(0.2)  # larger weights than the default init: losses and gradients far from trivial
    save_model(m, d / "init")
    rows = [{"prompt_ids": e.prompt, "completion_ids": e.response} for e in _examples()]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd = [*launch, "--master-port", str(_port()), "-m", "dgemma.entrypoints.cli", "train", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _train_args(d: Path, out: str, *extra: str) -> list[str]:
    return ["--model", str(d / "init"), "--data", str(d / "data.jsonl"), "--output", str(d / out), *FLAGS, *extra]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(load_model(path).state_dict())


def _update_gap(a: dict, b: dict, init: dict) -> float:
    """|update_a - update_b| / |update_a| over all tensors (updates: final minus initial weights)."""
    da = torch.cat([(a[k] - init[k]).flatten() for k in init])
    db = torch.cat([(b[k] - init[k]).flatten() for k in init])
    return float((da - db).norm() / da.norm())


def _max_gap(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def fsdp_run(setup):
    """The uninterrupted two-process FSDP run."""
    run = _torchrun(_train_args(setup, "fsdp", *FSDP))
    assert run.returncode == 0, run.stderr[-3000:]
    return setup / "fsdp", run.stderr


def _single(d: Path, out: str, **over) -> Path:
    cfg = TrainConfig(steps=STEPS, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1, save_every=2, **over)
    return run_training(d / "init", d / "data.jsonl", d / out, cfg, progress=False, device="cpu")


def test_two_process_fsdp_matches_one_process(setup, fsdp_run):
    out, stderr = fsdp_run
    _single(setup, "single")
    one, two = _losses(setup / "single"), _losses(out)
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) < LOSS_TOL, (one, two)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(e["grad_norm"] > 1.0 for e in log)  # clipping (at 1.0) acted on the sharded gradients at every step
    init, a, b = _weights(setup / "init"), _weights(setup / "single" / "final"), _weights(out / "final")
    assert _update_gap(a, b, init) < UPDATE_TOL
    # The export is one safetensors file per FSDP unit: the root's tensors, then each layer's.
    index = json.loads((out / "final" / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) == 1 + len(DiffusionGemma(tiny_config(vocab_size=V)).layers)
    assert {f for k, f in index.items() if ".layers.1." in k} == {files[2]}


def test_each_process_holds_half_the_model_and_optimizer(fsdp_run):
    """The shard sizes each process prints after its first step, and the sizes of the checkpoint's shard files."""
    out, stderr = fsdp_run
    lines = [line for line in stderr.splitlines() if "parameter elements" in line]
    assert len(lines) == 2, stderr[-2000:]
    held = {}
    for line in lines:
        words = line.replace(",", "").split()
        rank = int(words[words.index("rank") + 1])
        nums = [int(w) for w in words if w.isdigit()]  # rank, world, params held, params, optim held, optim
        held[rank] = nums[2:6]
        print(line)
    (p0, pt, o0, ot), (p1, _, o1, _) = held[0], held[1]
    assert p0 + p1 == pt and o0 + o1 == ot and ot == 2 * pt  # AdamW: two moments per parameter element
    for share in (p0 / pt, p1 / pt, o0 / ot, o1 / ot):
        assert 0.4 < share < 0.6
    shards = sorted((out / "checkpoint-000002" / "train_state" / "dcp").glob("*.distcp"))
    sizes = [f.stat().st_size for f in shards]
    assert len(sizes) == 2 and all(0.35 < s / sum(sizes) < 0.65 for s in sizes), sizes


def test_a_killed_process_ends_the_job_and_resume_repeats_the_run(setup, fsdp_run):
    """Rank 1 is SIGKILLed before its third step (after checkpoint-000002); the processes run without torchrun, as on
    two machines, so nothing but the collectives tells rank 0. It must end on its own, well within the collective
    timeout, with a clear message; resuming (torchrun, --resume) then ends where the uninterrupted run ended."""
    out = setup / "killed"
    args = _train_args(setup, "killed", *FSDP, "--dist-timeout", "60")
    port = str(_port())
    procs, t0 = [], time.monotonic()
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "DIE_AT": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", DYING, "train", *args], env=env, stderr=subprocess.PIPE))
    try:
        err0 = procs[0].communicate(timeout=120)[1].decode()
        procs[1].wait(timeout=30)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 2 and time.monotonic() - t0 < 60, err0[-2000:]
    assert "rank 0 of 2: a collective operation failed at step 3" in err0 and "probably died" in err0, err0[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-000002"]
    resumed = _torchrun(_train_args(setup, "killed", *FSDP, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = fsdp_run[0]
    assert _losses(out)[2:] == _losses(ref)[2:]
    assert _max_gap(_weights(out / "final"), _weights(ref / "final")) == 0.0


def test_resume_a_two_process_checkpoint_in_one_process(setup, fsdp_run):
    """DCP reshards: the two-process checkpoint-000002 resumed by one unsharded process ends where the two-process
    run ended (within the FSDP-vs-one-process tolerance)."""
    ref = fsdp_run[0]
    cfg = TrainConfig(steps=STEPS, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1, grad_accum=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(setup / "init")
    ex = [Example(r["prompt_ids"], r["completion_ids"]) for r in map(json.loads, open(setup / "data.jsonl"))]
    tr = Trainer(model, ex, cfg, setup / "one_from_two")
    tr.resume(ref / "checkpoint-000002")
    assert tr.step == 2
    for _ in range(2):
        tr.train_step()
    init = _weights(setup / "init")
    mine = {k: v.detach() for k, v in tr.model.state_dict().items()}
    assert _update_gap(_weights(ref / "final"), mine, init) < UPDATE_TOL


def test_lora_over_a_sharded_base_trains_and_exports(setup):
    """LoRA adapters (replicated, all-reduced) over an FSDP base: the losses of one process; the export (one file
    per unit, adapters merged) equals the same adapters merged and saved by `save_model`, and both load in LLM and
    transformers and generate the same tokens."""
    lora = ["--lora-rank", "4", "--lora-alpha", "8"]
    run = _torchrun([*_train_args(setup, "lora", "--strategy", "fsdp", *lora)])
    assert run.returncode == 0, run.stderr[-3000:]
    _single(setup, "lora_single", lora_rank=4, lora_alpha=8.0)
    one, two = _losses(setup / "lora_single"), _losses(setup / "lora")
    assert max(abs(a - b) for a, b in zip(one, two)) < LOSS_TOL, (one, two)
    # The usual way: the trained adapters in one unsharded process, merged and written by save_model.
    cfg = TrainConfig(steps=STEPS, batch_size=4, lora_rank=4, lora_alpha=8.0, lr=1e-2, warmup_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_model(setup / "init")
    ex = [Example(r["prompt_ids"], r["completion_ids"]) for r in map(json.loads, open(setup / "data.jsonl"))]
    tr = Trainer(base, ex, cfg, setup / "lora_usual")
    tr.resume(setup / "lora" / "final")
    usual = tr.save(final=True)
    assert (usual / "model.safetensors").is_file()
    sharded, whole = _weights(setup / "lora" / "final"), _weights(usual)
    assert _max_gap(sharded, whole) == 0.0
    assert _max_gap(sharded, _weights(setup / "init")) > 1e-4  # the adapters changed the weights
    assert _generate_dgemma(setup / "lora" / "final") == _generate_dgemma(usual)
    assert _generate_hf(setup / "lora" / "final") == _generate_hf(usual)


def _generate_dgemma(path: Path) -> list[list[int]]:
    from dgemma.engine.params import SamplingParams
    from dgemma.entrypoints.llm import LLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = LLM(str(path), device="cpu", dtype="float32")
    params = SamplingParams(max_new_tokens=16, seed=0)
    outs = llm.generate([{"prompt_token_ids": [2, 5, 6, 7]}, {"prompt_token_ids": [2, 9]}], params)
    return [list(o.outputs[0].token_ids) for o in outs]


def _generate_hf(path: Path) -> list[list[int]]:
    from transformers import DiffusionGemmaForBlockDiffusion

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    # transformers leaves weights where the file put them (one file per layer here, one for all there), and kernels
    # may round differently on differently aligned memory (measured: 2e-7 in the logits, enough to flip a sampled
    # token of this random model); copies in fresh memory compute alike.
    with torch.no_grad():
        for p in hf.parameters():
            p.data = p.data.clone()
    torch.manual_seed(0)
    ids, mask = torch.tensor([[2, 5, 6, 7]]), torch.ones(1, 4, dtype=torch.long)
    out = hf.generate(ids, attention_mask=mask, pad_token_id=0, max_new_tokens=16)
    return out.sequences.tolist()


# -- refusals -------------------------------------------------------------------------------------------------------
def _cli(setup, out: str, *extra: str) -> list[str]:
    return ["train", *_train_args(setup, out, *extra)]


def test_bad_launches_are_refused_before_anything_runs(setup, monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert cli_main(_cli(setup, "bad", "--strategy", "fsdp")) == 2
    assert "--strategy fsdp shards the model over processes that torchrun starts" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc-per-node 3 would: 3 does not divide the batch of 4
    assert cli_main(_cli(setup, "bad", "--strategy", "ddp")) == 2
    assert "batch_size 4 must be divisible by processes x grad_accum (3 x 1)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_main(_cli(setup, "bad", "--strategy", "single")) == 2
    assert "--strategy single trains in one process, but torchrun started 2" in capsys.readouterr().err
    assert not (setup / "bad").exists()
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var)
    assert cli_main(_cli(setup, "bad", "--resume")) == 2
    assert "has no complete checkpoint-N/ to continue from" in capsys.readouterr().err


def test_resume_refuses_another_model_or_other_data(setup, tmp_path):
    ex = _examples()
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=1, save_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_model(setup / "init")
    Trainer(base, ex, cfg, tmp_path).train(progress=False)
    ck = tmp_path / "checkpoint-000001"
    wider = DiffusionGemma(tiny_config(vocab_size=V, canvas_length=C, hidden_size=48, pad_token_id=0, eos_token_id=1))
    with pytest.raises(ValueError, match="trained from another model"):
        Trainer(wider, ex, cfg, tmp_path).resume(ck)
    with pytest.raises(ValueError, match=r"trained on other data \(12 examples, now 11\)"):
        Trainer(base, ex[:-1], cfg, tmp_path).resume(ck)
    with pytest.raises(ValueError, match="lora_rank=0, now 2"):
        Trainer(base, ex, TrainConfig(steps=2, batch_size=4, lora_rank=2), tmp_path).resume(ck)
