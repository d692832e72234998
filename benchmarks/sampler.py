"""New tokens/s of our compiled KV-cache sampler vs. transformers' ``generate`` (torch, CPU).

Same weights (the ``bench`` preset, hidden 512, 4 layers, 8 heads / 2 KV heads, vocab 32000,
random init, float32 on both sides), same prompts (64 random tokens), 128 new tokens, greedy,
no stop token, at batch 1, 8 and 32. Compile time is excluded: each side runs once to warm up,
then the best of ``--repeats`` interleaved timed runs counts for each (prefill included on
both sides; interleaving exposes both to the same machine load). Prints one
JSON line per batch size and a summary line with the ratios.

    python benchmarks/sampler.py [--batches 1,8,32 --prompt-len 64 --new-tokens 128]

XLA's CPU backend runs matmuls through Eigen by default; ``--xla-dot xnn`` (the default here)
sets ``--xla_cpu_experimental_xnn_fusion_type=dot`` so they run through XNNPACK, which is 2-3x
faster for these shapes. The flag only changes how float32 matmuls are executed (reported in
the output); ``--xla-dot eigen`` measures without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

DOT_FLAGS = {"ynn": "--xla_cpu_experimental_ynn_fusion_type=dot",
             "xnn": "--xla_cpu_experimental_xnn_fusion_type=dot", "eigen": ""}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--preset", default="bench")
    p.add_argument("--xla-dot", choices=tuple(DOT_FLAGS), default="ynn")
    p.add_argument("--skip-hf", action="store_true", help="only time our sampler")
    return p.parse_args(argv)


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    if DOT_FLAGS[args.xla_dot]:
        flags = f"{os.environ.get('XLA_FLAGS', '')} {DOT_FLAGS[args.xla_dot]}"
        os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    import torch
    from flax import nnx
    from transformers import LlamaForCausalLM

    from basque_jax.model.config import LlamaConfig
    from basque_jax.model.hf import save_pretrained
    from basque_jax.model.llama import Llama
    from basque_jax.sample import Sampler, SamplingParams

    cfg = LlamaConfig.preset(args.preset)
    model = Llama(cfg, attention="xla", rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    n_new, plen = args.new_tokens, args.prompt_len
    params = SamplingParams(temperature=0.0, max_new_tokens=n_new)
    rng = np.random.default_rng(0)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = rng.integers(0, cfg.vocab_size, (b, plen)).astype(np.int32)
        sampler = Sampler(model, batch_size=b, max_len=plen + n_new)
        ours_out: list = []

        def ours():
            ours_out[:] = sampler.generate(prompts.tolist(), params)

        t0 = time.perf_counter()
        ours()  # compile + warm-up
        compile_s = time.perf_counter() - t0
        row = {"batch": b, "prompt_len": plen, "new_tokens": n_new,
               "ours_first_call_s": round(compile_s, 2)}
        ids = torch.tensor(prompts, dtype=torch.long)
        mask = torch.ones_like(ids)
        hf_out: list = []

        def theirs():
            with torch.no_grad():
                hf_out[:] = [hf.generate(ids, attention_mask=mask, do_sample=False,
                                         max_new_tokens=n_new, use_cache=True)]

        if not args.skip_hf:
            theirs()  # warm-up
        # interleaved repeats, best of each: both sides see the same machine load
        ours_s = hf_s = float("inf")
        for _ in range(args.repeats):
            ours_s = min(ours_s, best_time(ours, 1))
            if not args.skip_hf:
                hf_s = min(hf_s, best_time(theirs, 1))
        assert all(len(c.tokens) == n_new for c in ours_out)
        row["ours_tok_s"] = round(b * n_new / ours_s, 1)
        if not args.skip_hf:
            gen = hf_out[0][:, plen:].numpy()
            assert gen.shape == (b, n_new), gen.shape
            same = np.mean([c.tokens == gen[i].tolist() for i, c in enumerate(ours_out)])
            row |= {"hf_generate_tok_s": round(b * n_new / hf_s, 1),
                    "speedup": round(hf_s / ours_s, 2),
                    "rows_identical_to_hf": float(same)}
        row |= {"preset": args.preset, "dtype": "float32", "xla_dot": args.xla_dot,
                "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.skip_hf:
        summary = {"benchmark": "sampler", "baseline": "transformers.generate (torch CPU, "
                   "KV cache, greedy)", "speedup_by_batch": {r["batch"]: r["speedup"]
                                                            for r in rows},
                   "min_speedup": min(r["speedup"] for r in rows)}
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
