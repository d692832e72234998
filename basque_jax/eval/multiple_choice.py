"""Multiple-choice accuracy by log-likelihood, scored the way lm-evaluation-harness scores it.

Items are JSONL rows ``{"question": str, "choices": [str, ...], "answer": int}`` (e.g.
``truthfulqa_eu_mc1.jsonl``). Each choice becomes one request ``(context, continuation)``:

* text prompts (default): context = few-shot examples + ``"Q: {question}\\nA:"``, continuation
  = ``" " + choice``; examples are ``"Q: {q}\\nA: {gold}"`` joined by ``"\\n\\n"``. As in
  lm-eval, trailing spaces of the context move to the continuation, and the continuation's
  tokens are those of ``encode(context + continuation)`` after ``encode(context)``. BOS is
  prepended (``add_bos``).
* ``chat=True``: the question is a user turn of the Llama 3.1 chat template (few-shot examples
  as earlier user/assistant turns), context ends with the assistant header, continuation =
  ``choice`` encoded on its own (as training encodes message content).

Score = sum of ``log p(continuation token | everything before)``. ``acc``: the highest score is
the answer. ``acc_norm``: score / ``len(choice)`` — lm-eval's ``completion_len`` (characters of
the choice string); ``acc_norm_bytes``: score / UTF-8 bytes of the continuation, the byte
normalisation lm-eval's documentation describes (equal to ``acc_norm`` up to the delimiter for
ASCII text; they differ on accented Basque text).

Requests are sorted by length, padded into fixed-size batches (segment id 0 = padding, one
request per row) and scored by one jitted function that compiles once per length bucket
(powers of two).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from basque_jax.data.templates import make_chat_encoder
from basque_jax.data.tokenizer import Tokenizer
from basque_jax.errors import UserError
from basque_jax.sharding import batch_sharding, batch_shards, use_sharding

MIN_BUCKET = 16
LOGIT_CHUNK = 256  # sequence positions whose logits are formed at once


class MCDataError(UserError):
    """A malformed multiple-choice file (the message names file, line and key)."""


@dataclass(frozen=True)
class MCItem:
    """One question with its choices and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    answer: int
    id: str = ""


def read_mc_jsonl(path: str | Path, limit: int | None = None) -> list[MCItem]:
    """Items of a JSONL file (the first ``limit``); errors name the line and key."""
    path = Path(path)
    if not path.is_file():
        raise MCDataError(f"{path}: file not found")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MCDataError(f"{where}: invalid JSON ({e})") from None
            if not isinstance(row, dict):
                raise MCDataError(f"{where}: expected an object")
            for key in ("question", "choices", "answer"):
                if key not in row:
                    raise MCDataError(f"{where}: missing key {key!r}")
            q, choices, answer = row["question"], row["choices"], row["answer"]
            if not isinstance(q, str):
                raise MCDataError(f"{where}: 'question' must be a string")
            if not (isinstance(choices, list) and len(choices) >= 2
                    and all(isinstance(c, str) and c for c in choices)):
                raise MCDataError(f"{where}: 'choices' must be a list of >= 2 non-empty strings")
            if isinstance(answer, bool) or not isinstance(answer, int) or \
                    not 0 <= answer < len(choices):
                raise MCDataError(f"{where}: 'answer' must be an index into 'choices' "
                                  f"(0..{len(choices) - 1}), got {answer!r}")
            items.append(MCItem(q, tuple(choices), answer, str(row.get("id", n))))
    if not items:
        raise MCDataError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------- requests
def doc_to_text(item: MCItem) -> str:
    return f"Q: {item.question}\nA:"


def _fewshot(items: Sequence[MCItem], index: int, k: int, seed: int) -> list[MCItem]:
    """``k`` other items, drawn deterministically per (seed, index)."""
    if k <= 0:
        return []
    pool = [i for i in range(len(items)) if i != index]
    if len(pool) < k:
        raise ValueError(f"num_fewshot={k} but only {len(pool)} other items to draw from")
    return [items[i] for i in random.Random(seed * 1_000_003 + index).sample(pool, k)]


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces join the continuation, whose tokens are those
    of ``encode(context + continuation)`` after ``encode(context)``."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


