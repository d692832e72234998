"""The JAX child of ``benchmarks/gpu.py``: our LoRA train step, our sampler's decode step and
the Magpie-like workload through continuous batching. One JSON line per measurement."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import Any

from gpu_common import (
    TARGETS,
    Settings,
    decode_bytes,
    decode_prompts,
    emit,
    guarded,
    magpie_requests,
    timed,
    train_batch,
)


def device_record(s: Settings) -> dict[str, Any]:
    """The device, versions and the peaks the fractions use (measured on CPU for the smoke)."""
    import flax
    import jax

    from basque_jax.topology import hbm_bandwidth, peak_flops

    dev = jax.devices()[0]
    rec: dict[str, Any] = {
        "platform": dev.platform, "device_kind": dev.device_kind,
        "device_count": jax.device_count(), "jax": jax.__version__, "flax": flax.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "peak_flops": peak_flops(dev.device_kind), "peak_source": "data sheet (topology.py)",
        "hbm_bandwidth": hbm_bandwidth(dev.device_kind), "bandwidth_source": "data sheet",
    }
    try:
        from jax._src.lib import cuda_versions  # private: only for the report

        if cuda_versions is not None:
            rec["cudnn"] = cuda_versions.cudnn_get_version()
            rec["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
    except (ImportError, RuntimeError, AttributeError):
        pass
    if rec["peak_flops"] is None and s.smoke:
        rec["peak_flops"], rec["peak_source"] = measured_matmul_flops(), "measured bf16 matmul"
    if rec["hbm_bandwidth"] is None and s.smoke:
        rec["hbm_bandwidth"], rec["bandwidth_source"] = measured_copy_bandwidth(), "measured copy"
    return rec


def measured_matmul_flops(n: int = 512, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    return 2.0 * n**3 / min(timed(lambda: f(x).block_until_ready())[0] for _ in range(reps))


def measured_copy_bandwidth(mib: int = 64, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**18,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    return 2.0 * x.nbytes / min(timed(lambda: f(x).block_until_ready())[0] for _ in range(reps))


def peak_memory() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_config(s: Settings, preset: str, seq_len: int, batch: int, remat: str):
    from basque_jax.config import RunConfig

    return RunConfig.from_dict({
        "model": {"preset": preset, "param_dtype": "bfloat16", "dtype": "bfloat16",
                  "attention": s.attention, "remat": remat, "scan_unroll": 1},
        "lora": {"enabled": True, "rank": s.rank, "alpha": 2.0 * s.rank,
                 "targets": list(TARGETS), "base_dtype": "bfloat16"},
        "data": {"sources": [{"kind": "corpus", "path": "unused.jsonl"}],
                 "seq_len": seq_len, "batch_size": batch},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "optim": {"lr": s.lr, "b1": 0.9, "b2": 0.95, "weight_decay": s.weight_decay,
                  "clip_norm": s.clip_norm, "warmup_ratio": 0.0},
        "train": {"steps": 1000, "loss_chunk": s.loss_chunk},
    })


def train_ours(s: Settings, peak: float | None, preset: str, seq_len: int, *,
               remat: str | None = None, packed_docs: int = 0) -> Iterator[dict[str, Any]]:
    """Tokens/s and MFU of our jitted LoRA step (state donated) on random bf16 weights; with
    ``packed_docs`` > 1 then also of the same compiled step on rows packed with that many
    documents (a ``train_extra`` record: the masked attention branch, no new compile)."""
    import jax

    from basque_jax.model.attention import resolve_implementation
    from basque_jax.model.config import LlamaConfig
    from basque_jax.sharding import use_sharding
    from basque_jax.train.flops import train_flops_per_token
    from basque_jax.train.setup import setup_training

    remat = remat or s.remat
    batch = s.batch_for(preset, seq_len)
    cfg = run_config(s, preset, seq_len, batch, remat)
    setup = setup_training(cfg, devices=jax.devices()[:1])
    box = {"state": setup.state}
    tokens = batch * seq_len
    vocab = setup.model_config.vocab_size

    def measure(docs: int) -> dict[str, Any]:
        with use_sharding(setup.mesh, setup.rules):
            data = setup.global_batch(train_batch(vocab, batch, seq_len, s.seed, docs))

            def run(n: int):
                state, m = box["state"], None
                for _ in range(n):
                    state, m = setup.step_fn(state, setup.frozen, data)
                box["state"] = state
                return jax.block_until_ready((state, m))[1]

            first = timed(lambda: run(1))[0]
            if s.warmup_steps > 1:
                run(s.warmup_steps - 1)
            t, m = timed(lambda: run(s.timed_steps))
        step_s = t / s.timed_steps
        # Packed rows: attention spans each document only (its length, not the row's).
        flops = tokens * train_flops_per_token(LlamaConfig.preset(preset), seq_len // docs,
                                               lora_rank=s.rank, lora_targets=TARGETS)
        return {"side": "ours", "preset": preset, "seq_len": seq_len, "batch": batch,
                "docs_per_row": docs, "remat": remat, "loss_chunk": s.loss_chunk,
                "attention": resolve_implementation(s.attention), "dtype": "bfloat16",
                "step_s": round(step_s, 5), "first_step_s": round(first, 2),
                "tokens_per_s": round(tokens / step_s, 1), "flops_per_step": flops,
                "mfu": None if peak is None else round(flops / step_s / peak, 4),
                "loss": round(float(m["loss"]), 4), "peak_bytes_in_use": peak_memory()}

    yield measure(1)
    if packed_docs > 1:
        yield {"section": "train_extra", **measure(packed_docs)}


def decode_model(s: Settings):
    import jax.numpy as jnp
    from flax import nnx

    from basque_jax.model.config import LlamaConfig
    from basque_jax.model.llama import Llama

    return Llama(LlamaConfig.preset(s.decode_preset), param_dtype=jnp.bfloat16,
                 dtype=jnp.bfloat16, attention=s.attention, rngs=nnx.Rngs(s.seed))


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: all of them but the embedding table, of which
    it gathers a row per token (the table is read whole when it is also the output head)."""
    import jax
    from flax import nnx

    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if model.config.tie_word_embeddings:
        return total
    return total - model.embed_tokens.embedding[...].nbytes


