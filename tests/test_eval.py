"""`basque-jax eval --perplexity`: held-out perplexity against transformers, the same backbone
as an HF folder and as a run config, and bad input. (lm-eval tasks: tests/test_lm_eval*.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_utils import write_jsonl
from _model_utils import make_tiny_hf

from basque_jax.cli import main
from basque_jax.data.embedded import EMBEDDED_CORPUS
from basque_jax.data.tokenizer import load_tokenizer
from basque_jax.eval.perplexity import evaluate_perplexity, perplexity_data
from basque_jax.runs import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("eval") / "hf", seed=3)


@pytest.fixture(scope="module")
def em(tiny):
    return load_model(tiny)  # sharded over the 8 CPU devices (fsdp)


@pytest.fixture(scope="module")
def hf(tiny):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return (LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny))


def _reference(model, tokens: list[int], n_cont: int) -> tuple[float, bool]:
    """Sum of log p over the last ``n_cont`` tokens, and whether each was the argmax."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[-n_cont:]
    targets = torch.tensor(tokens[-n_cont:])
    ll = float(logp.gather(-1, targets[:, None]).sum())
    return ll, bool((logp.argmax(-1) == targets).all())


def test_perplexity_matches_transformers(em, hf, tmp_path):
    model, _ = hf
    tok = load_tokenizer("demo")
    corpus = [json.loads(line)["text"] for line in EMBEDDED_CORPUS.read_text().splitlines()]
    texts = [t for t in corpus if len(tok.encode(t)) < 120][:6]
    assert len(texts) == 6
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    data = perplexity_data([str(path)], seq_len=256, batch_size=8, tokenizer="demo")
    result = evaluate_perplexity(em.model, data, tok, mesh=em.mesh, rules=em.rules)
    nll = count = 0.0
    for text in texts:  # each document alone, <|begin_of_text|> text <|end_of_text|>
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
        ll, _ = _reference(model, ids, len(ids) - 1)
        nll, count = nll - ll, count + len(ids) - 1
    assert result["tokens"] == count
    np.testing.assert_allclose(result["nll"], nll / count, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], math.exp(nll / count), rtol=1e-5)


def test_eval_cli_hf_folder_and_run_config_agree(tiny, tmp_path, capsys):
    corpus = REPO / "basque_jax" / "assets" / "eu_sample_corpus.jsonl"
    out = tmp_path / "results.json"
    assert main(["eval", str(tiny), "--perplexity", str(corpus), "--seq-len", "128",
                 "--out", str(out)]) == 0
    from_folder = json.loads(out.read_text())
    assert from_folder["perplexity"]["perplexity"] > 1.0
    # the same backbone named by a run config (no checkpoint yet: the initial model), with
    # its eval_data as the perplexity data
    config = tmp_path / "run.yaml"
    config.write_text(
        f"base: {REPO / 'configs' / 'demo.yaml'}\n"
        f"model: {{preset: null, init_from: {tiny}}}\nlora: {{enabled: false}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}}}\n"
        f"eval_data: {{tokenizer: demo, seq_len: 128, sources: [{{kind: corpus, "
        f"path: {corpus}}}]}}\n")
    capsys.readouterr()
    assert main(["eval", str(config), "--perplexity"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(from_run["perplexity"]["nll"], from_folder["perplexity"]["nll"],
                               rtol=1e-6)


# ------------------------------------------------------------------ errors
def test_eval_cli_errors(hf_checkpoint, tiny, tmp_path, capsys):
    def fails(*args, match):
        assert main(["eval", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert match in err, err

    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": "Kaixo mundua."}])
    fails(tiny, match="nothing to do; pass --tasks, --suite or --perplexity")
    fails(hf_checkpoint("llama31"), "--perplexity", data,
          match="no tokenizer files found with the model; give one")
    fails(hf_checkpoint("llama31"), "--perplexity", data, "--tokenizer", "demo",
          match="has 1272 tokens, more than the model's vocab_size 256")
    fails(tiny, "--perplexity", match="--perplexity without files needs a run config")
    fails(tmp_path / "nowhere", "--perplexity", data, match="nowhere: does not exist")
