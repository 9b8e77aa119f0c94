"""device="auto" / dtype="auto" (dgemma/model/device.py) and how every entry point uses them.

The machine is mocked (CUDA, torch's CPU capability, the CPU flags, the oneDNN environment), so these tests give the
same answers on any CPU."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgemma import DiffusionGemma, save_model
from dgemma.model import device as D
from dgemma.entrypoints.cli import main
from dgemma.model.config import tiny_config
from dgemma.entrypoints.llm import LLM
from dgemma.training.config import TrainConfig
from dgemma.training.distributed import default_device
from dgemma.training.trainer import Trainer

AMD, INTEL = "AuthenticAMD", "GenuineIntel"
BF16_CPU = {"avx2", "avx512f", "avx512_bf16"}  # on an AMD CPU (Zen 4): bf16 matmul faster than float32
AMX_CPU = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}  # Intel Sapphire Rapids and later
AVX2_CPU = {"avx2", "fma"}
NO_BF16 = "device cpu, dtype float32 (auto: no CUDA; this CPU has no native bf16 matmul)"
WORK = D.CPU_BF16_MIN_WORK
ROWS_32 = WORK // (32 * 32)  # the fewest rows that give the 32-wide test checkpoint bf16
WIDE = 256  # the narrowest model that gets bf16 on a bf16 CPU at one row (256 x 256 x 1 = WORK)


def machine(
    monkeypatch,
    cuda: bool = False,
    capability: str = "AVX512",
    flags: set[str] = BF16_CPU,
    vendor: str = AMD,
    gpu_cc: tuple[int, int] = (9, 0),
    **env: str,
) -> None:
    """Pretend to be a machine with (or without) CUDA, this torch CPU capability, this CPU (vendor and flags) and
    environment."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu_cc)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(D, "cpu_info", lambda path="/proc/cpuinfo": (vendor, set(flags)))
    for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


# -- the rules ------------------------------------------------------------------------------------------------------
def test_cuda_present_picks_cuda_and_bfloat16(monkeypatch):
    machine(monkeypatch, cuda=True, flags=AVX2_CPU)
    p = D.resolve()
    assert (p.device, p.dtype) == (torch.device("cuda"), torch.bfloat16)
    assert p.describe() == "device cuda, dtype bfloat16 (auto: CUDA is available; bfloat16 on CUDA)"


def test_gpu_without_native_bf16_picks_float32(monkeypatch):
    machine(monkeypatch, cuda=True, gpu_cc=(7, 5))  # e.g. a T4: bf16 would be emulated
    assert D.resolve().dtype == torch.float32


@pytest.mark.parametrize(
    ("vendor", "flags", "via"),
    [(AMD, BF16_CPU, "avx512_bf16"), (INTEL, AMX_CPU, "amx_bf16"), (AMD, {"avx512f", "amx_bf16"}, "amx_bf16")],
)
def test_cpu_with_native_bf16_picks_bfloat16(monkeypatch, vendor, flags, via):
    machine(monkeypatch, vendor=vendor, flags=flags)
    p = D.resolve()
    assert (p.device, p.dtype) == (torch.device("cpu"), torch.bfloat16)
    assert p.describe() == f"device cpu, dtype bfloat16 (auto: no CUDA; native bf16 matmul on this CPU via {via})"


def test_intel_avx512_bf16_without_amx_picks_float32(monkeypatch):
    """Native, but no faster than float32 (measured on an Intel Xeon VM: 80 vs 150 GFLOP/s per core)."""
    machine(monkeypatch, vendor=INTEL, flags=BF16_CPU)
    p = D.resolve()
    assert p.dtype == torch.float32 and "(AVX512-BF16, no AMX) is no faster than float32" in p.describe()


def test_avx2_only_cpu_picks_float32(monkeypatch):
    machine(monkeypatch, capability="AVX2", flags=AVX2_CPU)
    p = D.resolve()
    assert (p.device, p.dtype) == (torch.device("cpu"), torch.float32)
    assert p.describe() == NO_BF16


