"""Settings, workloads and small helpers shared by the sections of ``benchmarks/gpu.py``.

Everything a section needs arrives as one :class:`Settings` (JSON on the child's command line),
so each framework's child process rebuilds exactly the same batches and requests from the same
seeds. Output is one JSON object per line on stdout (:func:`emit`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GiB = 1024**3


@dataclass(frozen=True)
class Settings:
    """Every knob of one run (printed in the ``settings`` line)."""

    smoke: bool = False
    presets: tuple[str, ...] = ("llama3.2-1b", "llama3.1-8b")
    seq_lens: tuple[int, ...] = (4096, 8192)
    tokens_per_step: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"llama3.2-1b": 16384, "llama3.1-8b": 8192})
    rank: int = 16
    remat: str = "full"  # the study configs' (configs/study/_base/recipe.yaml)
    loss_chunk: int = 0
    attention: str = "auto"  # cudnn on GPU
    hf_attention: str = "sdpa"
    lr: float = 1e-4
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    warmup_steps: int = 2
    timed_steps: int = 5
    # decode: the 8B shape at batch 1 / 8 / 64; step time from two generation lengths
    decode_preset: str = "llama3.1-8b"
    decode_batches: tuple[int, ...] = (1, 8, 64)
    decode_prompt_len: int = 512
    decode_new_tokens: tuple[int, int] = (32, 256)
    max_len: int = 1024
    chunk_steps: int = 32  # configs/sample/magpie_eu.yaml
    # Magpie-like: a shared prefix (chat template + system block), short varied queries,
    # mixed output lengths, continuous batching vs generate() in arrival-order batches
    magpie_requests: int = 128
    magpie_batch: int = 64
    magpie_prefix_len: int = 32
    magpie_suffix_max: int = 32
    magpie_new_range: tuple[int, int] = (16, 512)
    # extra rows (best-settings probes), run when time is left
    extras: bool = True
    packed_docs: int = 4
    alt_remat: str = "dots_no_batch"  # "": no remat probe (and one memory case fewer)
    seed: int = 0

    @classmethod
    def for_smoke(cls) -> Settings:
        """The same sections on CPU with tiny shapes, one of each compile: the train step
        through ``jax.nn.dot_product_attention`` (its XLA reference: the code path of cuDNN on a
        GPU), one decode batch (its sampler reused by the Magpie workload)."""
        return cls(smoke=True, presets=("tiny-tied",), seq_lens=(128,),
                   tokens_per_step={"tiny-tied": 256}, attention="dot_product", warmup_steps=1,
                   timed_steps=2, decode_preset="tiny", decode_batches=(4,),
                   decode_prompt_len=16, decode_new_tokens=(4, 44), max_len=64, chunk_steps=4,
                   magpie_requests=10, magpie_batch=4, magpie_prefix_len=6,
                   magpie_suffix_max=6, magpie_new_range=(2, 16), packed_docs=2, alt_remat="")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        d = json.loads(text)
        for k, v in d.items():
            if isinstance(v, list):
                d[k] = tuple(v)
        return cls(**d)

    def batch_for(self, preset: str, seq_len: int) -> int:
        return max(1, self.tokens_per_step[preset] // seq_len)


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed (the driver relays lines as they come)."""
    print(json.dumps(record, default=_jsonable), flush=True)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def guarded(name: str, fn: Callable[[], Iterator[dict[str, Any]] | dict[str, Any]],
            deadline: float, **labels: Any) -> None:
    """Run one section: emit its records, or one line with its error (the traceback goes to
    stderr); past ``deadline`` emit that it was skipped. A failure never stops the caller."""
    if time.time() > deadline:
        emit({"section": name, **labels, "skipped": "time budget spent"})
        return
    t0 = time.perf_counter()
    try:
        out = fn()
        for rec in [out] if isinstance(out, dict) else out:
            emit({"section": name, **labels, **rec})
    except Exception as e:  # noqa: BLE001  (one section's failure must not lose the others)
        traceback.print_exc(file=sys.stderr)
        emit({"section": name, **labels, "error": f"{type(e).__name__}: {e}"[:2000],
              "wall_s": round(time.perf_counter() - t0, 2)})


def train_batch(vocab: int, batch: int, seq_len: int, seed: int, docs: int = 1
                ) -> dict[str, np.ndarray]:
    """Random tokens in the batch contract (``basque_jax.data.batch``); ``docs`` > 1 packs each
    row with that many equal documents (segment ids 1..docs, positions restarting)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq_len + 1)).astype(np.int32)
    doc = seq_len // docs
    slot = np.arange(seq_len)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": np.ones((batch, seq_len), np.float32),
            "positions": np.tile((slot % doc).astype(np.int32), (batch, 1)),
            "segment_ids": np.tile((np.minimum(slot // doc, docs - 1) + 1).astype(np.int32),
                                   (batch, 1))}


def magpie_requests(s: Settings, vocab: int) -> list[tuple[list[int], int]]:
    """``(prompt ids, max_new_tokens)`` of the Magpie-like workload: one shared prefix, a short
    random query each, output budgets log-uniform over ``magpie_new_range`` (many short, a few
    long; with random weights no stop id ends a row, so the budgets set the lengths)."""
    rng = np.random.default_rng(s.seed + 1)
    prefix = rng.integers(1, vocab, s.magpie_prefix_len).tolist()
    lo, hi = s.magpie_new_range
    out = []
    for _ in range(s.magpie_requests):
        suffix = rng.integers(1, vocab, int(rng.integers(1, s.magpie_suffix_max + 1))).tolist()
        budget = int(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        out.append((prefix + suffix, budget))
    return out


def decode_prompts(s: Settings, vocab: int, batch: int) -> np.ndarray:
    return np.random.default_rng(s.seed + batch).integers(1, vocab, (batch, s.decode_prompt_len))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def versions(*names: str) -> dict[str, str | None]:
    """Installed distribution versions (None: not installed), without importing them."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def decode_bytes(layers: int, kv_heads: int, head_dim: int, itemsize: int, batch: int,
                 slots: float) -> float:
    """Bytes of K and V read by one decode step over ``slots`` cached positions per row."""
    return 2.0 * layers * batch * kv_heads * head_dim * slots * itemsize