@dataclass(frozen=True)
class Request:
    item: int
    choice: int
    context: list[int]
    continuation: list[int]


def build_requests(items: Sequence[MCItem], tok: Tokenizer, *, num_fewshot: int = 0,
                   chat: bool = False, seed: int = 1234, add_bos: bool = True,
                   chat_template: str = "auto", system_prompt: str = "",
                   date_string: str | None = None) -> list[Request]:
    """One request per (item, choice); see the module docstring for the prompt format."""
    encoder = None
    if chat:
        kwargs = {"date_string": date_string} if date_string else {}
        encoder = make_chat_encoder(tok, chat_template, system_prompt=system_prompt, **kwargs)
    bos = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    requests = []
    for i, item in enumerate(items):
        shots = _fewshot(items, i, num_fewshot, seed)
        if encoder is not None:
            turns = [t for s in shots for t in (("user", s.question),
                                                ("assistant", s.choices[s.answer]))]
            context, _ = encoder.encode_chat([*turns, ("user", item.question)],
                                             add_generation_prompt=True)
            for j, choice in enumerate(item.choices):
                requests.append(Request(i, j, context, tok.encode(choice)))
            continue
        prefix = "".join(f"{doc_to_text(s)} {s.choices[s.answer]}\n\n" for s in shots)
        for j, choice in enumerate(item.choices):
            ctx, cont = encode_pair(tok, prefix + doc_to_text(item), " " + choice)
            requests.append(Request(i, j, bos + ctx, cont))
    return requests


# ----------------------------------------------------------------------------- scoring
def _bucket(n: int, max_length: int) -> int:
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, max_length)


