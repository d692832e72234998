"""``benchmarks/gpu.py --memory-only``: the 8B LoRA train step at 8192 tokens, compiled ahead of
time on this host's CPU backend from abstract weights, its ``memory_analysis()`` against an
80 GiB card.

Nothing is allocated: the model comes from ``nnx.eval_shape`` and ``assemble_setup(...,
abstract=True)`` (as ``basque-jax plan`` does). The CPU compiler's buffer assignment is an
estimate for a GPU: XLA:GPU fuses and schedules differently, cuBLAS/cuDNN add workspaces, and
JAX itself keeps part of the card (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 by default). cuDNN
attention does not lower on a CPU, so two stand-ins bracket it: ``xla`` (our reference kernel;
it materialises the ``[heads, q, k]`` logits of one layer at a time, far more than flash
attention needs) and ``splash_interpret`` (the Pallas flash kernel in interpret mode: blockwise,
only the output and log-sum-exp kept, as cuDNN's flash kernel does).

XLA:CPU runs bfloat16 matmuls in float32: it converts each weight and, left alone, hoists those
converts out of the layer loop, so the whole stacked frozen base would sit in float32 among
the temporaries (about 0.9 GiB a layer for 8B; a GPU runs bf16 matmuls natively). The compile
therefore disables that one pass (``MEMORY_XLA_FLAGS``); measured on 2- and 4-layer copies of
the 8B step, the temporaries then grow by 64 MiB a layer under ``remat: full`` -- the saved
residual stream, as expected.
"""

from __future__ import annotations

from typing import Any

from gpu_common import GiB, Settings, timed
from gpu_jax import run_config

CARD_BYTES = 80 * GiB
MEMORY_XLA_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def step_memory(s: Settings, preset: str, seq_len: int, batch: int, remat: str,
                attention: str, loss_chunk: int) -> dict[str, Any]:
    """Per-device memory of the compiled train step (arguments + outputs - aliased +
    temporaries + code)."""
    import dataclasses
    import os

    import jax
    from flax import nnx

    from basque_jax.data.batch import BATCH_KEYS
    from basque_jax.model.config import LlamaConfig
    from basque_jax.runs import construct
    from basque_jax.sharding import mesh_and_rules, use_sharding
    from basque_jax.train.setup import assemble_setup

    s = dataclasses.replace(s, attention=attention, loss_chunk=loss_chunk)
    cfg = run_config(s, preset, seq_len, batch, remat)
    mesh, rules = mesh_and_rules(cfg.mesh, jax.devices()[:1])
    with use_sharding(mesh, rules):
        model = nnx.eval_shape(lambda: construct(cfg, LlamaConfig.preset(preset)))
        setup = assemble_setup(cfg, mesh, rules, model, abstract=True)
        batch_abs = {k: jax.ShapeDtypeStruct((batch, seq_len), dtype,
                                             sharding=setup.batch_sharding)
                     for k, dtype in BATCH_KEYS.items()}
        lowered = setup.step_fn.lower(setup.state, setup.frozen, batch_abs)
        compile_s, compiled = timed(lowered.compile)
    m = compiled.memory_analysis()
    parts = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
             "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
             "code": int(m.generated_code_size_in_bytes)}
    total = (parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"]
             + parts["code"])
    return {"preset": preset, "seq_len": seq_len, "batch": batch, "remat": remat,
            "loss_chunk": loss_chunk, "attention_stand_in": attention,
            "backend": jax.default_backend(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            **parts, "total": total,
            "total_gib": round(total / GiB, 2), "card_gib": CARD_BYTES / GiB,
            "fraction_of_card": round(total / CARD_BYTES, 3),
            "fits_80gib": total <= CARD_BYTES, "compile_s": round(compile_s, 1),
            "note": "CPU-compiled estimate for a GPU (see benchmarks/gpu_memory.py)"}


def dense_logits_bytes(preset: str, seq_len: int, batch: int) -> int:
    """float32 attention logits of one layer in our ``xla`` kernel (causal query blocks)."""
    from basque_jax.model.attention import causal_query_blocks
    from basque_jax.model.config import LlamaConfig

    cfg = LlamaConfig.preset(preset)
    n = causal_query_blocks(seq_len)
    block = seq_len // n
    keys = sum(block * (i + 1) for i in range(n)) if n > 1 else seq_len
    return 4 * batch * cfg.num_attention_heads * block * keys


def memory_cases(s: Settings) -> list[dict[str, Any]]:
    """The cases to compile: the configured remat and the matmul-saving one, each with both
    attention stand-ins (flash-like first), and the configured one with a chunked loss."""
    preset, seq = s.presets[-1], s.seq_lens[-1]
    base = dict(preset=preset, seq_len=seq, batch=s.batch_for(preset, seq),
                loss_chunk=s.loss_chunk)
    remats = [r for r in (s.remat, s.alt_remat) if r]
    # The smoke compiles the cheap stand-in only (interpret-mode Pallas is slow to compile).
    stand_ins = ("xla",) if s.smoke else ("splash_interpret", "xla")
    cases = [base | dict(remat=r, attention=a) for r in remats for a in stand_ins]
    if not s.smoke and s.loss_chunk == 0:
        cases.append(base | dict(remat=s.remat, attention="splash_interpret", loss_chunk=1024))
    return cases
