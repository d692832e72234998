"""LoRA training tokens/s: our jitted step vs Hugging Face transformers + PEFT (torch, CPU)
and vs Tunix (a JAX peer: google-tunix with qwix LoRA, in its own ``.venv-tunix``).

Same Llama config, LoRA targets/rank, batch, sequence length and optimizer (AdamW) on both
sides; each side's achieved FLOP/s (analytic LoRA training FLOPs, ``train/flops.py``) is shown
as a fraction of this machine's fp32 matmul peak, measured in the same run (best of torch and
XLA on a large square matmul). The sides alternate ``--repeats`` times (same machine load)
and the best of each counts. Tunix runs in a long-lived subprocess (``tunix_peer.py``, started
once so its compiled step stays warm) when ``bash benchmarks/tunix_venv.sh`` has created its
environment; otherwise the output says why it is missing (``tunix_unavailable``). Our layers
run unrolled (``model.scan_unroll: true``, as the transformers model runs them) unless
``--scan-unroll 1``. Prints one JSON line.

    python benchmarks/train_step.py [--preset bench|smollm2-135m --steps 6 --batch 4
                                     --seq-len 512 --rank 16 --skip-tunix]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def our_setup(args):
    """Our LoRA training setup for the benchmark's shape (``basque_jax.train.setup``)."""
    import jax

    from basque_jax.config import RunConfig
    from basque_jax.train.setup import setup_training

    cfg = RunConfig.from_dict({
        "model": {"preset": args.preset, "attention": "xla", "remat": args.remat,
                  "scan_unroll": True if args.scan_unroll == "true" else int(args.scan_unroll)},
        "lora": {"enabled": True, "rank": args.rank, "alpha": 2.0 * args.rank,
                 "targets": TARGETS},
        "data": {"sources": [{"kind": "corpus", "path": "unused.jsonl"}],
                 "seq_len": args.seq_len, "batch_size": args.batch},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "optim": {"lr": 1e-4, "weight_decay": 0.0, "clip_norm": None, "warmup_ratio": 0.0},
        "train": {"steps": 1000, "loss_chunk": args.loss_chunk},
    })
    return setup_training(cfg, devices=jax.devices()[:1])


def ours(args, batch_np) -> float:
    """Seconds per step of our LoRA train step (compile excluded)."""
    import jax

    from basque_jax.sharding import use_sharding

    setup = our_setup(args)
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
    step = hf_peft_step(args, batch_np)
    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    return (time.perf_counter() - t0) / args.steps


def hf_peft_step(args, batch_np):
    """One transformers + PEFT training step (forward, float32 cross-entropy, backward,
    AdamW) as a callable."""
    import peft
    import torch
    import transformers

    from basque_jax.model.config import LlamaConfig

    ours_cfg = LlamaConfig.preset(args.preset)
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

    return step


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench", choices=("bench", "smollm2-135m"),
                        help="model shape (random weights): the benchmark shape or SmolLM2-135M")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan-unroll", default="true", help="layers per loop iteration, "
                        "or true (no loop)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-tunix", action="store_true", help="leave the Tunix peer out")
    parser.add_argument("--loss-chunk", type=int, default=0,
                        help="sequence chunk of the output projection + loss (0: whole)")
    return parser.parse_args(argv)


def make_batch(args, vocab: int) -> dict[str, np.ndarray]:
    """Random tokens, one document per row, in the batch contract."""
    ids = np.random.default_rng(0).integers(0, vocab, size=(args.batch, args.seq_len + 1))
    ids = ids.astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "loss_mask": np.ones((args.batch, args.seq_len), np.float32),
            "positions": np.tile(np.arange(args.seq_len, dtype=np.int32), (args.batch, 1)),
            "segment_ids": np.ones((args.batch, args.seq_len), np.int32)}


def main() -> None:
    args = parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from basque_jax.model.config import LlamaConfig
    from basque_jax.train.flops import train_flops_per_token

    shape = LlamaConfig.preset(args.preset)
    batch = make_batch(args, shape.vocab_size)
    tokens = args.batch * args.seq_len
    flops_per_step = tokens * train_flops_per_token(
        shape, args.seq_len, lora_rank=args.rank, lora_targets=TARGETS)
    peak = matmul_peak()
    machine_peak = max(peak.values())
    from tunix_client import open_peer

    peer = open_peer(shape) if not args.skip_tunix else "--skip-tunix"
    if isinstance(peer, str):
        print(f"Tunix peer not run: {peer}", file=sys.stderr, flush=True)
    t_ours = t_hf = t_tunix = float("inf")
    tunix_error = None
    for _ in range(args.repeats):
        t_ours = min(t_ours, ours(args, batch))
        t_hf = min(t_hf, hf_peft(args, batch))
        if not isinstance(peer, str) and tunix_error is None:
            r = peer.request("train", batch=args.batch, seq_len=args.seq_len, rank=args.rank,
                             steps=args.steps)
            tunix_error = r.get("error")
            t_tunix = min(t_tunix, r.get("seconds_per_step", float("inf")))
    result = {
        "benchmark": "lora_train_step",
        "shape": {"preset": args.preset, "hidden": shape.hidden_size,
                  "layers": shape.num_hidden_layers, "heads": shape.num_attention_heads,
                  "kv_heads": shape.num_key_value_heads, "vocab": shape.vocab_size,
                  "tied": shape.tie_word_embeddings,
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
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if isinstance(peer, str) or tunix_error:
        result["tunix_unavailable"] = tunix_error or peer
    else:
        result |= {
            "tunix_tokens_per_s": round(tokens / t_tunix, 1),
            "speedup_vs_tunix": round(t_tunix / t_ours, 3),
            "tunix_fraction_of_peak": round(flops_per_step / t_tunix / machine_peak, 3),
            "tunix": peer.versions | {"dtype": "float32", "loss": "Tunix default (one-hot, "
                                      "seq_len - 1 targets)"}}
    if not isinstance(peer, str):
        peer.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