def decode_ours(s: Settings, model, samplers: dict, bandwidth: float | None, batch: int
                ) -> dict[str, Any]:
    """Decode step time at ``batch`` rows (difference of two generation lengths, prefill
    cancelled) and the fraction of the HBM roofline: weight + KV bytes read / step time."""
    from basque_jax.sample import SamplingParams
    from basque_jax.sample.sampler import Sampler, SamplerConfig

    cfg = model.config
    sampler = Sampler(model, SamplerConfig(batch_size=batch, max_len=s.max_len,
                                           chunk_steps=s.chunk_steps))
    samplers[batch] = sampler
    prompts = decode_prompts(s, cfg.vocab_size, batch).tolist()
    n1, n2 = s.decode_new_tokens

    def run(n: int) -> None:
        out = sampler.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=n))
        assert all(len(c.tokens) == n for c in out)

    first = timed(lambda: run(n1))[0]
    t1 = min(timed(lambda: run(n1))[0] for _ in range(2))
    t2 = min(timed(lambda: run(n2))[0] for _ in range(2))
    step_s = (t2 - t1) / (n2 - n1)
    if step_s <= 0:
        raise ValueError(f"{n2} new tokens took no longer than {n1} ({t2:.4f} s vs {t1:.4f} s): "
                         "timing noise; widen decode_new_tokens")
    itemsize = 2  # bfloat16 cache (the model's compute dtype)
    kv = dict(layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
              head_dim=cfg.resolved_head_dim, itemsize=itemsize, batch=batch)
    weights = weight_bytes(model)
    read_all = weights + decode_bytes(**kv, slots=s.max_len)  # our step reads every slot
    ctx = s.decode_prompt_len + (n1 + n2) / 2  # mean filled context over the timed steps
    useful = weights + decode_bytes(**kv, slots=ctx)
    rec = {"side": "ours", "preset": s.decode_preset, "batch": batch, "dtype": "bfloat16",
           "prompt_len": s.decode_prompt_len, "new_tokens": [n1, n2], "max_len": s.max_len,
           "step_ms": round(1e3 * step_s, 3), "tokens_per_s": round(batch / step_s, 1),
           "first_call_s": round(first, 2), "weight_bytes": weights,
           "bytes_per_step_read": read_all, "bytes_per_step_useful": useful,
           "mean_context": ctx}
    if bandwidth:
        rec |= {"hbm_bandwidth": bandwidth,
                "roofline_fraction": round(read_all / step_s / bandwidth, 4),
                "useful_roofline_fraction": round(useful / step_s / bandwidth, 4)}
    return rec