def _score_fn(graphdef: nnx.GraphDef, chunk: int | None = None):
    """Jitted ``(state, ids, positions, segments, targets, mask) -> (ll [b], greedy [b])``.

    Logits are formed ``chunk`` (default :data:`LOGIT_CHUNK`) positions at a time (a scan over
    the sequence), so a batch of long rows never holds ``[batch, seq, vocab]`` float32 logits.
    """
    chunk = chunk or LOGIT_CHUNK

    def score(state, ids, positions, segments, targets, mask):
        model = nnx.merge(graphdef, state)
        hidden = model(ids, positions=positions, segment_ids=segments, return_hidden=True)
        b, t = ids.shape
        n = t // chunk if t > chunk and t % chunk == 0 else 1

        def split(x):
            return x.reshape(b, n, t // n, *x.shape[2:]).swapaxes(0, 1)

        def one(carry, xs):
            h, tg, m = xs
            logits = model.logits(h).astype(jnp.float32)
            logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
            picked = jnp.take_along_axis(logp, tg[..., None], axis=-1)[..., 0]
            on = m > 0
            ll = jnp.sum(jnp.where(on, picked, 0.0), axis=-1)
            ok = jnp.all(jnp.where(on, jnp.argmax(logits, axis=-1) == tg, True), axis=-1)
            return (carry[0] + ll, carry[1] & ok), None

        init = (jnp.zeros((b,), jnp.float32), jnp.ones((b,), bool))
        (ll, greedy), _ = jax.lax.scan(one, init, (split(hidden), split(targets), split(mask)))
        return ll, greedy

    return jax.jit(score)


def score_requests(model: nnx.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   *, batch_size: int = 8, max_length: int | None = None,
                   mesh: Mesh | None = None, rules: dict | None = None
                   ) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of each ``(context, continuation)`` token-id pair.

    Rows longer than ``max_length`` (default: the model's ``max_position_embeddings``) lose
    tokens from the left. With a ``mesh``, rows are sharded over its batch axes (the batch is
    rounded up to a multiple of their size).
    """
    max_length = max_length or model.config.max_position_embeddings
    if mesh is not None:
        ways = batch_shards(mesh, rules)
        batch_size = -(-batch_size // ways) * ways
        sharding = batch_sharding(mesh, rules)
    graphdef, state = nnx.split(model)
    score = _score_fn(graphdef)
    rows = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("empty continuation (a choice that encodes to no tokens)")
        if not ctx:
            raise ValueError("empty context: give a BOS token or a prompt")
        tokens = [*ctx, *cont][-(max_length + 1):]
        rows.append((tokens, min(len(cont), len(tokens) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        length = _bucket(max(len(rows[i][0]) - 1 for i in chunk), max_length)
        arrays = {k: np.zeros((batch_size, length), np.int32)
                  for k in ("ids", "positions", "segments", "targets", "mask")}
        for r, i in enumerate(chunk):
            tokens, n_cont = rows[i]
            n = len(tokens) - 1
            arrays["ids"][r, :n] = tokens[:-1]
            arrays["targets"][r, :n] = tokens[1:]
            arrays["positions"][r, :n] = np.arange(n)
            arrays["segments"][r, :n] = 1
            arrays["mask"][r, n - n_cont:n] = 1
        if mesh is not None:
            placed = [jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx])
                      for a in arrays.values()]
            with use_sharding(mesh, rules):
                ll, greedy = score(state, *placed)
        else:
            ll, greedy = score(state, *map(jnp.asarray, arrays.values()))
        ll, greedy = np.asarray(jax.device_get(ll)), np.asarray(jax.device_get(greedy))
        for r, i in enumerate(chunk):
            out[i] = (float(ll[r]), bool(greedy[r]))
    return out


# ----------------------------------------------------------------------------- metrics
def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, np.float64)
    stderr = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else float("nan")
    return float(arr.mean()), stderr


def mc_metrics(items: Sequence[MCItem], lls: Sequence[Sequence[float]]) -> dict[str, float]:
    """acc / acc_norm / acc_norm_bytes (and their standard errors) from per-choice scores."""
    acc, norm, norm_bytes = [], [], []
    for item, scores in zip(items, lls, strict=True):
        s = np.asarray(scores, np.float64)
        chars = np.asarray([len(c) for c in item.choices], np.float64)
        nbytes = np.asarray([len((" " + c).encode()) for c in item.choices], np.float64)
        acc.append(float(np.argmax(s) == item.answer))
        norm.append(float(np.argmax(s / chars) == item.answer))
        norm_bytes.append(float(np.argmax(s / nbytes) == item.answer))
    out: dict[str, float] = {}
    for name, values in (("acc", acc), ("acc_norm", norm), ("acc_norm_bytes", norm_bytes)):
        out[name], out[f"{name}_stderr"] = _mean_stderr(values)
    return out


def evaluate_multiple_choice(model: nnx.Module, tok: Tokenizer, items: Sequence[MCItem], *,
                             num_fewshot: int = 0, chat: bool = False, seed: int = 1234,
                             add_bos: bool = True, batch_size: int = 8,
                             max_length: int | None = None, mesh: Mesh | None = None,
                             rules: dict | None = None, log_samples: bool = False,
                             chat_template: str = "auto", system_prompt: str = "",
                             date_string: str | None = None) -> dict[str, Any]:
    """Score every choice of every item and aggregate (see module docstring)."""
    requests = build_requests(items, tok, num_fewshot=num_fewshot, chat=chat, seed=seed,
                              add_bos=add_bos, chat_template=chat_template,
                              system_prompt=system_prompt, date_string=date_string)
    scored = score_requests(model, [(r.context, r.continuation) for r in requests],
                            batch_size=batch_size, max_length=max_length, mesh=mesh, rules=rules)
    lls: list[list[float]] = [[0.0] * len(it.choices) for it in items]
    greedy: list[list[bool]] = [[False] * len(it.choices) for it in items]
    for r, (ll, g) in zip(requests, scored, strict=True):
        lls[r.item][r.choice] = ll
        greedy[r.item][r.choice] = g
    result: dict[str, Any] = {"items": len(items), "requests": len(requests),
                              "num_fewshot": num_fewshot, "chat": chat, "add_bos": add_bos,
                              **mc_metrics(items, lls)}
    if log_samples:
        result["samples"] = [{"id": it.id, "answer": it.answer, "loglikelihoods": ll,
                              "is_greedy": g} for it, ll, g in zip(items, lls, greedy,
                                                                   strict=True)]
    return result
