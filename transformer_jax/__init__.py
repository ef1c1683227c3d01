"""transformer-jax: Transformer models (BERT, GPT-2, T5, the 2017 Transformer) in JAX and Flax NNX."""

from transformer_jax import attention
from transformer_jax.config import Config, ConfigError, ModelConfig, load_config
from transformer_jax.models import (
    Model,
    ModelOutput,
    abstract_build,
    build,
    count_params,
    published_params,
    scan_params,
    unscan_params,
)

__version__ = "0.1.0"
__all__ = [
    "Config",
    "ConfigError",
    "Model",
    "ModelConfig",
    "ModelOutput",
    "abstract_build",
    "attention",
    "build",
    "count_params",
    "load_config",
    "published_params",
    "scan_params",
    "unscan_params",
]


def __getattr__(name):  # heavy or optional submodules load on first use: tj.hf, tj.decoding, ...
    import importlib

    if name in ("hf", "decoding", "sharding", "checkpoint", "losses", "objectives", "finetune", "viz", "data"):
        return importlib.import_module(f"transformer_jax.{name}")
    raise AttributeError(f"module 'transformer_jax' has no attribute {name!r}")
