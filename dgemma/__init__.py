"""dgemma: a PyTorch runtime for DiffusionGemma block-diffusion language models."""

from .config import ConfigError, ModelConfig, TextConfig
from .model import DiffusionGemma
from .cache import KVCache
from .checkpoint import CheckpointError, load_model, save_model
from .params import SamplingParams
from .llm import LLM, CompletionOutput, RequestOutput

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
