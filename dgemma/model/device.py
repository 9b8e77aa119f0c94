"""Where and in which dtype to run: the one place that resolves `device="auto"` and `dtype="auto"`.

- device "auto": CUDA when `torch.cuda.is_available()`, else the CPU.
- dtype "auto": bfloat16 where the model runs faster in bf16 than in float32, float32 elsewhere:
  - CUDA: bfloat16 when the GPU has native bf16 (compute capability >= 8.0), else float32;
  - CPU: bfloat16 only with native bf16 matmul that torch and oneDNN may use: AMX-BF16 (`amx_bf16` in
    /proc/cpuinfo), or AVX512-BF16 (`avx512_bf16`) on an AMD CPU; and `torch.backends.cpu.get_cpu_capability()`
    is AVX512 (not lowered by `ATEN_CPU_CAPABILITY=avx2`), and `ONEDNN_MAX_CPU_ISA` (or the older
    `DNNL_MAX_CPU_ISA`), when set, still allows that ISA; and the model's hidden size squared times the engine's
    `max_batch` (the most rows a step carries) is at least `CPU_BF16_MIN_WORK` (narrow models at small batches run
    faster in float32 even there). Without native bf16, bf16 matmuls are
    emulated, about 100x slower than float32. Intel's AVX512-BF16 without AMX is native but no faster: its bf16 dot
    product has the multiply-add throughput of two float32 FMAs, and on an Intel Xeon VM (avx512_bf16, no AMX)
    oneDNN's bf16 matmul ran at 80 GFLOP/s per core against MKL's 150 in float32;
  - any other device: float32.

An explicit device or dtype always wins. `resolve` returns a `Placement` whose `describe()` is the one-line summary
the CLI and the server print at start-up. docs/device.md has the measurements behind the CPU rules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dgemma.model.checkpoint import load_config, resolve_model_path

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) that still include AMX, and those that include at least AVX512-BF16; any
# other limit (SSE41, AVX, AVX2, AVX2_VNNI, AVX2_VNNI_2, AVX512_CORE, AVX512_CORE_VNNI, ...) means emulated bf16.
ONEDNN_AMX_ISAS = (
    "ALL",
    "DEFAULT",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512_AMX_2",
)
ONEDNN_BF16_ISAS = (*ONEDNN_AMX_ISAS, "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX10_2_512")
# On a CPU with native bf16 matmul, "auto" is bfloat16 only when hidden size x hidden size x max_batch (the engine's
# rows) is at least this. bf16 matmuls are 1.5-3x faster at every shape a step runs, but a bf16 step runs more small ops
# (a six-step Sudoku generation: 1,172 tensor copies against 141, 385 matmul calls against 161: float32 has the CPU fast
# paths for small models, fused branches and a dense expert mixture), a cost that grows with neither the width nor the
# rows while the matmul saving grows with the rows and the square of the width (the weights). The dtype is fixed at
# load, so the batch weighed is the most rows the engine can carry. Step time bf16/float32, both run orders, on a 2-core
# AMD EPYC with avx512_bf16, no AMX (torch 2.13.0, 2 threads; docs/device.md has the 1-thread numbers and the commands):
#   hidden 128 (bundled Sudoku model): batch 1 1.13-1.42, batch 2 1.09-1.11, batch 8 0.82-0.91
#   hidden 160:                        batch 1 1.05-1.12, batch 8 0.82-0.84
#   hidden 192:                        batch 1 0.98-1.04, batch 8 0.69-0.90
#   hidden 256 (generate.py's small):  batch 1 0.71-1.02, batch 8 0.67-0.76
#   hidden 640 (the 75M model):        batch 1 0.52-0.57
# so float32 up to hidden 192 at one row and for hidden 128 at two, bfloat16 from hidden 256 at one row (256 x 256)
# and for hidden 128 at 8 rows.
CPU_BF16_MIN_WORK = 256 * 256


@dataclass(frozen=True)
class Placement:
    """A resolved device and dtype; `why_device`/`why_dtype` explain an automatic choice ("" when explicit).
    For training, `dtype` is the autocast precision (`label` "precision"; weights stay float32)."""

    device: torch.device
    dtype: torch.dtype
    why_device: str = ""
    why_dtype: str = ""
    label: str = "dtype"

    def describe(self) -> str:
        """E.g. 'device cpu, dtype float32 (auto: no CUDA; this CPU has no native bf16 matmul)'."""
        why = "; ".join(w for w in (self.why_device, self.why_dtype) if w)
        line = f"device {self.device}, {self.label} {dtype_name(self.dtype)}"
        return f"{line} (auto: {why})" if why else line


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def is_auto(value: object) -> bool:
    return value is None or value == "auto"


def resolve_device(
    device: str | torch.device | None = "auto", local_rank: int | None = None, what: str = "device"
) -> torch.device:
    """ "auto" (or None): CUDA when available (device `local_rank` if given, else the current one), else the CPU.
    Anything else is parsed by torch; ValueError for a bad name or CUDA on a machine without it (the message
    calls the value `what`, e.g. "--device")."""
    if is_auto(device):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid {what} {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {device}: CUDA is not available on this machine")
    return dev


def _why_device(requested: object, dev: torch.device) -> str:
    if not is_auto(requested):
        return ""
    return "CUDA is available" if dev.type == "cuda" else "no CUDA"


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """The CPU vendor ("GenuineIntel", "AuthenticAMD", ...) and feature flags Linux reports ("" and an empty set
    where /proc/cpuinfo is absent or unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return "", set()


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """The vendor and the flags of the first processor in /proc/cpuinfo's text."""
    vendor = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key.strip() in ("flags", "Features"):
            return vendor, set(value.split())
    return vendor, set()


def cpu_native_bf16(capability: str, vendor: str, flags: set[str], env: Mapping[str, str]) -> tuple[bool, str]:
    """Whether bf16 matmuls are faster than float32 ones on this CPU, from torch's CPU capability, the CPU vendor
    and flags, and the environment; and why (for the start-up line)."""
    if "amx_bf16" not in flags and "avx512_bf16" not in flags:
        return False, "this CPU has no native bf16 matmul"
    if not capability.upper().startswith("AVX512"):
        return False, f"torch's CPU capability is {capability} (ATEN_CPU_CAPABILITY?), so bf16 would be emulated"
    isa = (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if "amx_bf16" in flags and (not isa or isa in ONEDNN_AMX_ISAS):
        return True, "native bf16 matmul on this CPU via amx_bf16"
    if isa and isa not in ONEDNN_BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} is below AVX512_CORE_BF16, so bf16 would be emulated"
    if "avx512_bf16" in flags and vendor == "AuthenticAMD":
        return True, "native bf16 matmul on this CPU via avx512_bf16"
    return False, "this CPU's bf16 matmul (AVX512-BF16, no AMX) is no faster than float32"


def cpu_dtype(
    capability: str,
    vendor: str,
    flags: set[str],
    env: Mapping[str, str],
    hidden_size: int | None,
    max_batch: int = 1,
) -> tuple[torch.dtype, str]:
    """The "auto" dtype on this CPU for a model of `hidden_size` (None: unknown, judged by the CPU alone) run by an
    engine of `max_batch` rows, and why: bfloat16 with native bf16 matmul (`cpu_native_bf16`) and
    hidden_size x hidden_size x max_batch of at least `CPU_BF16_MIN_WORK`."""
    native, why = cpu_native_bf16(capability, vendor, flags, env)
    if not native:
        return torch.float32, why
    if hidden_size is None:
        return torch.bfloat16, why
    work = f"hidden size {hidden_size} x {hidden_size} x {max_batch} {'row' if max_batch == 1 else 'rows'}"
    if hidden_size * hidden_size * max_batch < CPU_BF16_MIN_WORK:
        return torch.float32, f"model too small for bf16 to pay on this CPU: {work} < {CPU_BF16_MIN_WORK}"
    return torch.bfloat16, f"{why}, {work} >= {CPU_BF16_MIN_WORK}"


def auto_dtype(device: torch.device, hidden_size: int | None = None, max_batch: int = 1) -> tuple[torch.dtype, str]:
    """The "auto" dtype for `device`, a model of `hidden_size` (None: unknown) and an engine of `max_batch` rows,
    and why."""
    if device.type == "cuda":
        if _cuda_bf16(device):
            return torch.bfloat16, "bfloat16 on CUDA"
        return torch.float32, "this GPU has no native bf16"
    if device.type == "cpu":
        return cpu_dtype(torch.backends.cpu.get_cpu_capability(), *cpu_info(), os.environ, hidden_size, max_batch)
    return torch.float32, f"float32 on {device.type}"


def model_hidden_size(model: str | Path | None) -> int | None:
    """The hidden size in the config.json of `model` (a checkpoint directory or a bundled model's name); None when
    no model is given or its config cannot be read (loading it reports why)."""
    if model is None:
        return None
    try:
        return load_config(resolve_model_path(model)).text.hidden_size
    except (OSError, ValueError):
        return None


def _cuda_bf16(device: torch.device) -> bool:
    """Native (not emulated) bf16 on this GPU: compute capability 8.0 (Ampere) or newer."""
    if torch.version.hip:  # ROCm GPUs torch supports all have bf16
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve(
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = "auto",
    quantization: str | None = None,
    model: str | Path | None = None,
    max_batch: int = 1,
) -> Placement:
    """Both choices at once, for inference; ValueError (one line) for a bad device or dtype. With a `quantization`
    (FP8 weights, bf16 activations) "auto" is bfloat16. `model` (a checkpoint directory or a bundled model's name)
    and `max_batch` (the rows of the engine that will run it) let "auto" weigh the work of a step on a CPU; without
    a model the CPU alone decides."""
    dev = resolve_device(device)
    why_device = _why_device(device, dev)
    if isinstance(dtype, torch.dtype):
        return Placement(dev, dtype, why_device)
    if dtype == "auto" and quantization is not None:
        return Placement(dev, torch.bfloat16, why_device, f"{quantization} weights run with bf16 activations")
    if dtype == "auto":
        auto, why_dtype = auto_dtype(dev, model_hidden_size(model), max_batch)
        return Placement(dev, auto, why_device, why_dtype)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(DTYPES))} or 'auto'")
    return Placement(dev, DTYPES[dtype], why_device)


