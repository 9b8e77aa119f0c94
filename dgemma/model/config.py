"""Model configuration: plain dataclasses that read and write the HF `diffusion_gemma` config.json format.

Every field is validated when a config is built, and an error names the field (`text_config.head_dim`), so a
malformed checkpoint fails at load time with a message a user can act on, never deep inside a forward pass.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ARCHITECTURES = ("DiffusionGemmaForBlockDiffusion",)
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu")
ROPE_TYPES = ("default", "proportional")


class ConfigError(ValueError):
    """A config that cannot describe a DiffusionGemma model; the message names the offending field."""


def _default_rope() -> dict[str, dict[str, Any]]:
    return {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }


@dataclass
class TextConfig:
    """The Gemma 4 text stack shared by the encoder and the decoder (HF `DiffusionGemmaTextConfig`)."""

    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    # Full-attention layers have their own head_dim and kv-head count (HF stores them in `per_layer_config`).
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    sliding_window: int = 512
    layer_types: list[str] | None = None
    rope_parameters: dict[str, dict[str, Any]] | None = None
    final_logit_softcapping: float | None = 30.0
    attention_bias: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    initializer_range: float = 0.02
    use_bidirectional_attention: str | None = None

    def __post_init__(self) -> None:
        if self.layer_types is None:
            # Gemma 4 default: five sliding layers, then one full layer.
            self.layer_types = [
                "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(self.num_hidden_layers)
            ]
            self.layer_types[-1] = "full_attention"
        if self.rope_parameters is None:
            self.rope_parameters = _default_rope()
        self.validate()

    # -- per-layer geometry -------------------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        if self.is_sliding(layer) or self.num_global_key_value_heads is None:
            return self.num_key_value_heads
        return self.num_global_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """ConfigError naming the first invalid field: sizes, then layers, then the remaining values."""
        self._validate_sizes()
        self._validate_layers()
        self._validate_values()

    def _need_int(self, name: str, minimum: int = 1) -> None:
        v = getattr(self, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ConfigError(f"text_config.{name} must be an integer >= {minimum}, got {v!r}")

    def _validate_sizes(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "global_head_dim",
            "sliding_window",
            "max_position_embeddings",
        ):
            self._need_int(name)
        for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if getattr(self, name) is None:
                raise ConfigError(f"text_config.{name} is missing: DiffusionGemma layers always have an MoE branch")
            self._need_int(name)
        if self.top_k_experts > self.num_experts:
            raise ConfigError(
                f"text_config.top_k_experts ({self.top_k_experts}) exceeds num_experts ({self.num_experts})"
            )
        if self.num_global_key_value_heads is not None:
            self._need_int("num_global_key_value_heads")

    def _validate_layers(self) -> None:
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"text_config.layer_types must list {self.num_hidden_layers} layer types, got {self.layer_types!r}"
            )
        bad = [t for t in self.layer_types if t not in ("sliding_attention", "full_attention")]
        if bad:
            raise ConfigError(f"text_config.layer_types has unknown layer type(s) {sorted(set(bad))}")
        if self.layer_types[-1] != "full_attention":
            raise ConfigError("text_config.layer_types: the last layer must be full_attention (as in Gemma 4)")
        for i in range(self.num_hidden_layers):
            kv = self.layer_kv_heads(i)
            if self.num_attention_heads % kv:
                raise ConfigError(
                    f"text_config: layer {i} has {kv} kv heads, which does not divide num_attention_heads "
                    f"({self.num_attention_heads})"
                )

    def _validate_values(self) -> None:
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(f"text_config.hidden_activation {self.hidden_activation!r} is not one of {ACTIVATIONS}")
        if not isinstance(self.rope_parameters, dict):
            raise ConfigError("text_config.rope_parameters must be a mapping from layer type to RoPE parameters")
        for lt in set(self.layer_types):
            rp = self.rope_parameters.get(lt)
            if not isinstance(rp, dict) or "rope_theta" not in rp:
                raise ConfigError(f"text_config.rope_parameters[{lt!r}] must be a mapping with rope_theta")
            if rp.get("rope_type", "default") not in ROPE_TYPES:
                raise ConfigError(
                    f"text_config.rope_parameters[{lt!r}].rope_type {rp.get('rope_type')!r} is not one of {ROPE_TYPES}"
                )
        if self.use_bidirectional_attention == "all":
            raise ConfigError("text_config.use_bidirectional_attention='all' (a non-causal encoder) is not supported")
        if not isinstance(self.rms_norm_eps, (int, float)) or not self.rms_norm_eps > 0:
            raise ConfigError(f"text_config.rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if self.final_logit_softcapping is not None and not (
            isinstance(self.final_logit_softcapping, (int, float)) and self.final_logit_softcapping > 0
        ):
            raise ConfigError(
                f"text_config.final_logit_softcapping must be positive or null, got {self.final_logit_softcapping!r}"
            )
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 0 <= v < self.vocab_size):
                raise ConfigError(f"text_config.{name}={v!r} is outside the vocabulary [0, {self.vocab_size})")
        for e in self.eos_token_ids:
            if not (isinstance(e, int) and 0 <= e < self.vocab_size):
                raise ConfigError(f"text_config.eos_token_id={e!r} is outside the vocabulary [0, {self.vocab_size})")

    # -- HF json -----------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "TextConfig":
        if not isinstance(d, dict):
            raise ConfigError("text_config must be a JSON object")
        d = dict(d)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        layer_types = kwargs.get("layer_types")
        if layer_types is not None and (
            not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types)
        ):
            raise ConfigError(f"text_config.layer_types must be a list of layer type names, got {layer_types!r}")
        n_layers = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
        # HF serialises the full-layer overrides as `per_layer_config: {"<idx>": {"head_dim": .., ...}}`.
        plc = d.get("per_layer_config") or {}
        if not isinstance(plc, dict):
            raise ConfigError("text_config.per_layer_config must be a mapping from layer index to overrides")
        full_dims, full_kv = set(), set()
        for idx, over in plc.items():
            try:
                i = int(idx)
            except (TypeError, ValueError):
                raise ConfigError(f"text_config.per_layer_config has a non-integer layer index {idx!r}") from None
            if not isinstance(n_layers, int) or not 0 <= i < n_layers or not isinstance(over, dict):
                raise ConfigError(f"text_config.per_layer_config[{idx!r}] is not a valid layer override")
            if layer_types is not None and i < len(layer_types) and layer_types[i] != "full_attention":
                raise ConfigError(
                    f"text_config.per_layer_config overrides sliding layer {i}; only full-attention layers may differ"
                )
            unknown = set(over) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ConfigError(f"text_config.per_layer_config[{idx!r}] has unsupported keys {sorted(unknown)}")
            if "head_dim" in over:
                full_dims.add(over["head_dim"])
            if "num_key_value_heads" in over:
                full_kv.add(over["num_key_value_heads"])
        if len(full_dims) > 1 or len(full_kv) > 1:
            raise ConfigError(
                "text_config.per_layer_config: all full-attention layers must share head_dim and num_key_value_heads"
            )
        if "per_layer_config" in d and "global_head_dim" not in kwargs:
            # Full layers without a head_dim override use the global head_dim (transformers omits equal values).
            base = kwargs.get("head_dim", cls.head_dim)
            full = [
                i
                for i, t in enumerate(layer_types or [])
                if t == "full_attention" and isinstance(n_layers, int) and i < n_layers
            ]
            dims = {plc.get(str(i), plc.get(i, {})).get("head_dim", base) for i in full} or full_dims or {base}
            if len(dims) > 1:
                raise ConfigError("text_config.per_layer_config: all full-attention layers must share head_dim")
            kwargs["global_head_dim"] = dims.pop()
        elif full_dims:
            kwargs["global_head_dim"] = full_dims.pop()
        if full_kv:
            kwargs["num_global_key_value_heads"] = full_kv.pop()
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - defensive: dataclass signature mismatch
            raise ConfigError(f"text_config: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("global_head_dim", "num_global_key_value_heads"):
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        over: dict[str, Any] = {"head_dim": self.global_head_dim}
        if self.num_global_key_value_heads is not None:
            over["num_key_value_heads"] = self.num_global_key_value_heads
        out["per_layer_config"] = {str(i): dict(over) for i, t in enumerate(self.layer_types) if t == "full_attention"}
        out["model_type"] = "diffusion_gemma_text"
        out["tie_word_embeddings"] = True
        return out

    def num_parameters(self) -> int:
        """Parameter count of the shared text stack plus self-conditioning (embeddings counted once)."""
        h, n = self.hidden_size, 0
        for i in range(self.num_hidden_layers):
            hd, kv = self.layer_head_dim(i), self.layer_kv_heads(i)
            n += h * self.num_attention_heads * hd * 2 + h * kv * hd * (2 if self.is_sliding(i) else 1)
            n += 3 * h * self.intermediate_size
            n += self.num_experts * 3 * h * self.moe_intermediate_size + h * self.num_experts
        n += self.vocab_size * h + 3 * h * self.intermediate_size
        return n


@dataclass
class ModelConfig:
    """The whole checkpoint config (HF `DiffusionGemmaConfig`): text stack, canvas length, extras kept verbatim."""

    text: TextConfig = field(default_factory=TextConfig)
    canvas_length: int = 256
    # Keys we do not interpret (vision_config, image token ids, ...) are kept so a save round-trips them.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.canvas_length, int) or isinstance(self.canvas_length, bool) or self.canvas_length < 1:
            raise ConfigError(f"canvas_length must be a positive integer, got {self.canvas_length!r}")

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json must contain a JSON object")
        archs = d.get("architectures")
        if archs is not None and not any(a in ARCHITECTURES for a in archs):
            raise ConfigError(f"architectures {archs} is not supported; dgemma loads {list(ARCHITECTURES)}")
        mt = d.get("model_type")
        if mt is not None and mt != "diffusion_gemma":
            raise ConfigError(f"model_type {mt!r} is not supported; expected 'diffusion_gemma'")
        if "text_config" not in d:
            raise ConfigError("config.json has no text_config")
        text = TextConfig.from_hf_dict(d["text_config"])
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in ("text_config", "canvas_length")}
        return cls(text=text, canvas_length=d.get("canvas_length", 256), extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in self.extra.items() if k not in ("transformers_version", "dtype")}
        out.update(
            {
                "architectures": ["DiffusionGemmaForBlockDiffusion"],
                "model_type": "diffusion_gemma",
                "text_config": self.text.to_hf_dict(),
                "canvas_length": self.canvas_length,
                "tie_word_embeddings": True,
            }
        )
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)


@dataclass(frozen=True)
class TokenIds:
    """The special token ids that generation and training use, from one policy (`token_ids`)."""

    pad: int
    eos: tuple[int, ...]  # the config's EOS ids first (training appends the first), then generation_config's

    @property
    def eos_set(self) -> set[int]:
        return set(self.eos)


def token_ids(text: TextConfig, generation_config: dict[str, Any] | None = None) -> TokenIds:
    """EOS: text_config's eos_token_id(s), plus generation_config.json's. Pad: pad_token_id, else the smallest of
    the config's EOS ids (a token the model already ends on), else 0."""
    g = (generation_config or {}).get("eos_token_id")
    extra = [] if g is None else list(g) if isinstance(g, (list, tuple)) else [g]
    eos = tuple(dict.fromkeys(list(text.eos_token_ids) + [int(e) for e in extra]))
    own = text.eos_token_ids
    pad = text.pad_token_id if text.pad_token_id is not None else min(own) if own else 0
    return TokenIds(int(pad), eos)


