"""A JAX peer for the CPU benchmarks: Tunix (google-tunix, LoRA through qwix) on the same shapes.

Runs inside ``.venv-tunix`` (``bash benchmarks/tunix_venv.sh``; Tunix pins safetensors<0.8,
the project 0.8.0), so it imports nothing from basque_jax: the model shape comes as JSON.

* ``train``: Tunix's own jitted LoRA step (``PeftTrainer.jit_train_and_eval_step``, the step
  ``PeftTrainer.train`` runs: its default loss, ``nnx.Optimizer`` over ``nnx.LoRAParam``, the
  optimizer donated) of its Llama 3 model (``tunix.models.llama3``) with qwix LoRA adapters on
  the seven projections, AdamW as ours. Tunix's loss predicts ``seq_len - 1`` targets from the
  ``seq_len`` tokens it runs (the same forward shape as ours).
* ``decode``: ``tunix.generate.sampler.Sampler`` (static batch, KV cache, greedy) on prompts of
  random ids (a tokenizer that reads ids from strings), no stop id.

Parameters are float32 (Tunix's model has no dtype option), random normal (std 0.02).
``--serve`` answers JSON requests on stdin, one JSON line each (how ``train_step.py`` and
``sampler.py`` alternate it with their other sides); ``--op`` runs one and prints its line.

    .venv-tunix/bin/python benchmarks/tunix_peer.py --shape '{...}' --op train
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import metadata
from typing import Any

import numpy as np

TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


def build_model(shape: dict[str, Any]):
    """Tunix's Llama 3 of ``shape`` (our LlamaConfig field names), weights ~ N(0, 0.02)."""
    import jax
    from flax import nnx
    from tunix.models.llama3 import model as llama3

    cfg = llama3.ModelConfig(
        num_layers=shape["num_hidden_layers"], vocab_size=shape["vocab_size"],
        embed_dim=shape["hidden_size"], hidden_dim=shape["intermediate_size"],
        num_heads=shape["num_attention_heads"], head_dim=shape["head_dim"],
        num_kv_heads=shape["num_key_value_heads"], rope_theta=int(shape["rope_theta"]),
        norm_eps=shape["rms_norm_eps"], weight_tying=shape["tie_word_embeddings"])
    model = llama3.Llama3(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) * 0.02 if x.ndim >= 2 else x
              for k, x in zip(keys, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


class Peer:
    """Builds (once per shape of request) and times Tunix's train step and sampler."""

    def __init__(self, shape: dict[str, Any]):
        self.shape = shape
        self.trainers: dict[tuple, Any] = {}
        self.samplers: dict[tuple, Any] = {}

    def train(self, batch: int = 4, seq_len: int = 512, rank: int = 16, steps: int = 6,
              lr: float = 1e-4) -> dict[str, Any]:
        import jax
        import jax.numpy as jnp
        import optax
        import qwix
        from flax import nnx
        from tunix.sft import peft_trainer
        from tunix.sft import utils as sft_utils

        key = (batch, seq_len, rank)
        first = None
        if key not in self.trainers:
            t0 = time.perf_counter()
            model = build_model(self.shape)
            provider = qwix.LoraProvider(module_path=f".*({TARGETS})", rank=rank,
                                         alpha=2.0 * rank)
            model = qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(1),
                                             **model.get_model_input())
            lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
            trainer = peft_trainer.PeftTrainer(
                model, optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0),
                peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=10**9))

            def model_inputs(x: peft_trainer.TrainingInput) -> dict[str, Any]:
                return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                        "positions": sft_utils.build_positions_from_mask(x.input_mask),
                        "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}

            trainer = trainer.with_gen_model_input_fn(model_inputs)
            step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
            ids = np.random.default_rng(0).integers(1, self.shape["vocab_size"],
                                                    (batch, seq_len)).astype(np.int32)
            data = peft_trainer.TrainingInput(input_tokens=jnp.asarray(ids),
                                              input_mask=jnp.ones(ids.shape, bool))
            for _ in range(2):  # compile + warm up
                loss = step(data)[0]
            jax.block_until_ready(loss)
            self.trainers[key] = (step, data, lora)
            first = time.perf_counter() - t0
        step, data, lora = self.trainers[key]
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step(data)[0]
        jax.block_until_ready(loss)
        dt = (time.perf_counter() - t0) / steps
        return {"op": "train", "batch": batch, "seq_len": seq_len, "rank": rank,
                "seconds_per_step": dt, "tokens_per_s": batch * seq_len / dt,
                "setup_and_compile_s": first, "loss": float(loss), "lora_parameters": lora}

    def decode(self, batch: int = 1, prompt_len: int = 64, new_tokens: int = 128
               ) -> dict[str, Any]:
        from tunix.generate import sampler as sampler_lib

        key = (batch, prompt_len, new_tokens)
        prompts = np.random.default_rng(batch).integers(1, self.shape["vocab_size"],
                                                        (batch, prompt_len))
        texts = [" ".join(map(str, row)) for row in prompts]
        def run(sampler) -> None:
            out = sampler(texts, max_generation_steps=new_tokens, max_prompt_length=prompt_len,
                          temperature=0.0, eos_tokens=[-1])
            assert all(len(t) == new_tokens for t in out.tokens), [len(t) for t in out.tokens]

        first = None
        if key not in self.samplers:
            t0 = time.perf_counter()
            model = build_model(self.shape)
            cache = sampler_lib.CacheConfig(
                cache_size=prompt_len + new_tokens, num_layers=self.shape["num_hidden_layers"],
                num_kv_heads=self.shape["num_key_value_heads"], head_dim=self.shape["head_dim"])
            self.samplers[key] = sampler_lib.Sampler(model, IdTokenizer(), cache)
            run(self.samplers[key])  # compiles
            first = time.perf_counter() - t0
        sampler = self.samplers[key]
        t0 = time.perf_counter()
        run(sampler)
        dt = time.perf_counter() - t0
        return {"op": "decode", "batch": batch, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "seconds": dt, "tok_s": batch * new_tokens / dt,
                "first_call_s": first}


class IdTokenizer:
    """Token ids written as space-separated integers (Tunix's sampler takes strings)."""

    def encode(self, text: str, **_: Any) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int], **_: Any) -> str:
        return " ".join(map(str, ids))

    def bos_id(self) -> int:
        return 0  # falsy: Tunix adds no BOS

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return 0


def versions() -> dict[str, str]:
    return {n: metadata.version(n) for n in ("google-tunix", "qwix", "jax", "flax")}


def handle(peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
    op = request.pop("op")
    try:
        return getattr(peer, op)(**request)
    except Exception as e:  # noqa: BLE001  (reported to the caller, which keeps going)
        return {"op": op, "error": f"{type(e).__name__}: {e}"[:2000]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True, help="JSON: our LlamaConfig field names")
    p.add_argument("--serve", action="store_true", help="JSON requests on stdin")
    p.add_argument("--op", choices=("train", "decode"))
    p.add_argument("--args", default="{}", help="JSON keyword arguments of --op")
    args = p.parse_args(argv)
    peer = Peer(json.loads(args.shape))
    if not args.serve:
        print(json.dumps({"tunix_peer": versions(), **handle(
            peer, {"op": args.op or "train", **json.loads(args.args)})}), flush=True)
        return 0
    print(json.dumps({"ready": True, "versions": versions()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        print(json.dumps(handle(peer, request)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
