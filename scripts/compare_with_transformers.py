"""Check a real Hugging Face Llama folder against transformers before trusting it.

Loads the folder with basque_jax and with transformers (PyTorch), runs both on the same token
ids and prints the max / mean |Δ logits| and whether the greedy next tokens agree. Use it on a
downloaded checkpoint (e.g. Llama-3.1-8B-Instruct) on a machine with enough memory:

    python scripts/compare_with_transformers.py /path/to/Llama-3.1-8B-Instruct --dtype float32
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=64, help="sequence length to compare")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import jax.numpy as jnp
    import torch
    from transformers import LlamaForCausalLM

    from basque_jax import load_pretrained

    ours = load_pretrained(args.folder, dtype=args.dtype, attention="xla")
    vocab = ours.config.vocab_size
    ids = np.random.default_rng(args.seed).integers(0, vocab, size=(1, args.tokens))
    mine = np.asarray(ours(jnp.asarray(ids, jnp.int32)).astype(jnp.float32))
    del ours
    ref_model = LlamaForCausalLM.from_pretrained(args.folder, dtype=getattr(torch, args.dtype))
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(ids)).logits.float().numpy()
    diff = np.abs(mine - ref)
    print(json.dumps({
        "folder": args.folder, "dtype": args.dtype, "tokens": args.tokens,
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "greedy_agreement": float(np.mean(mine.argmax(-1) == ref.argmax(-1))),
    }))


if __name__ == "__main__":
    main()
