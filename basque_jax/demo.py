"""The demo: the project's main job on an embedded tiny default, a few minutes on 2 CPU cores.

1. LoRA-train a tiny Llama 3.1 on the embedded Basque sample (``configs/demo.yaml``);
2. export the merged model (Hugging Face folder) and the PEFT adapter, reload, check logits;
3. greedy-decode a Basque prompt through the chat template with the sampler.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from basque_jax.config import load_config
from basque_jax.data.chat import ChatEncoder
from basque_jax.data.tokenizer import load_tokenizer
from basque_jax.export.exporter import export
from basque_jax.runs import load_model
from basque_jax.sample.sampler import Request, Sampler, SamplerConfig
from basque_jax.sample.sampling import SamplingParams
from basque_jax.train.loop import run_training

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def run_demo(out: str | Path) -> int:
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists():  # the demo always starts fresh (a real run would resume from here)
        shutil.rmtree(out)
    cfg = load_config(DEMO_CONFIG, [f"train.output_dir={out}"])
    print(f"[demo] LoRA training of a tiny Llama 3.1 on the embedded Basque sample "
          f"({jax.device_count()} {jax.default_backend()} device(s)) -> {out}")
    result = run_training(cfg)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in evals if "eval_loss" in r]
    print("[demo] eval loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in evals))

    merged = export(out, out / "hf", mode="merged", dtype="float32")
    adapter = export(out, out / "adapter", mode="peft")
    model = load_model(out, merge_lora=True).model
    reloaded = load_model(merged.out_dir).model
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (1, 16)), jnp.int32)
    same = bool(jnp.allclose(model(ids), reloaded(ids), atol=1e-5))
    print(f"[demo] exported merged model to {merged.out_dir} and PEFT adapter to "
          f"{adapter.out_dir}; reloaded logits match the trained model: {same}")

    tok = load_tokenizer(cfg.data.tokenizer)
    prompt, _ = ChatEncoder(tok).encode_chat([("user", "Zer da euskara?")],
                                             add_generation_prompt=True)
    text = greedy_answer(reloaded, prompt, tok, max_new_tokens=24)
    print(f"[demo] greedy answer (tiny model, {result.get('loss', float('nan')):.2f} train "
          f"loss): {text!r}")
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s")
    return 0 if same and evals and evals[-1][1] < evals[0][1] else 1


def greedy_answer(model, prompt: list[int], tok, max_new_tokens: int) -> str:
    """Greedy completion of ``prompt`` with the sampler, up to the end of the turn."""
    stops = (tok.token_id("<|eot_id|>"), tok.token_id("<|end_of_text|>"))
    sampler = Sampler(model, SamplerConfig(batch_size=1, max_len=len(prompt) + max_new_tokens))
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=stops)
    return tok.decode(sampler.generate([Request(prompt, params)])[0].tokens)
