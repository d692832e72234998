"""Llama 3.x model: config, NNX modules, Hugging Face weights I/O."""

from basque_jax.model.config import ConfigError, LlamaConfig, RopeScaling
from basque_jax.model.llama import Llama

__all__ = ["ConfigError", "Llama", "LlamaConfig", "RopeScaling"]