def test_aten_capability_forced_to_avx2_picks_float32(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 on a bf16 CPU: torch reports AVX2 and bf16 would be emulated."""
    for vendor, flags in ((AMD, BF16_CPU), (INTEL, AMX_CPU)):
        machine(monkeypatch, capability="AVX2", vendor=vendor, flags=flags)
        p = D.resolve()
        assert p.dtype == torch.float32 and "AVX2" in p.describe()


@pytest.mark.parametrize("var", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
@pytest.mark.parametrize("isa", ["AVX2", "avx512_core", "AVX512_CORE_VNNI"])
def test_onednn_isa_below_bf16_picks_float32(monkeypatch, var, isa):
    for vendor, flags in ((AMD, BF16_CPU), (INTEL, AMX_CPU)):
        machine(monkeypatch, vendor=vendor, flags=flags, **{var: isa})
        p = D.resolve()
        assert p.dtype == torch.float32 and "ONEDNN_MAX_CPU_ISA" in p.describe()


@pytest.mark.parametrize("isa", ["ALL", "avx512_core_bf16", "AVX512_CORE_AMX", "AVX10_1_512_AMX"])
def test_onednn_isa_allowing_bf16_keeps_bfloat16(monkeypatch, isa):
    machine(monkeypatch, ONEDNN_MAX_CPU_ISA=isa)
    assert D.resolve().dtype == torch.bfloat16


def test_onednn_isa_without_amx_on_intel_picks_float32(monkeypatch):
    """An AMX CPU limited to AVX512_CORE_BF16: oneDNN's bf16 matmul loses AMX and is no faster than float32."""
    machine(monkeypatch, vendor=INTEL, flags=AMX_CPU, ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16")
    assert D.resolve().dtype == torch.float32
    machine(monkeypatch, vendor=INTEL, flags=AMX_CPU, ONEDNN_MAX_CPU_ISA="avx512_core_amx")
    assert D.resolve().dtype == torch.bfloat16


def test_rules_are_a_function_of_their_inputs():
    assert D.cpu_native_bf16("AVX512", AMD, {"avx512_bf16"}, {})[0]
    assert D.cpu_native_bf16("AVX512", INTEL, {"amx_bf16"}, {})[0]
    assert not D.cpu_native_bf16("AVX512", INTEL, {"avx512_bf16"}, {})[0]  # native but no faster
    assert not D.cpu_native_bf16("AVX512", AMD, {"avx512f"}, {})[0]  # AVX512 without BF16: emulated
    assert not D.cpu_native_bf16("DEFAULT", INTEL, {"amx_bf16"}, {})[0]
    assert not D.cpu_native_bf16("AVX512", INTEL, {"amx_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"})[0]


AVX2_SWITCHES = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.parametrize(
    "switches",
    [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, AVX2_SWITCHES],
    ids=["aten", "onednn", "all"],
)
def test_real_avx2_switches_give_float32_on_any_cpu(switches):
    """In a fresh process with the AVX2 switches (this CPU's real flags), auto is float32 whatever this CPU has, for
    a model of unknown size and for a wide one."""
    code = (
        "import torch; from dgemma.model.device import auto_dtype; cpu = torch.device('cpu'); "
        "print(torch.backends.cpu.get_cpu_capability(), auto_dtype(cpu)[0], auto_dtype(cpu, 4096)[0])"
    )
    env = {**{k: v for k, v in os.environ.items() if k not in AVX2_SWITCHES}, **switches}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    capability, unknown, wide = out.split()[-3:]
    assert unknown == wide == "torch.float32"
    if "ATEN_CPU_CAPABILITY" in switches:
        assert capability != "AVX512"  # torch's kernels were lowered


SMALL = "model too small for bf16 to pay on this CPU"


@pytest.mark.parametrize(
    ("vendor", "flags", "hidden", "expected", "why"),
    [
        (AMD, BF16_CPU, 128, torch.float32, SMALL),  # the bundled Sudoku model
        (AMD, BF16_CPU, WIDE - 1, torch.float32, SMALL),
        (AMD, BF16_CPU, WIDE, torch.bfloat16, "via avx512_bf16, hidden size"),
        (AMD, BF16_CPU, 640, torch.bfloat16, "via avx512_bf16, hidden size 640 x 640 x 1 row >="),  # the 75M model
        (AMD, BF16_CPU, None, torch.bfloat16, "via avx512_bf16"),  # size unknown: the CPU alone decides
        (INTEL, AMX_CPU, 128, torch.float32, SMALL),
        (INTEL, AMX_CPU, 640, torch.bfloat16, "via amx_bf16, hidden size 640 x 640 x 1 row >="),
        (INTEL, BF16_CPU, 640, torch.float32, "no faster than float32"),  # AVX512-BF16 without AMX
        (AMD, AVX2_CPU, 640, torch.float32, "no native bf16 matmul"),
    ],
)
def test_cpu_rule_weighs_the_model(vendor, flags, hidden, expected, why):
    dtype, reason = D.cpu_dtype("AVX512", vendor, flags, {}, hidden)
    assert dtype == expected and why in reason


@pytest.mark.parametrize(
    ("hidden", "max_batch", "expected", "why"),
    [
        (128, 1, torch.float32, f"{SMALL}: hidden size 128 x 128 x 1 row < {WORK}"),  # the Sudoku model, one row
        (128, 2, torch.float32, f"{SMALL}: hidden size 128 x 128 x 2 rows < {WORK}"),  # measured: float32 faster
        (128, 8, torch.bfloat16, f"via avx512_bf16, hidden size 128 x 128 x 8 rows >= {WORK}"),
        (160, 1, torch.float32, f"{SMALL}: hidden size 160 x 160 x 1 row < {WORK}"),
        (160, 3, torch.bfloat16, "hidden size 160 x 160 x 3 rows >="),
        (192, 1, torch.float32, f"hidden size 192 x 192 x 1 row < {WORK}"),
        (192, 2, torch.bfloat16, "hidden size 192 x 192 x 2 rows >="),
        (128, 3, torch.float32, f"hidden size 128 x 128 x 3 rows < {WORK}"),  # just under the threshold
        (128, 4, torch.bfloat16, f"hidden size 128 x 128 x 4 rows >= {WORK}"),  # exactly on it
        (WIDE - 1, 1, torch.float32, SMALL),
        (WIDE, 1, torch.bfloat16, f"hidden size {WIDE} x {WIDE} x 1 row >= {WORK}"),
        (640, 16, torch.bfloat16, "hidden size 640 x 640 x 16 rows >="),
        (None, 1, torch.bfloat16, "via avx512_bf16"),  # size unknown: the CPU alone decides, whatever the batch
    ],
)
def test_cpu_rule_weighs_the_rows(hidden, max_batch, expected, why):
    """The work of a step is the hidden size squared times the engine's rows (`max_batch`): both sides of the
    threshold."""
    dtype, reason = D.cpu_dtype("AVX512", AMD, BF16_CPU, {}, hidden, max_batch)
    assert dtype == expected and why in reason
    assert D.cpu_dtype("AVX512", INTEL, AMX_CPU, {}, hidden, max_batch)[0] == expected  # AMX: the same rule
    assert D.cpu_dtype("AVX512", INTEL, BF16_CPU, {}, hidden, max_batch)[0] == torch.float32  # no faster there


@pytest.mark.parametrize("hidden", [None, 64, 192, 640, 4096])
@pytest.mark.parametrize("max_batch", [1, 8, 256])
def test_avx2_only_never_gets_bfloat16(hidden, max_batch):
    """Emulated bf16 (~100x slower) is never chosen, however wide the model and large the batch: an AVX2 CPU, torch's
    kernels lowered to AVX2, or oneDNN limited to AVX2, on either CPU family."""
    for vendor, flags in ((AMD, BF16_CPU), (INTEL, AMX_CPU), (AMD, AVX2_CPU), (INTEL, AVX2_CPU)):
        assert D.cpu_dtype("AVX2", vendor, flags, {}, hidden, max_batch)[0] == torch.float32
        isa = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
        assert D.cpu_dtype("AVX512", vendor, flags, isa, hidden, max_batch)[0] == torch.float32
        assert D.cpu_dtype("AVX512", vendor, flags, AVX2_SWITCHES, hidden, max_batch)[0] == torch.float32
    assert D.cpu_dtype("AVX512", AMD, AVX2_CPU, {}, hidden, max_batch)[0] == torch.float32


def test_model_hidden_size(tmp_path, ckpt):
    assert D.model_hidden_size("sudoku") == 128  # a bundled model's name
    assert D.model_hidden_size(ckpt) == D.model_hidden_size(str(ckpt)) == 32
    assert D.model_hidden_size(None) is None
    assert D.model_hidden_size(tmp_path / "missing") is None  # loading reports it
    (tmp_path / "config.json").write_text("{not json")
    assert D.model_hidden_size(tmp_path) is None


def test_resolve_weighs_the_model(monkeypatch, ckpt, wide_ckpt):
    machine(monkeypatch)  # native bf16
    p = D.resolve(model=ckpt)
    assert p.dtype == torch.float32
    assert p.describe() == (
        "device cpu, dtype float32 (auto: no CUDA; model too small for bf16 to pay on this CPU: hidden size 32 x 32 "
        f"x 1 row < {WORK})"
    )
    p = D.resolve(model=wide_ckpt)
    assert p.dtype == torch.bfloat16 and p.describe().endswith(f"hidden size {WIDE} x {WIDE} x 1 row >= {WORK})")
    p = D.resolve(model=ckpt, max_batch=ROWS_32)  # the engine's rows weigh too
    assert p.dtype == torch.bfloat16 and p.describe().endswith(f"hidden size 32 x 32 x {ROWS_32} rows >= {WORK})")
    assert D.resolve(model=ckpt, max_batch=ROWS_32 - 1).dtype == torch.float32
    machine(monkeypatch, cuda=True)  # the model's size weighs only on a CPU
    assert D.resolve(model=ckpt).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", torch.bfloat16, torch.float32])
def test_explicit_dtype_is_never_overridden(monkeypatch, ckpt, wide_ckpt, dtype):
    want = D.DTYPES[dtype] if isinstance(dtype, str) else dtype
    for kw in (dict(capability="AVX2", flags=AVX2_CPU), {}, dict(vendor=INTEL, flags=AMX_CPU)):
        machine(monkeypatch, **kw)
        for model in (None, ckpt, wide_ckpt):
            for max_batch in (1, 8, 64):
                p = D.resolve("auto", dtype, model=model, max_batch=max_batch)
                assert p.dtype == want and p.why_dtype == "" and "model too small" not in p.describe()


def test_parse_cpuinfo():
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512_bf16\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu\n"
    )
    assert D.parse_cpuinfo(text) == (AMD, {"fpu", "avx2", "avx512_bf16"})
    assert D.parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd bf16\n") == ("", {"fp", "asimd", "bf16"})  # Arm
    assert D.parse_cpuinfo("") == ("", set())


# -- explicit values and errors ---------------------------------------------------------------------------------------
def test_explicit_values_win(monkeypatch):
    machine(monkeypatch, cuda=True, flags=AVX2_CPU)
    p = D.resolve("cpu", "bfloat16")  # emulated here, but asked for
    assert (p.device, p.dtype) == (torch.device("cpu"), torch.bfloat16)
    assert p.describe() == "device cpu, dtype bfloat16"
    assert D.resolve("cuda", "float32").dtype == torch.float32
    assert D.resolve("cpu", torch.float16).dtype == torch.float16
    assert D.resolve("cpu", "bf16").dtype == torch.bfloat16
    assert D.resolve("cpu").describe().endswith("(auto: this CPU has no native bf16 matmul)")  # dtype auto only


def test_bad_values_are_one_line_value_errors(monkeypatch):
    machine(monkeypatch)
    for device, dtype, needle in (
        ("cpu", "float8", "unknown dtype 'float8'"),
        ("nonsense", "auto", "nonsense"),
        ("cuda", "auto", "CUDA is not available"),
    ):
        with pytest.raises(ValueError, match=needle) as e:
            D.resolve(device, dtype)
        assert "\n" not in str(e.value)


# -- training -------------------------------------------------------------------------------------------------------
def test_training_auto(monkeypatch):
    machine(monkeypatch)  # a bf16 CPU: training still defaults to float32 there
    p = D.resolve_training()
    assert (p.device, p.dtype) == (torch.device("cpu"), torch.float32)
    assert p.describe().startswith("device cpu, precision float32 (auto: no CUDA;")
    assert D.resolve_training("cpu", "bfloat16").dtype == torch.bfloat16  # explicit wins
    with pytest.raises(ValueError, match="precision"):
        D.resolve_training("cpu", "float16")
    machine(monkeypatch, cuda=True, LOCAL_RANK="1")
    p = D.resolve_training()
    assert (p.device, p.dtype) == (torch.device("cuda:1"), torch.bfloat16)
    assert default_device() == "cuda:1"


def test_trainer_resolves_auto_precision_on_its_device(monkeypatch, tmp_path):
    machine(monkeypatch)
    assert TrainConfig().precision == "auto"
    tr = Trainer(DiffusionGemma(tiny_config(canvas_length=8)), [], TrainConfig(), tmp_path)
    assert tr.cfg.precision == "float32"  # what its checkpoints record
    tr = Trainer(DiffusionGemma(tiny_config(canvas_length=8)), [], TrainConfig(precision="bfloat16"), tmp_path)
    assert tr.cfg.precision == "bfloat16"


# -- entry points ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("auto") / "ckpt"
    save_model(DiffusionGemma(tiny_config(vocab_size=64, canvas_length=8, max_position_embeddings=64)), d)
    return d


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory) -> Path:
    """A checkpoint as wide as `CPU_BF16_MIN_WORK` (and otherwise tiny): bf16 on a bf16 CPU from one row."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("auto") / "wide"
    cfg = tiny_config(vocab_size=64, canvas_length=8, max_position_embeddings=64, hidden_size=WIDE)
    save_model(DiffusionGemma(cfg), d)
    return d


def test_llm_defaults_to_auto_and_logs_it(monkeypatch, caplog, ckpt, wide_ckpt):
    machine(monkeypatch, flags=AVX2_CPU, capability="AVX2")
    with caplog.at_level(logging.INFO, logger="dgemma.entrypoints.llm"):
        llm = LLM(ckpt, max_batch=1)
    assert (llm.device, llm.dtype) == (torch.device("cpu"), torch.float32)
    assert next(p.dtype for p in llm.model.parameters()) == torch.float32
    assert NO_BF16 in caplog.text
    machine(monkeypatch)  # native bf16: the model's size decides
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dgemma.entrypoints.llm"):
        assert LLM(ckpt, max_batch=1).dtype == torch.float32
    assert "model too small for bf16 to pay on this CPU: hidden size 32" in caplog.text
    assert LLM(wide_ckpt, max_batch=1).dtype == torch.bfloat16
    assert LLM(wide_ckpt, max_batch=1, dtype="float32").dtype == torch.float32
    assert LLM(ckpt, max_batch=1, dtype="bfloat16").dtype == torch.bfloat16
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dgemma.entrypoints.llm"):  # the engine's rows weigh: 32 x 32 x 64
        assert LLM(ckpt, max_batch=ROWS_32).dtype == torch.bfloat16
    assert f"hidden size 32 x 32 x {ROWS_32} rows >= {WORK}" in caplog.text
    assert LLM(ckpt, max_batch=ROWS_32 - 1).dtype == torch.float32
    assert LLM(ckpt, max_batch=ROWS_32, dtype="float32").dtype == torch.float32


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_choice(monkeypatch, capsys, ckpt):
    machine(monkeypatch, capability="AVX2", flags=AVX2_CPU)
    args = ("generate", "--model", ckpt, "--prompt-ids", "1,2", "--max-new-tokens", 8, "--seed", 0, "--json")
    code, out, err = run(capsys, *args)
    assert code == 0 and '"token_ids"' in out, err
    placed, kernels = err.splitlines()  # where the model runs, then what runs it
    assert placed == f"dgemma: {NO_BF16}" and kernels.startswith("dgemma: kernels: experts dense; ")
    code, _, err = run(capsys, *args, "--device", "cpu", "--dtype", "bfloat16")
    assert code == 0 and err.splitlines()[0] == "dgemma: device cpu, dtype bfloat16"
    assert "experts grouped" in err.splitlines()[1]  # bf16 experts run as one grouped matmul


def test_cli_prints_the_choice_for_the_model(monkeypatch, capsys, ckpt, wide_ckpt):
    machine(monkeypatch)  # native bf16
    args = ("generate", "--prompt-ids", "1,2", "--max-new-tokens", 8, "--seed", 0, "--json")
    code, _, err = run(capsys, *args, "--model", ckpt)
    assert code == 0 and err.splitlines()[0] == (
        "dgemma: device cpu, dtype float32 (auto: no CUDA; model too small for bf16 to pay on this CPU: hidden size 32 "
        f"x 32 x 1 row < {WORK})"
    )
    code, _, err = run(capsys, *args, "--model", wide_ckpt)
    assert code == 0 and err.splitlines()[0].startswith("dgemma: device cpu, dtype bfloat16 (auto: no CUDA; native")


def test_cli_bad_values_are_clean_errors(monkeypatch, capsys, ckpt):
    machine(monkeypatch)
    base = ("generate", "--model", ckpt, "--prompt-ids", "1")
    code, _, err = run(capsys, *base, "--dtype", "float8")
    assert code == 2 and "invalid choice: 'float8'" in err and "Traceback" not in err
    for device, needle in (("nonsense", "invalid --device 'nonsense'"), ("cuda", "CUDA is not available")):
        code, _, err = run(capsys, *base, "--device", device)
        assert code == 2 and err.splitlines() == [err.strip()] and needle in err and "Traceback" not in err


def test_cli_defaults_are_auto():
    from dgemma.entrypoints.cli import build_parser

    parser = build_parser()
    for argv in (
        ["generate", "-m", "x", "--prompt", "p"],
        ["chat", "-m", "x"],
        ["serve", "--model", "x"],
        ["sudoku", "solve"],
        ["sudoku", "eval"],
    ):
        args = parser.parse_args(argv)
        assert (args.device, args.dtype) == ("auto", "auto"), argv
    for argv in (["train", "-m", "x", "--data", "d", "-o", "o"], ["sudoku", "train"]):
        args = parser.parse_args(argv)
        assert (args.device, args.precision) == ("auto", "auto"), argv


def test_generate_help_explains_auto(capsys):
    code, out, _ = run(capsys, "generate", "--help")
    text = " ".join(out.split())
    assert code == 0 and "default: auto" in text and "~100x slower" in text and "AVX512-BF16" in text


def test_train_cli_prints_the_choice(monkeypatch, capsys):
    from dgemma.entrypoints.cli import training_placement

    machine(monkeypatch)
    assert training_placement("auto", "auto").dtype == torch.float32
    assert capsys.readouterr().err.startswith("dgemma: device cpu, precision float32 (auto: no CUDA;")
    monkeypatch.setenv("RANK", "1")  # torchrun: only the first process prints
    training_placement("cpu", "bfloat16")
    assert capsys.readouterr().err == ""


def test_server_prints_the_choice_before_loading(monkeypatch, capsys, tmp_path, ckpt):
    pytest.importorskip("uvicorn")
    from dgemma.entrypoints.server import _prepare, add_serve_arguments, run_serve

    machine(monkeypatch, capability="AVX2", flags=AVX2_CPU)
    parse = add_serve_arguments(argparse.ArgumentParser()).parse_args
    assert run_serve(parse(["--model", str(tmp_path / "missing")])) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"dgemma: {NO_BF16}"
    assert err[1].startswith("error: cannot load")
    assert run_serve(parse(["--model", str(tmp_path), "--device", "cuda"])) == 2
    assert capsys.readouterr().err.strip() == "error: device cuda: CUDA is not available on this machine"
    machine(monkeypatch)  # native bf16: the server's --max-batch is the engine's rows (default 8: 32 x 32 x 8 < WORK)
    assert _prepare(parse(["--model", str(ckpt)]))[0].why_dtype.endswith(f"hidden size 32 x 32 x 8 rows < {WORK}")
    rows = ["--max-batch", str(ROWS_32)]
    assert _prepare(parse(["--model", str(ckpt), *rows]))[0].why_dtype.endswith(f"32 x 32 x {ROWS_32} rows >= {WORK}")
    assert _prepare(parse(["--model", str(ckpt), "--max-batch", str(ROWS_32 - 1)]))[0].dtype == torch.float32
    assert _prepare(parse(["--model", str(ckpt), "--dtype", "float32"]))[0].dtype == torch.float32


def test_sudoku_solve_prints_the_choice(monkeypatch, capsys):
    machine(monkeypatch, capability="AVX2", flags=AVX2_CPU)
    puzzle = "000723000900560000230100057620000103050097800009000475002931586090006004506874320"
    code, out, err = run(capsys, "sudoku", "solve", puzzle, "--samples", 1, "--rounds", 1, "--json")
    assert code in (0, 1) and out.count("\n") == 1
    assert err.splitlines()[0] == f"dgemma: {NO_BF16}"
    machine(monkeypatch)  # native bf16: the bundled model (hidden 128) at one row is too small for it to pay
    one_row = ("--samples", 1, "--rounds", 1, "--batch-size", 1, "--json")
    code, out, err = run(capsys, "sudoku", "solve", puzzle, *one_row)
    assert code in (0, 1) and err.splitlines()[0] == (
        "dgemma: device cpu, dtype float32 (auto: no CUDA; model too small for bf16 to pay on this CPU: hidden size "
        f"128 x 128 x 1 row < {WORK})"
    )
    # The default --batch-size 16 is the engine's rows: bf16 pays (an invalid puzzle: nothing is denoised)
    code, out, err = run(capsys, "sudoku", "solve", "123", "--json")
    assert code == 1 and err.splitlines()[0] == (
        "dgemma: device cpu, dtype bfloat16 (auto: no CUDA; native bf16 matmul on this CPU via avx512_bf16, hidden "
        f"size 128 x 128 x 16 rows >= {WORK})"
    )
