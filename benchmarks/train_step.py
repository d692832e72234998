"""LoRA training tokens/s: our jitted step vs Hugging Face transformers + PEFT (torch, CPU).

Same Llama config, LoRA targets/rank, batch, sequence length and optimizer (AdamW) on both
sides; each side's achieved FLOP/s (analytic LoRA training FLOPs, ``train/flops.py``) is shown
as a fraction of this machine's fp32 matmul peak, measured in the same run (best of torch and
XLA on a large square matmul). The two sides alternate ``--repeats`` times (same machine load)
and the best of each counts. Our layers run unrolled (``model.scan_unroll: true``, as the
transformers model runs them) unless ``--scan-unroll 1``. Prints one JSON line.

    python benchmarks/train_step.py [--steps 6 --batch 4 --seq-len 512 --rank 16]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def matmul_peak(n: int = 2048, reps: int = 10) -> dict[str, float]:
    """fp32 matmul FLOP/s of torch and of XLA on this machine (best of ``reps``)."""
    import jax
    import jax.numpy as jnp
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    best_t = min(_time(lambda: torch.mm(a, b)) for _ in range(reps))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda u, v: u @ v)
    f(x, x).block_until_ready()
    best_j = min(_time(lambda: f(x, x).block_until_ready()) for _ in range(reps))
    flops = 2.0 * n**3
    return {"torch": flops / best_t, "xla": flops / best_j}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ours(args, batch_np) -> float:
    """Seconds per step of our LoRA train step (compile excluded)."""
    import jax

    from basque_jax.config import RunConfig
    from basque_jax.sharding import use_sharding
    from basque_jax.train.setup import setup_training

    cfg = RunConfig.from_dict({
        "model": {"preset": "bench", "attention": "xla", "remat": args.remat,
                  "scan_unroll": True if args.scan_unroll == "true" else int(args.scan_unroll)},
        "lora": {"enabled": True, "rank": args.rank, "alpha": 2.0 * args.rank,
                 "targets": TARGETS},
        "data": {"sources": [{"kind": "corpus", "path": "unused.jsonl"}],
                 "seq_len": args.seq_len, "batch_size": args.batch},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "optim": {"lr": 1e-4, "weight_decay": 0.0, "clip_norm": None, "warmup_ratio": 0.0},
        "train": {"steps": 1000, "loss_chunk": args.loss_chunk},
    })
    setup = setup_training(cfg, devices=jax.devices()[:1])
    state = setup.state
    with use_sharding(setup.mesh, setup.rules):
        batch = setup.global_batch(batch_np)
        for _ in range(2):  # compile + warm up
            state, m = setup.step_fn(state, setup.frozen, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = setup.step_fn(state, setup.frozen, batch)
        jax.block_until_ready((state, m))
    return (time.perf_counter() - t0) / args.steps


def hf_peft(args, batch_np) -> float:
    """Seconds per step of transformers + PEFT with torch AdamW (warm-up excluded)."""
    import peft
    import torch
    import transformers

    from basque_jax.model.config import LlamaConfig

    ours_cfg = LlamaConfig.preset("bench")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in ours_cfg.to_hf_dict().items()
                                         if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg)
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    ids = torch.as_tensor(batch_np["input_ids"], dtype=torch.long)
    labels = torch.as_tensor(batch_np["targets"], dtype=torch.long)

    def step():
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    return (time.perf_counter() - t0) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan-unroll", default="true", help="layers per loop iteration, "
                        "or true (no loop)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--loss-chunk", type=int, default=0,
                        help="sequence chunk of the output projection + loss (0: whole)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from basque_jax.model.config import LlamaConfig
    from basque_jax.train.flops import train_flops_per_token

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, size=(args.batch, args.seq_len + 1)).astype(np.int32)
    batch = {
        "input_ids": ids[:, :-1], "targets": ids[:, 1:],
        "loss_mask": np.ones((args.batch, args.seq_len), np.float32),
        "positions": np.tile(np.arange(args.seq_len, dtype=np.int32), (args.batch, 1)),
        "segment_ids": np.ones((args.batch, args.seq_len), np.int32),
    }
    tokens = args.batch * args.seq_len
    flops_per_step = tokens * train_flops_per_token(
        LlamaConfig.preset("bench"), args.seq_len, lora_rank=args.rank, lora_targets=TARGETS)
    peak = matmul_peak()
    machine_peak = max(peak.values())
    t_ours = t_hf = float("inf")
    for _ in range(args.repeats):
        t_ours = min(t_ours, ours(args, batch))
        t_hf = min(t_hf, hf_peft(args, batch))
    result = {
        "benchmark": "lora_train_step",
        "shape": {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 2, "vocab": 32000,
                  "seq_len": args.seq_len, "batch": args.batch, "rank": args.rank,
                  "targets": len(TARGETS), "remat": args.remat, "loss_chunk": args.loss_chunk,
                  "scan_unroll": args.scan_unroll},
        "ours_tokens_per_s": round(tokens / t_ours, 1),
        "hf_peft_tokens_per_s": round(tokens / t_hf, 1),
        "speedup_vs_hf_peft": round(t_hf / t_ours, 3),
        "ours_fraction_of_peak": round(flops_per_step / t_ours / machine_peak, 3),
        "hf_peft_fraction_of_peak": round(flops_per_step / t_hf / machine_peak, 3),
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()},
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