def tiny_config(**overrides: Any) -> ModelConfig:
    """A small random-weights config for tests, demos and benchmarks (text fields and `canvas_length`)."""
    canvas = overrides.pop("canvas_length", 16)
    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        sliding_window=8,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    text.update(overrides)
    return ModelConfig(text=TextConfig(**text), canvas_length=canvas)


def sized_config(n_params: float, vocab_size: int = 32_768, canvas_length: int = 256) -> ModelConfig:
    """A Gemma-4-shaped config with roughly `n_params` parameters (for benchmarks on random weights)."""
    best = None
    for hidden in (256, 384, 512, 640, 768, 1024, 1280, 1536):
        heads = max(2, hidden // 64)
        for layers in range(2, 49):
            types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
            types[-1] = "full_attention"
            t = TextConfig(
                vocab_size=vocab_size,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2),
                head_dim=64,
                global_head_dim=128,
                num_global_key_value_heads=max(1, heads // 4),
                sliding_window=512,
                num_experts=8,
                top_k_experts=2,
                moe_intermediate_size=hidden // 2,
                layer_types=types,
                max_position_embeddings=131_072,
            )
            err = abs(math.log(t.num_parameters() / n_params))
            if best is None or err < best[0]:
                best = (err, t)
    assert best is not None
    return ModelConfig(text=best[1], canvas_length=canvas_length)
