"""Held-out loss and perplexity over a data source, through the training data pipeline.

One loss for both uses: the training loop's periodic ``eval_loss`` (on the live weights) and
``basque-jax eval --perplexity``. The batches are exactly those training would see (tokenizer,
chat template, loss masks, packing with no attention across documents) and the loss is the
trainer's (:func:`basque_jax.model.loss.batch_loss`): perplexity =
``exp(sum of target-token NLL / number of target tokens)`` over every batch (or
``max_batches``). A final partial batch is padded, so every record counts once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding

from basque_jax.data.batch import make_global_batch
from basque_jax.data.config import DataConfig, SourceConfig
from basque_jax.data.pipeline import make_pipeline, pipeline_stats
from basque_jax.data.tokenizer import Tokenizer
from basque_jax.distributed import all_processes_agree
from basque_jax.errors import UserError
from basque_jax.model.loss import batch_loss
from basque_jax.sharding import batch_sharding, use_sharding


def make_eval_fn(graphdef: nnx.GraphDef) -> Callable:
    """Jitted ``(params, frozen, batch) -> (nll_sum, tokens)``: no noise, no dropout."""

    def evaluate(params, frozen, batch):
        _, aux = batch_loss(nnx.merge(graphdef, params, frozen), batch)
        return aux["nll_sum"], aux["tokens"]

    return jax.jit(evaluate)


@dataclass
class HeldOutLoss:
    """Summed NLL and target tokens over some batches of a data source."""

    nll: float
    tokens: float
    batches: int
    data: dict[str, Any]

    @property
    def mean(self) -> float:
        return self.nll / max(self.tokens, 1.0)


def held_out_loss(eval_fn: Callable, params: Any, frozen: Any, data: DataConfig,
                  tokenizer: Tokenizer, sharding: NamedSharding, *,
                  max_batches: int | None = None) -> HeldOutLoss:
    """``eval_fn`` (:func:`make_eval_fn`) over ``data``'s batches (all, or ``max_batches``),
    each host feeding its own rows of every global batch; all hosts stop at the same batch."""
    it = make_pipeline(data, tokenizer, process_index=jax.process_index(),
                       process_count=jax.process_count())
    nll = tokens = 0.0
    batches = 0
    agreed = data.prepared is not None  # global batches: every host ends together
    while max_batches is None or batches < max_batches:
        local = next(it, None)
        more = local is not None
        if not (more if agreed else all_processes_agree(more)):  # no host left waiting
            break
        s, n = eval_fn(params, frozen, make_global_batch(local, sharding))
        nll, tokens, batches = nll + float(s), tokens + float(n), batches + 1
    return HeldOutLoss(nll, tokens, batches, pipeline_stats(it))


def perplexity_data(paths: list[str], *, kind: str = "corpus", seq_len: int = 2048,
                    batch_size: int = 8, tokenizer: str | None = None,
                    max_records: int | None = None) -> DataConfig:
    """A one-epoch config over files (order does not change the sums)."""
    sources = [SourceConfig(kind=kind, path=p, name=f"{i}:{p}", max_records=max_records)
               for i, p in enumerate(paths)]
    return DataConfig(sources=sources, seq_len=seq_len, batch_size=batch_size, epochs=1,
                      drop_remainder=False, tokenizer=tokenizer)


def evaluate_perplexity(model: nnx.Module, data: DataConfig, tokenizer: Tokenizer, *,
                        mesh, rules: dict | None = None,
                        max_batches: int | None = None) -> dict[str, Any]:
    """``{"perplexity", "nll", "tokens", "batches", "data"}`` of ``model`` on ``data``."""
    data = dataclasses.replace(data, epochs=1, drop_remainder=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    with use_sharding(mesh, rules):
        result = held_out_loss(make_eval_fn(graphdef), params, rest, data, tokenizer,
                               batch_sharding(mesh, rules), max_batches=max_batches)
    if result.tokens == 0:
        raise UserError("no target tokens in the evaluation data")
    return {"perplexity": math.exp(result.mean), "nll": result.mean,
            "tokens": int(result.tokens), "batches": result.batches, "data": result.data}
