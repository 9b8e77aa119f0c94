"""dgemma: a PyTorch runtime for DiffusionGemma block-diffusion language models."""

from dgemma.model.config import ConfigError, ModelConfig, TextConfig
from dgemma.model.modeling import DiffusionGemma
from dgemma.model.cache import KVCache
from dgemma.model.checkpoint import CheckpointError, load_model, save_model
from dgemma.engine.params import SamplingParams
from dgemma.entrypoints.llm import LLM, CompletionOutput, RequestOutput

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "ModelConfig",
    "TextConfig",
    "DiffusionGemma",
    "KVCache",
    "CheckpointError",
    "load_model",
    "save_model",
    "LLM",
    "SamplingParams",
    "CompletionOutput",
    "RequestOutput",
]
