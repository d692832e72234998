"""New tokens/s of our compiled KV-cache sampler vs. transformers' ``generate`` (torch, CPU)
and vs. Tunix's sampler (a JAX peer in its own ``.venv-tunix``).

Same weights (the ``bench`` preset: hidden 512, 4 layers, 8 heads / 2 KV heads, vocab 32000,
random init, float32 on both sides), same prompts (64 random tokens), 128 new tokens, greedy,
no stop token, at batch 1, 8 and 32. Compile time is excluded: each side runs once to warm up,
then ``--repeats`` timed runs alternate between the sides (and the bound below) and the best
of each counts (prefill included on both sides; alternating exposes all to the same machine
load). torch
runs with its default thread count and with one thread (its best counts: on a loaded machine
its OpenMP threads can stall badly). Prints one JSON line per batch size (with the 1-minute
load average) and a summary line with the ratios.

Tunix (``tunix.generate.sampler.Sampler``: static batch, KV cache, greedy; its Llama 3 model at
this shape, float32, random weights) runs in a long-lived subprocess (``tunix_peer.py``) that
takes its turn in each repeat, when ``bash benchmarks/tunix_venv.sh`` has created its
environment; the rows say why otherwise (``tunix_unavailable``).

``matmul_floor_tok_s`` is a bound, measured in the same run: a compiled loop of 128 steps
doing only the model's per-token matmuls (embedding gather, fused q/k/v, o, fused gate/up,
down, output head, argmax) on arrays of the model's shapes -- no attention, norms, rotary
embedding or cache. No XLA:CPU decoder of this model can beat it; ``floor_over_hf`` is the
largest speed-up over ``generate`` that any such implementation could show on this machine.
The bound has no prefill, so our decode steps are set against it on their own:
``ours_decode_tok_s`` is ``batch x (new_tokens - 1)`` over the time of the full run minus that
of a run with one new token (prefill and first token only, timed in the same alternation), and
``ours_decode_of_floor`` its fraction of the bound; ``ours_of_floor`` keeps the prefill in.

    python benchmarks/sampler.py [--batches 1,8,32 --prompt-len 64 --new-tokens 128]

XLA's CPU backend runs float32 matmuls through Eigen or, with an experimental flag, through
XNNPACK/YNNPACK. ``--xla-dot ynn`` (the default here) sets
``--xla_cpu_experimental_ynn_fusion_type=dot`` (fastest here for these shapes); ``eigen``
measures without any flag. The choice is reported in the output; the numbers are float32 on
both sides (bfloat16 matmuls are slower than float32 on XLA:CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

DOT_FLAGS = {"ynn": "--xla_cpu_experimental_ynn_fusion_type=dot",
             "xnn": "--xla_cpu_experimental_xnn_fusion_type=dot", "eigen": ""}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--preset", default="bench",
                   help="model shape, random weights (bench; smollm2-135m: SmolLM2-135M's)")
    p.add_argument("--xla-dot", choices=tuple(DOT_FLAGS), default="ynn")
    p.add_argument("--skip-hf", action="store_true", help="only time our sampler")
    p.add_argument("--skip-tunix", action="store_true", help="leave the Tunix peer out")
    return p.parse_args(argv)


def timed(fn) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def matmul_floor(config, b: int, steps: int):
    """A compiled run of the bare per-token matmul chain at batch ``b`` (see module doc):
    call it to run ``steps`` steps (``b * steps`` tokens)."""
    import jax
    import jax.numpy as jnp

    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = config.resolved_head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 4 * config.num_hidden_layers + 2))

    def w(*shape):
        return jax.random.normal(next(keys), shape, jnp.float32) * 0.02

    layers = [(w(h, qkv), w(config.num_attention_heads * d, h), w(h, 2 * i), w(i, h))
              for _ in range(config.num_hidden_layers)]
    embed, head = w(v, h), w(h, v)

    @jax.jit
    def run(tok, layers, embed, head):
        def step(_, tok):
            x = embed[tok]
            for w_qkv, w_o, w_gu, w_down in layers:
                x = x + (x @ w_qkv)[:, :w_o.shape[0]] @ w_o
                gate, up = jnp.split(x @ w_gu, 2, axis=-1)
                x = x + (jax.nn.silu(gate) * up) @ w_down
            return jnp.argmax(x @ head, axis=-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, step, tok)

    tok = jnp.zeros((b,), jnp.int32)
    run(tok, layers, embed, head).block_until_ready()  # compile
    return lambda: run(tok, layers, embed, head).block_until_ready()


def bench_batch(model, hf, peer, b: int, args) -> dict[str, Any]:
    """One batch size: warm both sides up, then alternate timed runs; best of each."""
    import numpy as np
    import torch

    from basque_jax.sample import Sampler, SamplingParams
    from basque_jax.sample.sampler import SamplerConfig

    n_new, plen = args.new_tokens, args.prompt_len
    prompts = np.random.default_rng(b).integers(0, model.config.vocab_size, (b, plen))
    params = SamplingParams(temperature=0.0, max_new_tokens=n_new)
    first_only = SamplingParams(temperature=0.0, max_new_tokens=1)
    sampler = Sampler(model, SamplerConfig(batch_size=b, max_len=plen + n_new))
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def ours():
        return sampler.generate(prompts.tolist(), params)

    def theirs():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, do_sample=False,
                               max_new_tokens=n_new, use_cache=True)

    def prefill():  # prefill and the first token only: what ``ours`` adds decode steps to
        return sampler.generate(prompts.tolist(), first_only)

    first_s, ours_out = timed(ours)  # compiles
    prefill()
    bound = matmul_floor(model.config, b, n_new)
    if hf is not None:
        theirs()  # warm-up
    ours_s = prefill_s = bound_s = hf_s = tunix_s = float("inf")
    hf_out, hf_threads, tunix_error = None, None, None
    default_threads = torch.get_num_threads()
    for _ in range(args.repeats):
        ours_s = min(ours_s, timed(ours)[0])
        prefill_s = min(prefill_s, timed(prefill)[0])
        bound_s = min(bound_s, timed(bound)[0])
        if not isinstance(peer, str) and tunix_error is None:
            r = peer.request("decode", batch=b, prompt_len=plen, new_tokens=n_new)
            tunix_error = r.get("error")
            tunix_s = min(tunix_s, r.get("seconds", float("inf")))
        for threads in (default_threads, 1) if hf is not None else ():
            torch.set_num_threads(threads)  # the baseline's best setting counts
            t, hf_out = timed(theirs)
            if t < hf_s:
                hf_s, hf_threads = t, threads
    torch.set_num_threads(default_threads)
    assert all(len(c.tokens) == n_new for c in ours_out)
    row: dict[str, Any] = {"batch": b, "prompt_len": plen, "new_tokens": n_new,
                           "ours_tok_s": round(b * n_new / ours_s, 1),
                           "ours_first_call_s": round(first_s, 2)}
    floor = b * n_new / bound_s
    decode = b * (n_new - 1) / max(ours_s - prefill_s, 1e-9)  # steps 2..n_new
    row |= {"matmul_floor_tok_s": round(floor, 1),
            "ours_of_floor": round(b * n_new / ours_s / floor, 2),
            "ours_prefill_s": round(prefill_s, 4), "ours_decode_tok_s": round(decode, 1),
            "ours_decode_of_floor": round(decode / floor, 2)}
    if isinstance(peer, str) or tunix_error:
        row["tunix_unavailable"] = tunix_error or peer
    else:
        row |= {"tunix_tok_s": round(b * n_new / tunix_s, 1),
                "speedup_vs_tunix": round(tunix_s / ours_s, 2)}
    if hf is not None:
        gen = hf_out[:, plen:].numpy()
        assert gen.shape == (b, n_new), gen.shape
        same = np.mean([c.tokens == gen[i].tolist() for i, c in enumerate(ours_out)])
        row |= {"hf_generate_tok_s": round(b * n_new / hf_s, 1),
                "speedup": round(hf_s / ours_s, 2), "rows_identical_to_hf": float(same),
                "floor_over_hf": round(floor * hf_s / (b * n_new), 2),
                "hf_best_torch_threads": hf_threads}
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if DOT_FLAGS[args.xla_dot]:
        flags = f"{os.environ.get('XLA_FLAGS', '')} {DOT_FLAGS[args.xla_dot]}"
        os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch
    from flax import nnx
    from transformers import LlamaForCausalLM

    from basque_jax.model.config import LlamaConfig
    from basque_jax.model.hf import save_pretrained
    from basque_jax.model.llama import Llama

    model = Llama(LlamaConfig.preset(args.preset), rngs=nnx.Rngs(0))
    hf = None
    if not args.skip_hf:
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, tmp)
            hf = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
    from tunix_client import open_peer

    peer = open_peer(model.config) if not args.skip_tunix else "--skip-tunix"
    if isinstance(peer, str):
        print(f"Tunix peer not run: {peer}", file=sys.stderr, flush=True)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        row = bench_batch(model, hf, peer, b, args)
        row |= {"preset": args.preset, "dtype": "float32", "xla_dot": args.xla_dot,
                "jax_backend": jax.default_backend(), "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if hf is not None:
        print(json.dumps({
            "benchmark": "sampler",
            "baseline": "transformers.generate (torch CPU, KV cache, greedy, float32)",
            "ours_tok_s": {r["batch"]: r["ours_tok_s"] for r in rows},
            "hf_generate_tok_s": {r["batch"]: r["hf_generate_tok_s"] for r in rows},
            "speedup_by_batch": {r["batch"]: r["speedup"] for r in rows},
            "matmul_floor_over_hf": {r["batch"]: r["floor_over_hf"] for r in rows},
            "ours_decode_of_floor": {r["batch"]: r["ours_decode_of_floor"] for r in rows},
            "min_speedup": min(r["speedup"] for r in rows),
            "tunix_tok_s": {r["batch"]: r.get("tunix_tok_s") for r in rows},
            "speedup_vs_tunix": {r["batch"]: r.get("speedup_vs_tunix") for r in rows},
            "tunix": peer.versions if not isinstance(peer, str) else None}), flush=True)
    if not isinstance(peer, str):
        peer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
