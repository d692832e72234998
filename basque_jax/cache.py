"""Where basque_jax keeps what it builds once: converted models, the demo tokenizer, compiled
XLA programs."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$BASQUE_JAX_CACHE`` or ``~/.cache/basque_jax``."""
    return Path(os.environ.get("BASQUE_JAX_CACHE", Path.home() / ".cache" / "basque_jax"))


def enable_compilation_cache(folder: str | Path | None = None) -> Path | None:
    """Keep compiled XLA programs on disk (``folder``, default ``$JAX_COMPILATION_CACHE_DIR``
    or ``default_cache_dir()/xla``), so that a restarted process loads them instead of
    compiling again; returns the folder. ``folder="none"`` leaves the cache off."""
    import jax

    if str(folder).lower() == "none":
        return None
    path = Path(folder or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                or default_cache_dir() / "xla")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from basque_jax.errors import ConfigError

        raise ConfigError(f"compilation cache {path}: cannot create it ({e.strerror})") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
