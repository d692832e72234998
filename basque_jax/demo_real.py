"""The demo on the real model (see :mod:`basque_jax.demo`): Magpie → filter → LoRA → export."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from basque_jax.config import load_config
from basque_jax.data.embedded import EMBEDDED_CORPUS
from basque_jax.data.templates import make_chat_encoder
from basque_jax.demo import MAGPIE_CONFIG, QUESTION, REAL_CONFIG, REAL_MODEL, greedy_answer
from basque_jax.eval.perplexity import evaluate_perplexity
from basque_jax.export.exporter import export
from basque_jax.model.gguf import model_path
from basque_jax.runs import load_model
from basque_jax.sample.config import load_generate_config
from basque_jax.sample.magpie import run_generate
from basque_jax.sample.shards import read_records
from basque_jax.train.loop import run_training

HELD_OUT = 8  # corpus paragraphs kept out of training, for the perplexity


def split_corpus(out: Path) -> None:
    """``out/data/corpus_{train,heldout}.jsonl`` from the embedded Basque paragraphs."""
    lines = EMBEDDED_CORPUS.read_text().splitlines()
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus_train.jsonl").write_text("\n".join(lines[:-HELD_OUT]) + "\n")
    (folder / "corpus_heldout.jsonl").write_text("\n".join(lines[-HELD_OUT:]) + "\n")


def _perplexity(loaded, cfg) -> float:
    result = evaluate_perplexity(loaded.model, cfg.eval_data, loaded.load_tokenizer(),
                                 mesh=loaded.mesh, rules=loaded.rules)
    return result["perplexity"]


def _transformers_check(folder: Path, adapter: Path, ours, tokenizer) -> float:
    """Max |Δlogits| of our merged model against transformers on the export (and of the PEFT
    adapter in peft against the merged export), on the demo question's chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    ids, _ = make_chat_encoder(tokenizer, "auto").encode_chat([("user", QUESTION)])
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    gap = float(np.max(np.abs(np.asarray(ours(np.asarray([ids]))[0]) - theirs)))
    try:
        import peft
    except ImportError:
        return gap
    base = AutoModelForCausalLM.from_pretrained(model_path(REAL_MODEL),
                                                dtype=torch.float32).eval()
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(base, adapter)(torch.tensor([ids])).logits[0]
    return max(gap, float(np.max(np.abs(adapted.numpy() - theirs))))


def run_real_demo(out: Path) -> int:
    t0 = time.perf_counter()
    split_corpus(out)
    print(f"[demo] 1. Magpie: {REAL_MODEL} writes instructions from its chat template alone")
    magpie = load_generate_config(MAGPIE_CONFIG, [f"vars.out={out}"])
    report = run_generate(magpie)["filter_report"] or {}
    records = list(read_records(sorted((out / "magpie").glob("shard-*.jsonl"))))
    for r in records:
        query = r["conversations"][0]["content"]
        print(f"[demo]    [{r['status']}] {query[:110]!r}")
    kept = report.get("kept", 0)
    print(f"[demo]    filter kept {kept} of {report.get('input', len(records))}: "
          f"{json.dumps(report.get('removed', {}))}")

    cfg = load_config(REAL_CONFIG, [f"vars.out={out}"])
    if not kept:  # nothing survived the filter: train on the Basque data alone
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, sources=[s for s in cfg.data.sources if s.name != "magpie"]))
    base = load_model(REAL_MODEL)
    tok = base.load_tokenizer()
    before_ppl = _perplexity(base, cfg)
    before = greedy_answer(base.model, tok, QUESTION, max_new_tokens=40)
    del base
    print(f"[demo] 2. LoRA on Basque ({cfg.train.steps} steps, batch {cfg.data.batch_size} × "
          f"{cfg.data.seq_len}, NEFTune {cfg.train.neftune_alpha}, lr {cfg.optim.lr})")
    run_training(cfg)
    trained = load_model(cfg.train.output_dir, merge_lora=True)
    after_ppl = _perplexity(trained, cfg)
    print(f"[demo]    held-out Basque perplexity: {before_ppl:.1f} -> {after_ppl:.1f}")

    run = Path(cfg.train.output_dir)
    merged = export(run, out / "hf", mode="merged", dtype="float32")
    adapter = export(run, out / "adapter", mode="peft")
    gap = _transformers_check(merged.out_dir, adapter.out_dir, trained.model, tok)
    print(f"[demo] 3. exported {merged.out_dir} (merged) and {adapter.out_dir} (PEFT); "
          f"transformers/peft on the exports vs ours: max |Δlogits| {gap:.1e}")
    after = greedy_answer(trained.model, tok, QUESTION, max_new_tokens=40)
    print(f"[demo] 4. {QUESTION}\n[demo]    before: {before!r}\n[demo]    after:  {after!r}")
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s")
    return 0 if after_ppl < before_ppl and gap < 2e-3 else 1
