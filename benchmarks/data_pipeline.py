"""Tokens/s of the packed data pipeline (with worker processes) vs. what a training step eats.

Baseline: one jitted ``value_and_grad`` step of the masked cross-entropy on the benchmark
model (Llama, 4 layers, hidden 512, vocab 32000) over batches of the same shape contract.
The pipeline must be at least 10x faster than the step consumes. Prints one JSON line.

    python benchmarks/data_pipeline.py [--workers 2 --seq-len 1024 --batch 8]

Data: ../shared/data (BHTC news corpus + TruthfulQA-eu chat, Llama 3 tokenizer) when present,
else the embedded sample with the demo tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def data_setup(args) -> tuple[object, object, str]:
    from basque_jax.data import DataConfig, build_demo_tokenizer, load_tokenizer
    from basque_jax.data.embedded import EMBEDDED_CHAT, EMBEDDED_CORPUS

    common = {
        "seq_len": args.seq_len,
        "batch_size": args.batch,
        "epochs": None,
        "seed": 0,
        "worker_count": args.workers,
        "read_threads": args.read_threads,
    }
    bhtc, chat = SHARED / "eu" / "bhtc_news_train.jsonl", SHARED / "eu" / "truthfulqa_eu_chat.jsonl"
    tok_file = SHARED / "llama3" / "tokenizer.model"
    if bhtc.exists() and chat.exists() and tok_file.exists():
        sources = [{"kind": "corpus", "path": str(bhtc)}, {"kind": "chat", "path": str(chat)}]
        tok, data = load_tokenizer(tok_file), "shared: bhtc_news_train + truthfulqa_eu_chat"
    else:
        sources = [
            {"kind": "corpus", "path": str(EMBEDDED_CORPUS)},
            {"kind": "chat", "path": str(EMBEDDED_CHAT)},
        ]
        tok, data = build_demo_tokenizer(), "embedded sample (demo tokenizer)"
    return DataConfig.from_dict({"sources": sources, **common}), tok, data


def pipeline_rate(args) -> dict:
    from basque_jax.data import make_pipeline

    cfg, tok, data = data_setup(args)
    t0 = time.perf_counter()
    it = make_pipeline(cfg, tok)
    next(it)
    startup = time.perf_counter() - t0
    for _ in range(args.warmup_batches):
        next(it)
    positions = real = 0
    t0 = time.perf_counter()
    for _ in range(args.pipeline_batches):
        b = next(it)
        positions += b["input_ids"].size
        real += int((b["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t0
    it.close()
    return {
        "data": data,
        "pipeline_startup_s": round(startup, 2),
        "pipeline_positions_per_s": positions / dt,
        "pipeline_tokens_per_s": real / dt,
        "packing_efficiency": real / positions,
    }


def train_step_rate(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from basque_jax.model import Llama, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    model = Llama(cfg, rngs=nnx.Rngs(0))
    b, t = args.step_batch, args.seq_len
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(0, cfg.vocab_size, (b, t), dtype=np.int32),
        "targets": rng.integers(0, cfg.vocab_size, (b, t), dtype=np.int32),
        "loss_mask": np.ones((b, t), np.float32),
        "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "segment_ids": np.ones((b, t), np.int32),
    }

    def loss_fn(m, batch):
        logits = m(batch["input_ids"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"])
        xent = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["targets"]
        )
        return jnp.sum(xent * batch["loss_mask"]) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1)

    @nnx.jit
    def step(m, batch):
        return nnx.value_and_grad(loss_fn)(m, batch)

    batch = jax.device_put(batch)
    t0 = time.perf_counter()
    jax.block_until_ready(step(model, batch))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = step(model, batch)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / args.steps
    return {
        "device": str(jax.devices()[0].platform),
        "step_batch": b,
        "step_compile_s": round(compile_s, 2),
        "step_s": dt,
        "train_step_tokens_per_s": b * t / dt,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--read-threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="pipeline batch (rows)")
    p.add_argument("--pipeline-batches", type=int, default=200)
    p.add_argument("--warmup-batches", type=int, default=10)
    p.add_argument("--step-batch", type=int, default=2, help="training-step batch (rows)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    result = {"benchmark": "data_pipeline", "seq_len": args.seq_len, "workers": args.workers}
    result.update(pipeline_rate(args))
    result.update(train_step_rate(args))
    ratio = result["pipeline_positions_per_s"] / result["train_step_tokens_per_s"]
    result["ratio"] = ratio
    result["meets_10x"] = ratio >= 10
    for k, v in result.items():
        if isinstance(v, float):
            result[k] = round(v, 4 if v < 10 else 1)
    print(json.dumps(result))
    return 0 if result["meets_10x"] else 1


if __name__ == "__main__":
    sys.exit(main())
