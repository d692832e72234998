"""Held-out perplexity over a data source, through the training data pipeline.

The batches are exactly those training would see (tokenizer, chat template, loss masks,
packing with no attention across documents), and the loss is the trainer's
(:func:`basque_jax.train.step.make_eval_fn` → ``masked_cross_entropy``): perplexity =
``exp(sum of target-token NLL / number of target tokens)`` over every batch (or
``max_batches``). A final partial batch is padded, so every record counts once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from basque_jax.data.batch import batch_spec, make_global_batch
from basque_jax.data.config import DataConfig, SourceConfig
from basque_jax.data.pipeline import make_pipeline, pipeline_stats
from basque_jax.data.tokenizer import Tokenizer
from basque_jax.sharding import use_sharding
from basque_jax.train.step import make_eval_fn


def perplexity_data(paths: list[str], *, kind: str = "corpus", seq_len: int = 2048,
                    batch_size: int = 8, tokenizer: str | None = None,
                    max_records: int | None = None) -> DataConfig:
    """A one-epoch, unshuffled-by-design (order does not change the sums) config over files."""
    sources = [SourceConfig(kind=kind, path=p, name=f"{i}:{p}", max_records=max_records)
               for i, p in enumerate(paths)]
    return DataConfig(sources=sources, seq_len=seq_len, batch_size=batch_size, epochs=1,
                      drop_remainder=False, tokenizer=tokenizer)


def evaluate_perplexity(model: nnx.Module, data: DataConfig, tokenizer: Tokenizer, *,
                        max_batches: int | None = None, mesh: Mesh | None = None,
                        rules: dict | None = None) -> dict[str, Any]:
    """``{"perplexity", "nll", "tokens", "batches", "data"}`` of ``model`` on ``data``."""
    data = dataclasses.replace(data, epochs=1, drop_remainder=False)
    it = make_pipeline(data, tokenizer, process_index=jax.process_index(),
                       process_count=jax.process_count())
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_fn = jax.jit(make_eval_fn(graphdef))
    sharding = NamedSharding(mesh, batch_spec(mesh)) if mesh is not None else None
    nll = tokens = 0.0
    batches = 0
    while max_batches is None or batches < max_batches:
        try:
            local = next(it)
        except StopIteration:
            break
        if sharding is not None:
            batch = make_global_batch(local, sharding)
            with use_sharding(mesh, rules):
                s, n = eval_fn(params, rest, batch)
        else:
            s, n = eval_fn(params, rest, {k: jax.numpy.asarray(v) for k, v in local.items()})
        nll, tokens, batches = nll + float(s), tokens + float(n), batches + 1
    if tokens == 0:
        raise ValueError("no target tokens in the evaluation data")
    mean = nll / tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": int(tokens),
            "batches": batches, "data": pipeline_stats(it)}
