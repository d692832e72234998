"""Where basque_jax keeps what it builds once: converted models, the demo tokenizer."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$BASQUE_JAX_CACHE`` or ``~/.cache/basque_jax``."""
    return Path(os.environ.get("BASQUE_JAX_CACHE", Path.home() / ".cache" / "basque_jax"))
