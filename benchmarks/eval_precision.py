"""How far float32 log-likelihoods are from float64 ones: ours, transformers', torch's kernel.

Acceptance for lm-eval asks per-request log-likelihoods of ``basque_jax`` within 1e-4 of
lm-eval's float32 ``hf`` backend. This measures what that reference itself is worth. On
``--docs`` BHTC-eu news paragraphs (the rolling-loglikelihood data), each scored as one row of
up to ``--max-tokens`` tokens, it compares every next-token log-probability against
transformers run in float64:

* ``forward``: the float32 forward pass alone (log-softmax taken in float64 on its logits),
  for ours (``basque_jax``) and for transformers;
* ``log_softmax``: the float32 log-softmax alone on transformers' float32 logits, as torch's
  CPU kernel computes it (what lm-eval's ``hf`` backend calls, unless ``softmax_dtype`` is set)
  and as our scorer computes it (``model/loss.py::target_logprobs``).

Per source: the per-token mean (bias), standard deviation and max of the error, and the
largest |summed error| over any ``--window`` consecutive tokens -- a continuation of that
length, the unit lm-eval compares. One JSON line per source.

    python benchmarks/eval_precision.py [--model smollm2-135m-instruct --docs 4 --window 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

BHTC = Path(__file__).resolve().parents[2] / "shared" / "data" / "eu" / "bhtc_news_val.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", type=Path, default=BHTC)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--window", type=int, default=32)
    return p.parse_args(argv)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """Exact (float64) log-softmax over the last axis."""
    from scipy.special import log_softmax

    return log_softmax(logits.astype(np.float64), axis=-1)


def picked(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Log-probability of each next token ``[len(ids) - 1]``."""
    return np.take_along_axis(logp[:-1], ids[1:, None], axis=-1)[:, 0].astype(np.float64)


def error_stats(errors: list[np.ndarray], window: int) -> dict[str, float]:
    flat = np.concatenate(errors)
    sums = [np.convolve(e, np.ones(window), "valid") for e in errors if len(e) >= window]
    return {"tokens": int(flat.size), "mean": float(flat.mean()), "std": float(flat.std()),
            "max": float(np.abs(flat).max()),
            f"max_abs_sum_{window}": float(max(np.abs(s).max() for s in sums)) if sums else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"eval_precision: missing data file {args.data}", file=sys.stderr)
        return 2
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from basque_jax.model.gguf import model_path
    from basque_jax.model.loss import target_logprobs
    from basque_jax.runs import load_model

    folder = model_path(args.model)
    if not (folder / "config.json").is_file():
        print(f"eval_precision: {folder} is not a Hugging Face model folder", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lines = args.data.read_text(encoding="utf-8").splitlines()[: args.docs]
    rows = [np.asarray(tokenizer(json.loads(line)["text"]).input_ids[: args.max_tokens])
            for line in lines]
    hf32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf64 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    ours = load_model(folder, dtype="float32", devices=jax.devices()[:1]).model
    forward = jax.jit(lambda model, ids: model(ids))
    ours_logprobs = jax.jit(lambda logits, targets: target_logprobs(
        logits, targets, jnp.ones(targets.shape, jnp.int32))[0])

    errors: dict[str, list[np.ndarray]] = {
        "forward/basque_jax": [], "forward/transformers": [],
        "log_softmax/torch_cpu": [], "log_softmax/basque_jax": []}
    for ids in rows:
        with torch.no_grad():
            exact = picked(log_softmax64(hf64(torch.from_numpy(ids)[None]).logits[0].numpy()), ids)
            logits32 = hf32(torch.from_numpy(ids)[None]).logits[0]
        ours_logits = np.asarray(forward(ours, jnp.asarray(ids)[None]))[0]
        exact_on_32 = picked(log_softmax64(logits32.numpy()), ids)
        errors["forward/basque_jax"].append(picked(log_softmax64(ours_logits), ids) - exact)
        errors["forward/transformers"].append(exact_on_32 - exact)
        errors["log_softmax/torch_cpu"].append(
            picked(torch.log_softmax(logits32, -1).numpy(), ids) - exact_on_32)
        ours_lp = ours_logprobs(jnp.asarray(logits32.numpy()[:-1]), jnp.asarray(ids[1:]))
        errors["log_softmax/basque_jax"].append(np.asarray(ours_lp, np.float64) - exact_on_32)
    for source, errs in errors.items():
        print(json.dumps({"source": source, "model": str(args.model), "docs": len(rows),
                          **error_stats(errs, args.window)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
