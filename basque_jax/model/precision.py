"""Float32 compute means float32 matmuls, on every backend.

JAX's default precision computes a float32 matmul with TF32 inputs on recent NVIDIA GPUs and
with one bfloat16 pass on TPU; torch (and so transformers, peft and lm-eval's ``hf`` backend)
keeps float32. A model built with ``dtype=float32`` (parity checks, evaluation against the
study's harness) therefore asks for ``HIGHEST`` at every matmul; bfloat16 compute keeps the
backend's default, which is already exact for bfloat16 operands. CPUs always compute float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def matmul_precision(dtype: Any) -> jax.lax.Precision | None:
    """``HIGHEST`` for float32 / float64 compute, else ``None`` (the backend's default)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None


def matmul(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """``x @ w`` with both operands cast to the compute ``dtype``, at its precision."""
    return jnp.matmul(x.astype(dtype), w.astype(dtype), precision=matmul_precision(dtype))


def _default_precision_scope(dtype: Any) -> contextlib.AbstractContextManager:
    precision = matmul_precision(dtype)
    return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(
        precision.name.lower())


def at_precision_of(dtype: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a library kernel whose matmuls take no precision: ``jax.nn.dot_product_attention``,
    a Pallas kernel) with its forward and its backward traced at ``dtype``'s precision. A scope
    around the call alone would miss the backward of a kernel with its own ``custom_vjp``: it
    is traced when the gradient is."""
    if matmul_precision(dtype) is None:
        return fn

    @jax.custom_vjp
    def run(*args):
        with _default_precision_scope(dtype):
            return fn(*args)

    def forward(*args):
        with _default_precision_scope(dtype):
            return jax.vjp(fn, *args)

    def backward(pullback, grad):
        with _default_precision_scope(dtype):
            return pullback(grad)

    run.defvjp(forward, backward)
    return run
