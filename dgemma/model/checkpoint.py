"""Checkpoint I/O in the HF format: config.json + (sharded) safetensors + generation_config.json + tokenizer files.

Weights are read with safetensors only (never unpickled). The encoder and decoder stacks are tied in the HF model,
so a checkpoint may carry a weight under `model.decoder.*`, under `model.encoder.language_model.*`, or both; we
accept either and store it once. Vision-tower weights are skipped with one warning.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dgemma.model.config import ConfigError, ModelConfig
from dgemma.model.modeling import DiffusionGemma
from dgemma.model.quant import QUANTIZATIONS, quantize_fp8

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# HF key prefix -> our parameter name prefix. Encoder and decoder share every weight but the layer scalar buffers.
DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
SKIPPED = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
LM_HEAD = "lm_head.weight"
_ENC_SCALAR = re.compile(r"^layers\.(\d+)\.layer_scalar$")

# A tiny vision config written when a checkpoint has none, so that transformers (which always builds a vision
# tower) can load what we save without allocating a full-size one.
TINY_VISION = {
    "model_type": "gemma4_vision",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "patch_size": 4,
    "position_embedding_size": 8,
    "pooling_kernel_size": 1,
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or tensor at fault."""


def hf_to_ours(key: str) -> str | None:
    """Map an HF checkpoint key to our parameter name; None for keys we deliberately skip."""
    if key.startswith(SKIPPED):
        return None
    if key == LM_HEAD:  # tied to the embeddings: checked against them, not stored
        return "embed_tokens.weight"
    if key.startswith(DECODER):
        return key[len(DECODER) :]
    if key.startswith(ENCODER):
        rest = key[len(ENCODER) :]
        m = _ENC_SCALAR.match(rest)
        return f"layers.{m.group(1)}.encoder_layer_scalar" if m else rest
    raise CheckpointError(f"unexpected tensor {key!r}: not a DiffusionGemma text weight")


def ours_to_hf(name: str) -> str:
    m = re.match(r"^layers\.(\d+)\.encoder_layer_scalar$", name)
    return f"{ENCODER}layers.{m.group(1)}.layer_scalar" if m else DECODER + name


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (a single file, or the shards its index lists)."""
    single, index = path / WEIGHTS, path / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in {INDEX} are missing: {missing}")
        return [path / f for f in files]
    if single.exists():
        return [single]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path} has only pickle weights (.bin/.pt); dgemma loads safetensors only")
    raise CheckpointError(f"{path} has no {WEIGHTS} or {INDEX}")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """All text weights of a checkpoint under our names (skipping vision weights, warning once)."""
    state: dict[str, torch.Tensor] = {}
    skipped = 0
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    name = hf_to_ours(key)
                    if name is None:
                        skipped += key.startswith(SKIPPED[:2])
                        continue
                    t = fh.get_tensor(key)
                    # Encoder, decoder (and LM head) copies are tied: store once, refuse copies that differ.
                    if name in state:
                        if state[name].shape != t.shape or not torch.equal(state[name], t):
                            raise CheckpointError(
                                f"{f}: {key} differs from its tied copy; dgemma needs the encoder, "
                                "decoder and LM head weights tied"
                            )
                        continue
                    state[name] = t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f} is truncated or corrupt: {e}") from None
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} vision-tower tensors (dgemma runs the text model only)", stacklevel=3)
    return state


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path} has no config.json")
    return ModelConfig.from_json_file(cfg)


def load_generation_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "generation_config.json"
    if not f.exists():
        return {}
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{f} must contain a JSON object")
    return d


# Models shipped inside the package, by name: `LLM(model="sudoku")` needs no download.
BUNDLED_MODELS = {name: Path(__file__).resolve().parent.parent / "models" / name for name in ("sudoku", "sudoku-ar")}


def resolve_model_path(model: str | Path) -> Path:
    """A checkpoint directory for `model`: an existing path, else a bundled model's name."""
    path = Path(model)
    if not path.exists() and str(model) in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[str(model)]
        if not (bundled / "config.json").is_file():
            raise CheckpointError(f"the bundled model {model!r} is missing from this installation ({bundled})")
        return bundled
    return path


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantization: str | None = None,
) -> DiffusionGemma:
    """Build the model described by `path/config.json` and fill it from the safetensors weights.

    `quantization="fp8"`: FP8 dense and expert weights (see `quant.py`), quantized at load from a bf16 checkpoint,
    or read as they are from a checkpoint saved in FP8 (config `quantization_config.quant_method == "fp8"`, which
    implies it). Either needs `dtype=torch.bfloat16`.
    """
    path = Path(path)
    config, quantization = checked_config(path, quantization, dtype)
    saved_fp8 = saved_in_fp8(config)
    state = read_state(path)
    with torch.device("meta"):
        model = DiffusionGemma(config)
    model = model.to_empty(device=device).to(dtype)
    model.init_buffers()
    if saved_fp8:  # the FP8 layout first (its values are overwritten below)
        quantize_fp8(model)
    expected = model.state_dict(keep_vars=True)  # parameters, layer scalars, and FP8 weights with their scales
    # The encoder and decoder scalars are separate buffers; a checkpoint with only one of them uses it for both.
    for i in range(config.text.num_hidden_layers):
        dec, enc = f"layers.{i}.layer_scalar", f"layers.{i}.encoder_layer_scalar"
        if dec in state and enc not in state:
            state[enc] = state[dec]
        elif enc in state and dec not in state:
            state[dec] = state[enc]
        elif enc not in state and dec not in state:
            state[enc] = state[dec] = torch.ones(1)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: tensors not in the model described by config.json: {unexpected[:8]}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    with torch.no_grad():
        for name, target in expected.items():
            t = state[name]
            if tuple(t.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{path}: tensor {ours_to_hf(name)} has shape {tuple(t.shape)} but config.json "
                    f"implies {tuple(target.shape)}"
                )
            if not (t.is_floating_point()):
                raise CheckpointError(f"{path}: tensor {ours_to_hf(name)} has non-float dtype {t.dtype}")
            target.copy_(t.to(target.dtype))
    if quantization == "fp8" and not saved_fp8:
        quantize_fp8(model)
    return model.eval()


