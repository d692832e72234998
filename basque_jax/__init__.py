"""basque_jax: teach Llama 3.x a low-resource language (Basque first) with JAX on TPU pods."""

from basque_jax.model import KVCache, Llama, LlamaConfig

__version__ = "0.1.0"

__all__ = ["KVCache", "Llama", "LlamaConfig", "load_pretrained", "save_pretrained"]


def __getattr__(name: str):
    if name in ("load_pretrained", "save_pretrained"):
        from basque_jax.model import hf

        return getattr(hf, name)
    raise AttributeError(name)