# -- training -------------------------------------------------------------------------------------------------------
def auto_precision(device: torch.device) -> tuple[torch.dtype, str]:
    """The "auto" training precision (the autocast dtype; master weights stay float32), and why.

    bfloat16 autocast on a GPU with native bf16, as is standard there. Everywhere else float32, training's default
    before "auto" existed, even on CPUs where `auto_dtype` picks bf16: the models trained on CPUs here are small
    (the bundled Sudoku model), bf16 did not pay off for that model even at inference (2-3x slower on an Intel
    Xeon), and CPU autocast adds a cast around every matmul on top. float32 also keeps such runs reproducible
    against their recorded results. `--precision bfloat16` still asks for bf16 explicitly."""
    if device.type == "cuda" and _cuda_bf16(device):
        return torch.bfloat16, "bf16 autocast on CUDA"
    return torch.float32, f"float32 training on {device.type}"


def training_device(device: str | torch.device | None = "auto") -> torch.device:
    """Training's device: "auto" is this process's GPU (under torchrun the LOCAL_RANK-th), else the CPU."""
    return resolve_device(device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def resolve_training(device: str | torch.device | None = "auto", precision: str = "auto") -> Placement:
    """Training's device (`training_device`) and precision ("auto": see `auto_precision`). ValueError (one line)
    for a bad value."""
    dev = training_device(device)
    if precision == "auto":
        prec, why = auto_precision(dev)
        return Placement(dev, prec, _why_device(device, dev), why, label="precision")
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    return Placement(dev, DTYPES[precision], _why_device(device, dev), label="precision")