def magpie_ours(s: Settings, model, samplers: dict) -> dict[str, Any]:
    """The Magpie-like workload through ``Sampler.generate`` (continuous batching)."""
    from basque_jax.sample import SamplingParams
    from basque_jax.sample.sampler import Request, Sampler, SamplerConfig

    sampler = samplers.get(s.magpie_batch) or Sampler(
        model, SamplerConfig(batch_size=s.magpie_batch, max_len=s.max_len,
                             chunk_steps=s.chunk_steps))
    work = magpie_requests(s, model.config.vocab_size)
    reqs = [Request(p, SamplingParams(temperature=0.0, max_new_tokens=n), seed=i)
            for i, (p, n) in enumerate(work)]
    # Warm-up compiles the prefill of all slots and the one-row insert (row 0 outlives the
    # first chunk while two requests wait).
    warm = [r._replace(params=SamplingParams(temperature=0.0, max_new_tokens=(
        s.chunk_steps + 2 if i == 0 else 2))) for i, r in enumerate(reqs[:s.magpie_batch + 2])]
    first = timed(lambda: sampler.generate(warm))[0]
    wall, out = timed(lambda: sampler.generate(reqs))
    tokens = sum(len(c.tokens) for c in out)
    assert tokens == sum(n for _, n in work)
    return {"side": "ours", "preset": s.decode_preset, "requests": len(reqs),
            "batch_slots": s.magpie_batch, "chunk_steps": s.chunk_steps, "greedy": True,
            "useful_tokens": tokens, "wall_s": round(wall, 3), "warmup_s": round(first, 2),
            "tokens_per_s": round(tokens / wall, 1)}


def run_group(s: Settings, deadline: float) -> None:
    """Every JAX section, in priority order, each guarded."""
    import jax

    dev: dict[str, Any] = {}

    def device():
        dev.update(device_record(s))
        return dev

    guarded("device_jax", device, deadline)
    if not s.smoke and jax.default_backend() != "gpu":
        emit({"section": "device_jax", "error": f"JAX runs on {jax.default_backend()}, not a "
              "GPU: install jax[cuda12] (pip install -e '.[cuda]'); the JAX sections are "
              "skipped (the 8B shapes would take hours on a CPU)"})
        return
    peak, bandwidth = dev.get("peak_flops"), dev.get("hbm_bandwidth")
    for preset in s.presets:
        for seq in s.seq_lens:
            # The first shape also times packed rows (the masked attention branch).
            packed = s.packed_docs if s.extras and (preset, seq) == (
                s.presets[0], s.seq_lens[0]) else 0
            guarded("train", lambda p=preset, t=seq, k=packed: train_ours(
                s, peak, p, t, packed_docs=k), deadline)
            gc.collect()  # the previous step's state and weights
    model: dict[str, Any] = {}
    samplers: dict[int, Any] = {}

    def build():
        model["m"] = decode_model(s)
        return {"preset": s.decode_preset, "weight_bytes": weight_bytes(model["m"])}

    guarded("decode_model", build, deadline)
    if "m" in model:
        for b in s.decode_batches:
            guarded("decode", lambda b=b: decode_ours(s, model["m"], samplers, bandwidth, b),
                    deadline)
        guarded("magpie", lambda: magpie_ours(s, model["m"], samplers), deadline)
    model.clear()
    samplers.clear()
    gc.collect()
    if s.extras and s.alt_remat:  # best-settings probe: a remat that saves matmul outputs
        guarded("train_extra", lambda: train_ours(s, peak, s.presets[-1], s.seq_lens[-1],
                                                  remat=s.alt_remat), deadline)
    emit({"section": "done_jax", "backend": jax.default_backend(),
          "peak_bytes_in_use": peak_memory()})


if __name__ == "__main__":  # pragma: no cover - run through benchmarks/gpu.py
    raise SystemExit("run benchmarks/gpu.py")
