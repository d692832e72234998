"""Batched KV-cache sampling with continuous batching, compiled end to end.

A :class:`Sampler` owns ``batch_size`` row slots over one preallocated KV cache (a per-layer
:class:`~basque_jax.model.decode.SlotCache`; the model's modules run through
:func:`~basque_jax.model.decode.forward`). Two compiled programs move a :class:`DecodeState`
(cache + per-row bookkeeping), donated to each so the cache is updated in place, each on a
window of it (:mod:`basque_jax.sample.windows`: the rows and cache slots in use):

* ``prefill_rows`` -- prefill prompts (right-padded with segment id 0 to a power-of-two
  bucket, explicit positions) into consecutive rows -- all waiting prompts when every slot is
  free, else one into a freed slot while the others run -- and sample their first tokens;
* ``decode`` -- up to ``steps`` one-token steps in a ``jax.lax.while_loop`` (no Python per
  token): forward with the cache, select tokens, record them, finish rows on a stop id or their
  token budget; it exits early when every row is done.

:meth:`Sampler.stream` is the host loop: refill finished rows with waiting requests, run a
chunk of decode steps, hand back finished completions. Shapes come from a few buckets (prompt
widths, windows, sampling modes; :meth:`Sampler.warm_up` compiles the decode windows ahead).
Each row samples from its own key (request seed, token counter), so a request's output does
not depend on which other requests share its batch.

On a mesh (``mesh=``) rows are split over the batch axes and weights stay where training put
them (tensor-parallel heads, FSDP); the model's activation constraints apply as in training.
:meth:`Sampler.lower_decode` gives the decode program for ahead-of-time compilation (the
decode memory ``basque-jax plan`` reports).
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from basque_jax.errors import UserError
from basque_jax.model.decode import (
    CACHE_K_AXES,
    CACHE_V_AXES,
    SlotCache,
    forward,
    init_slot_cache,
    make_unstacker,
    slice_layers,
)
from basque_jax.model.llama import Llama
from basque_jax.model.lora import has_lora
from basque_jax.sample.requests import (
    Completion,
    PromptTooLong,
    Request,
    SamplerConfig,
    bucket,
    completion_of,
    row_arrays,
)
from basque_jax.sample.sampling import (
    RowParams,
    SamplingParams,
    SortMode,
    row_keys,
    select_tokens,
    sort_mode,
)
from basque_jax.sample.windows import (
    WINDOW_MIN,
    busy_rows,
    decode_window,
    ladder,
    put_window,
    rows_for,
    take_window,
)
from basque_jax.sharding import (
    DEFAULT_RULES,
    MeshAxes,
    ShardingContext,
    batch_shards,
    to_host,
    use_sharding,
)


class DecodeState(NamedTuple):
    """Everything the compiled programs carry, ``[batch, ...]`` per row besides the cache."""

    cache: SlotCache
    last: jax.Array  # next token to feed
    done: jax.Array  # row finished (or empty)
    n_out: jax.Array  # tokens generated so far
    out: jax.Array  # [batch, max_len] generated ids
    seeds: jax.Array  # uint32 request seeds
    params: RowParams
    max_new: jax.Array
    stops: jax.Array  # [batch, max_stop_ids], -1 padded


class Sampler:
    """Generates completions for token prompts with a (possibly LoRA-adapted) Llama.

    Args:
      model: the model; or give ``graphdef`` and ``params`` (states that ``nnx.merge`` takes,
        e.g. a training run's trainable and frozen parameters; ``ShapeDtypeStruct`` s for
        :meth:`lower_decode`).
      config: row slots, cache length, refill chunk, stop-id capacity (:class:`SamplerConfig`).
      mesh / rules: shard rows over the batch axes (weights keep their own placement).
    """

    def __init__(self, model: Llama | None = None, config: SamplerConfig | None = None, *,
                 graphdef: nnx.GraphDef | None = None, params: Sequence[Any] | None = None,
                 mesh: Mesh | None = None, rules: Mapping[str, MeshAxes] | None = None):
        cfg = config or SamplerConfig()
        if model is not None:
            graphdef, *params = nnx.split(model)
        if graphdef is None or not params:
            raise ValueError("Sampler needs a model, or graphdef and params")
        self.graphdef = graphdef
        self.unstack = jax.default_backend() == "cpu" if cfg.unstack is None else cfg.unstack
        self.set_params(*params)
        abstract = nnx.merge(graphdef, *self.params)
        self.config = abstract.config
        self.vocab_size = self.config.vocab_size
        self.cache_dtype = jnp.dtype(cfg.cache_dtype or abstract.dtype)
        self.ctx = ShardingContext(mesh, dict(DEFAULT_RULES if rules is None else rules)) \
            if mesh is not None else None
        rows = 1 if self.ctx is None else batch_shards(self.ctx.mesh, self.ctx.rules)
        self.batch_size = int(math.ceil(cfg.batch_size / rows) * rows)
        self.max_len = cfg.max_len
        self.prompt_buckets = cfg.prompt_buckets
        self.chunk_steps = cfg.chunk_steps
        self.adaptive = cfg.adaptive
        self.row_windows = cfg.adaptive and rows == 1  # rows split over devices: all of them
        self.max_stop_ids = cfg.max_stop_ids
        self._init = jax.jit(self._init_fn, out_shardings=self._state_shardings())
        donate = dict(donate_argnums=1, out_shardings=self._state_shardings())
        self._prefill_rows = jax.jit(self._prefill_rows_fn, static_argnames="mode", **donate)
        self._decode = jax.jit(self._decode_fn, static_argnames=("mode", "rows", "length"),
                               **donate)
        self._finish = jax.jit(lambda s, rows: s._replace(done=s.done | rows),
                               donate_argnums=0, out_shardings=self._state_shardings())

    # ------------------------------------------------------------------ public
    def set_params(self, *params: Any) -> None:
        """Use these weights from now on (same structure; e.g. after a training step).

        With ``unstack`` the layer weights are copied once into per-layer arrays here.
        """
        self.params = tuple(params)
        model = nnx.merge(self.graphdef, *self.params)
        self.layer_graphdef, stacked = nnx.split(model.layers)
        n = jax.tree.leaves(stacked)[0].shape[0]
        self.layers = self.fused = None
        if not self.unstack:
            return
        leaves, treedef = jax.tree.flatten(stacked)
        key = (treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
        if getattr(self, "_unstacker_key", None) != key:  # compiled once per weight layout
            kernel = model.layers.self_attn.q_proj.kernel[...]
            spec = getattr(getattr(kernel, "sharding", None), "spec", ())
            split_out = len(spec) == kernel.ndim and spec[-1] is not None
            fuse = not has_lora(model) and not split_out  # adapters / tensor-split outputs
            self._unstacker = make_unstacker(self.layer_graphdef, stacked, n, fuse=fuse)
            self._unstacker_key = key
        self.layers, self.fused = self._unstacker(stacked)

    def generate(self, requests: Sequence[Request] | Sequence[Sequence[int]],
                 params: SamplingParams | None = None) -> list[Completion]:
        """Completions for ``requests`` (or bare prompts with ``params``), in order."""
        reqs = [r if isinstance(r, Request) else Request(list(r), params or SamplingParams())
                for r in requests]
        tagged = collections.deque(Request(r.prompt, r.params, r.seed, i)
                                   for i, r in enumerate(reqs))
        results: list[Completion | None] = [None] * len(reqs)
        for req, completion in self.stream(tagged, drain=True):
            results[req.tag] = completion
        return results  # type: ignore[return-value]

    def stream(self, pending: collections.deque, *, drain: bool = False,
               watch: Callable[[Request, list[int]], bool] | None = None
               ) -> Iterator[tuple[Request, Completion]]:
        """Continuous batching over the ``pending`` queue of :class:`Request` s.

        Yields ``(request, completion)`` as rows finish; the caller may append to ``pending``
        between yields (e.g. a response request for each finished instruction). With ``drain``
        the last requests run to completion in as few calls as the shrinking window allows
        (one without ``adaptive``) instead of ``chunk_steps`` chunks.
        ``watch(request, tokens so far)`` is called for every running row after each chunk of
        decode steps (to stream tokens, or to stop on a string); returning True ends the row
        there (finish reason ``"stop"``, its tokens as generated so far).
        """
        slots: list[Request | None] = [None] * self.batch_size
        n_out = np.zeros(self.batch_size, np.int32)
        with self._sharding():
            state = self._init()
            while True:
                free = [i for i, r in enumerate(slots) if r is None]
                if pending and len(free) == self.batch_size:
                    batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                    state = self._fill_all(state, batch)
                    slots[:len(batch)] = batch
                    n_out[:] = 1
                elif pending:
                    for slot in free:
                        if not pending:
                            break
                        req = pending.popleft()
                        state = self._fill_row(state, slot, req)
                        slots[slot] = req
                        n_out[slot] = 1
                active = [r for r in slots if r is not None]
                if not active:
                    return
                steps = None if (drain and not pending) else self.chunk_steps
                mode = sort_mode([r.params for r in active], self.vocab_size)
                rows, length, steps = self._window(slots, n_out, steps)
                state = self._decode(self._weights(), state, jnp.int32(steps), mode=mode,
                                     rows=rows, length=length)
                done, n_out, out = to_host((state.done, state.n_out, state.out))
                n_out = np.array(n_out)  # writable: refilled rows restart at 1
                stopped = np.zeros(self.batch_size, bool)
                for slot, req in enumerate(slots):
                    if req is None:
                        continue
                    tokens = out[slot, :n_out[slot]]
                    if not done[slot] and watch is not None and watch(req, tokens.tolist()):
                        stopped[slot] = True
                        slots[slot] = None
                        yield req, Completion([int(t) for t in tokens], "stop")
                    elif done[slot]:
                        slots[slot] = None
                        if watch is not None:
                            watch(req, tokens.tolist())
                        yield req, completion_of(tokens, req.params)
                if stopped.any():
                    state = self._finish(state, jnp.asarray(stopped))

    def windows(self) -> list[tuple[int, int]]:
        """Every ``(rows, cache length)`` a decode chunk can run on (see :meth:`_window`)."""
        if not self.adaptive:
            return [(self.batch_size, self.max_len)]
        rows = ladder(1, self.batch_size) if self.row_windows else [self.batch_size]
        return [(r, n) for r in rows for n in ladder(WINDOW_MIN, self.max_len)]

    def warm_up(self, modes: Sequence[SortMode] = ("greedy",)) -> int:
        """Compile the decode chunk for every window and sampling mode now (a server's
        start-up), instead of at a window's first use; returns the number of programs."""
        with self._sharding():
            state = self._init()
            for mode in modes:
                for rows, length in self.windows():
                    state = self._decode(self._weights(), state, jnp.int32(0), mode=mode,
                                         rows=rows, length=length)
            jax.block_until_ready(state)
        return len(modes) * len(self.windows())

    # ------------------------------------------------------------------ host helpers
    def check(self, req: Request) -> None:
        """UserError (:class:`PromptTooLong` for length) if ``req`` cannot run here."""
        n, p = len(req.prompt), req.params
        if n == 0:
            raise UserError("empty prompt")
        if n + p.max_new_tokens > self.max_len:
            raise PromptTooLong(f"prompt of {n} tokens + max_new_tokens {p.max_new_tokens} "
                                f"exceeds the sampler's max_len {self.max_len}")
        if len(p.stop_ids) > self.max_stop_ids:
            raise UserError(f"{len(p.stop_ids)} stop ids; the sampler allows "
                             f"{self.max_stop_ids} (max_stop_ids)")
        bad = [t for t in [*req.prompt, *p.stop_ids] if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")

    def _window(self, slots: Sequence[Request | None], n_out: np.ndarray, steps: int | None
                ) -> tuple[int, int, int]:
        """The rows, cache length and steps of the next decode chunk
        (:func:`~basque_jax.sample.windows.decode_window`; the whole batch and cache without
        ``adaptive``, all rows when they are split over devices)."""
        busy = [int(i) for i in busy_rows(slots)]
        reqs = [slots[i] for i in busy]
        rows, length, steps = decode_window(
            [len(r.prompt) for r in reqs], [int(n_out[i]) for i in busy],
            [r.params.max_new_tokens for r in reqs], busy,
            steps if self.adaptive or steps is not None else self.max_len,
            batch_size=self.batch_size, max_len=self.max_len, chunk_steps=self.chunk_steps)
        if not self.adaptive:
            return self.batch_size, self.max_len, steps
        return rows if self.row_windows else self.batch_size, length, steps

    def _fill_all(self, state: DecodeState, batch: list[Request]) -> DecodeState:
        """Prefill ``batch`` into rows 0, 1, ... (every row free): as many rows as the
        smallest power of two that holds them (all rows without ``row_windows``)."""
        for r in batch:
            self.check(r)
        width = bucket(max(len(r.prompt) for r in batch), self.max_len, self.prompt_buckets)
        n = rows_for(len(batch), self.batch_size) if self.row_windows else self.batch_size
        a = row_arrays(list(batch) + [None] * (n - len(batch)), width, self.max_stop_ids)
        mode = sort_mode([r.params for r in batch], self.vocab_size)
        return self._prefill_rows(self._weights(), state, a, jnp.int32(0), mode=mode)

    def _fill_row(self, state: DecodeState, slot: int, req: Request) -> DecodeState:
        self.check(req)
        a = row_arrays([req], bucket(len(req.prompt), self.max_len, self.prompt_buckets),
                       self.max_stop_ids)
        mode = sort_mode([req.params], self.vocab_size)
        return self._prefill_rows(self._weights(), state, a, jnp.int32(slot), mode=mode)

    @contextlib.contextmanager
    def _sharding(self):
        if self.ctx is None:
            yield
        else:
            with use_sharding(self.ctx.mesh, self.ctx.rules):
                yield

    def _state_shardings(self) -> DecodeState | None:
        if self.ctx is None:
            return None

        def sh(*axes: str | None) -> NamedSharding:
            return self.ctx.sharding(axes)

        row = sh("batch")
        n = self.config.num_hidden_layers
        k, v = tuple(sh(*CACHE_K_AXES) for _ in range(n)), tuple(sh(*CACHE_V_AXES)
                                                               for _ in range(n))
        return DecodeState(
            cache=SlotCache(k, v, sh("batch", "cache_sequence"), row), last=row, done=row,
            n_out=row, out=sh("batch", None), seeds=row, params=RowParams(row, row, row, row),
            max_new=row, stops=sh("batch", None))

    def lower_decode(self, mode: SortMode = "greedy") -> tuple[Any, tuple[Any, ...]]:
        """The decode program (``chunk_steps`` steps of every row against the full cache),
        lowered for the weights given (real or abstract) without running anything, and its
        abstract arguments: compile it for its memory analysis, e.g. for a TPU topology."""
        with self._sharding():
            state = jax.eval_shape(self._init)
            if self.ctx is not None:
                state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                       sharding=s),
                                     state, self._state_shardings())
            args = (self._weights(), state, jnp.int32(self.chunk_steps))
            return self._decode.lower(*args, mode=mode), args

    # ------------------------------------------------------------------ compiled programs
    def _weights(self) -> tuple[Any, ...]:
        """What the compiled programs read: the states, per-layer copies, fused kernels."""
        return self.params, self.layers, self.fused

    def _modules(self, weights: tuple[Any, ...]) -> tuple[Llama, list[nnx.Module], Any]:
        params, layers, fused = weights
        model = nnx.merge(self.graphdef, *params)
        if layers is None:  # static slices of the stacked weights, inside the program
            _, stacked = nnx.split(model.layers)
            layers = slice_layers(stacked, self.config.num_hidden_layers)
        return model, [nnx.merge(self.layer_graphdef, s) for s in layers], fused

    def _init_fn(self) -> DecodeState:
        b = self.batch_size
        zeros = jnp.zeros((b,), jnp.int32)
        return DecodeState(
            cache=init_slot_cache(self.config, b, self.max_len, self.cache_dtype), last=zeros,
            done=jnp.ones((b,), bool), n_out=zeros,
            out=jnp.zeros((b, self.max_len), jnp.int32), seeds=jnp.zeros((b,), jnp.uint32),
            params=RowParams(jnp.zeros((b,)), zeros, jnp.ones((b,)), jnp.zeros((b,))),
            max_new=jnp.ones((b,), jnp.int32),
            stops=jnp.full((b, self.max_stop_ids), -1, jnp.int32))

    def _prefill(self, weights, cache: SlotCache, a: dict[str, jax.Array], mode: SortMode
                 ) -> tuple[SlotCache, jax.Array]:
        """Write right-padded prompts from slot 0 of an emptied ``cache``; first tokens."""
        b, width = a["tokens"].shape
        cache = cache._replace(segment_ids=jnp.zeros_like(cache.segment_ids),
                               end=jnp.zeros_like(cache.end))
        positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
        segments = (positions < a["lengths"][:, None]).astype(jnp.int32)
        model, mods, fused = self._modules(weights)
        hidden, cache = forward(model, mods, a["tokens"], positions, segments, cache, fused)
        last = jnp.take_along_axis(hidden, jnp.maximum(a["lengths"] - 1, 0)[:, None, None],
                                   axis=1)
        logits = model.logits(last)[:, 0]
        rp = RowParams(a["temperature"], a["top_k"], a["top_p"], a["min_p"])
        keys = row_keys(a["seeds"], jnp.zeros((b,), jnp.int32))
        return cache, select_tokens(logits, rp, keys, mode)

    def _start_rows(self, a: dict[str, jax.Array], first: jax.Array, live: jax.Array
                    ) -> dict[str, jax.Array]:
        """Per-row fields of freshly prefilled rows (``live``: rows holding a request)."""
        stop = jnp.any(first[:, None] == a["stops"], axis=-1)
        out = jnp.zeros((first.shape[0], self.max_len), jnp.int32).at[:, 0].set(first)
        return dict(last=first, done=~live | stop | (a["max_new"] <= 1),
                    n_out=live.astype(jnp.int32), out=out, seeds=a["seeds"],
                    params=RowParams(a["temperature"], a["top_k"], a["top_p"], a["min_p"]),
                    max_new=a["max_new"], stops=a["stops"])

    def _prefill_rows_fn(self, weights, state: DecodeState, a, start: jax.Array, *,
                         mode: SortMode) -> DecodeState:
        """Prefill ``a``'s prompts into rows ``start, start + 1, ...``: their whole cache rows
        emptied, the prompts written from slot 0 and attended over their own width only."""
        rows, width = a["tokens"].shape
        c = state.cache
        emptied = jax.lax.dynamic_update_slice_in_dim(
            c.segment_ids, jnp.zeros((rows, self.max_len), c.segment_ids.dtype), start, 0)
        state = state._replace(cache=c._replace(segment_ids=emptied))
        length = width if self.adaptive else self.max_len
        cache, first = self._prefill(weights, take_window(state, rows, length, start).cache, a,
                                     mode)
        part = DecodeState(cache=cache, **self._start_rows(a, first, a["lengths"] > 0))
        return put_window(state, part, start)

    def _decode_fn(self, weights, state: DecodeState, steps: jax.Array, *, mode: SortMode,
                   rows: int | None = None, length: int | None = None) -> DecodeState:
        """``steps`` decode steps of rows ``0..rows-1`` against cache slots ``0..length-1``
        (default: all); the rest of the state is left as it is."""
        rows, length = rows or self.batch_size, length or self.max_len
        if (rows, length) == (self.batch_size, self.max_len):
            return self._decode_rows(weights, state, steps, mode)
        part = self._decode_rows(weights, take_window(state, rows, length), steps, mode)
        return put_window(state, part)

    def _decode_rows(self, weights, state: DecodeState, steps: jax.Array, mode: SortMode
                     ) -> DecodeState:
        model, mods, fused = self._modules(weights)
        rows = jnp.arange(state.done.shape[0])
        cap = self.max_len - 1

        def cond(carry):
            i, s = carry
            return (i < steps) & ~jnp.all(s.done)

        def body(carry):
            i, s = carry
            active = ~s.done
            hidden, cache = forward(model, mods, s.last[:, None], s.cache.end[:, None],
                                    active.astype(jnp.int32)[:, None], s.cache, fused)
            keys = None if mode == "greedy" else row_keys(s.seeds, s.n_out)
            tok = select_tokens(model.logits(hidden)[:, -1], s.params, keys, mode)
            col = jnp.minimum(s.n_out, cap)
            out = s.out.at[rows, col].set(jnp.where(active, tok, s.out[rows, col]))
            n_out = s.n_out + active.astype(jnp.int32)
            stop = jnp.any(tok[:, None] == s.stops, axis=-1)
            done = s.done | (active & (stop | (n_out >= s.max_new)))
            last = jnp.where(active, tok, s.last)
            return i + 1, s._replace(cache=cache, last=last, done=done, n_out=n_out, out=out)

        return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]