def checked_config(path: Path, quantization: str | None, dtype: torch.dtype) -> tuple[ModelConfig, str | None]:
    """The checkpoint's config, refused where dgemma cannot run it, and the quantization to load with."""
    config = load_config(path)
    if config.extra.get("tie_word_embeddings") is False:
        raise CheckpointError(f"{path}: tie_word_embeddings=false (untied encoder/decoder/LM head) is not supported")
    return config, _check_quantization(quantization, saved_in_fp8(config), dtype, path)


def saved_in_fp8(config: ModelConfig) -> bool:
    """Whether the checkpoint holds FP8 weights (config `quantization_config.quant_method == "fp8"`)."""
    return (config.extra.get("quantization_config") or {}).get("quant_method") == "fp8"


def _check_quantization(quantization: str | None, saved_fp8: bool, dtype: torch.dtype, path: Path) -> str | None:
    """The quantization to load with, or CheckpointError for a combination that cannot work."""
    if quantization not in (None, *QUANTIZATIONS):
        raise CheckpointError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    quantization = "fp8" if saved_fp8 else quantization
    if quantization == "fp8" and dtype != torch.bfloat16:
        raise CheckpointError(
            f"{path}: FP8 weights run with bfloat16 activations; load with dtype bfloat16, not "
            f"{str(dtype).replace('torch.', '')}"
        )
    return quantization


def write_metadata(
    model: DiffusionGemma,
    path: Path,
    generation_config: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
) -> None:
    """Everything of an HF-format checkpoint directory but the weights: config.json (the vision config transformers
    needs), generation_config.json and the tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf_dict()
    cfg.setdefault("vision_config", dict(TINY_VISION))
    if cfg.get("vision_config") is None:
        cfg["vision_config"] = dict(TINY_VISION)
    cfg["dtype"] = str(model.dtype).replace("torch.", "")
    if getattr(model, "quantization", None) == "fp8":
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_scale": "per output channel, float32",
        }
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = dict(generation_config or {})
    text = model.config.text
    for k in ("bos_token_id", "pad_token_id", "eos_token_id"):
        gen.setdefault(k, getattr(text, k))
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / f
            if src.exists() and src.resolve() != (path / f).resolve():
                shutil.copy(src, path / f)


def save_model(
    model: DiffusionGemma,
    path: str | Path,
    generation_config: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write `model` as an HF-format checkpoint directory that both dgemma and transformers load."""
    path = Path(path)
    write_metadata(model, path, generation_config, tokenizer_dir)
    tensors = {ours_to_hf(n): t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    for old in [path / WEIGHTS, path / INDEX, *path.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, str(path / WEIGHTS), metadata=meta)
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k in sorted(tensors):
            nb = tensors[k].numel() * tensors[k].element_size()
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = tensors[k]
            size += nb
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


__all__ = [
    "CheckpointError",
    "ConfigError",
    "load_model",
    "save_model",
    "write_metadata",
    "weight_files",
    "load_config",
    "load_generation_config",
    "read_state",
    "hf_to_ours",
    "ours_to_hf",
]
