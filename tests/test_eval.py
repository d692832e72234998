"""`basque-jax eval`: multiple-choice log-likelihoods and perplexity against transformers,
lm-eval's acc / acc_norm, the CLI on truthfulqa_eu_mc1.jsonl, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_utils import JINJA, SHARED_DATA, need, write_jsonl
from _model_utils import make_tiny_hf

from basque_jax.cli import main
from basque_jax.data.embedded import EMBEDDED_CORPUS
from basque_jax.data.tokenizer import load_tokenizer
from basque_jax.eval.multiple_choice import (
    MCDataError,
    MCItem,
    _fewshot,
    evaluate_multiple_choice,
    mc_metrics,
    read_mc_jsonl,
)
from basque_jax.eval.perplexity import evaluate_perplexity, perplexity_data
from basque_jax.runs import load_model

TQA = SHARED_DATA / "eu" / "truthfulqa_eu_mc1.jsonl"
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


@pytest.mark.parametrize(("shots", "chat", "max_length"),
                         [(0, False, None), (1, True, None), (2, False, 40)])
def test_mc_loglikelihoods_match_transformers(em, hf, shots, chat, max_length, monkeypatch):
    need(TQA, *([JINJA] if chat else []))
    if chat:  # long chat prompts: score through several logit chunks per row
        monkeypatch.setattr("basque_jax.eval.multiple_choice.LOGIT_CHUNK", 16)
    model, tok = hf
    items = read_mc_jsonl(TQA, limit=4)
    ours = load_tokenizer("demo")
    result = evaluate_multiple_choice(em.model, ours, items, num_fewshot=shots, chat=chat,
                                      batch_size=3, max_length=max_length, mesh=em.mesh,
                                      rules=em.rules, log_samples=True)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    ref_lls = []
    for i, item in enumerate(items):
        examples = _fewshot(items, i, shots, 1234)
        lls = []
        for j, choice in enumerate(item.choices):
            if chat:
                messages = [m for s in examples for m in (
                    {"role": "user", "content": s.question},
                    {"role": "assistant", "content": s.choices[s.answer]})]
                messages.append({"role": "user", "content": item.question})
                ctx = tok.apply_chat_template(messages, chat_template=JINJA.read_text(),
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=False)
                cont = tok(choice, add_special_tokens=False)["input_ids"]
            else:  # lm-eval: encode(context + " " + choice) minus encode(context), BOS first
                context = "".join(f"Q: {s.question}\nA: {s.choices[s.answer]}\n\n"
                                  for s in examples) + f"Q: {item.question}\nA:"
                whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
                ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
                ctx, cont = [bos, *ctx_ids], whole[len(ctx_ids):]
            tokens = [*ctx, *cont]
            if max_length:
                tokens = tokens[-(max_length + 1):]
            ll, greedy = _reference(model, tokens, min(len(cont), len(tokens) - 1))
            got = result["samples"][i]
            np.testing.assert_allclose(got["loglikelihoods"][j], ll, rtol=1e-5, atol=1e-4)
            assert got["is_greedy"][j] == greedy
            lls.append(ll)
        ref_lls.append(lls)
    # acc / acc_norm exactly as lm-eval's process_results computes them
    acc = np.mean([np.argmax(ll) == it.answer for it, ll in zip(items, ref_lls, strict=True)])
    norm = np.mean([np.argmax(np.asarray(ll) / [len(c) for c in it.choices]) == it.answer
                    for it, ll in zip(items, ref_lls, strict=True)])
    assert (result["acc"], result["acc_norm"]) == (acc, norm)
    assert result["requests"] == sum(len(it.choices) for it in items)


def test_metrics_follow_lm_eval_definitions():
    # one item where raw, per-character and per-byte normalisation all disagree
    item = MCItem("?", ("a", "bbbbbbbb", "ñññ"), answer=1)
    # ll: a -2 (best raw); per char: -2, -1, -1.2 -> b; per byte of " "+choice: -1, -0.889,
    # -0.514 (" ñññ" is 7 bytes) -> ñññ
    out = mc_metrics([item], [[-2.0, -8.0, -3.6]])
    assert (out["acc"], out["acc_norm"], out["acc_norm_bytes"]) == (0.0, 1.0, 0.0)
    items = [MCItem("?", ("x", "y"), 0), MCItem("?", ("x", "y"), 1)]
    out = mc_metrics(items, [[-1.0, -2.0], [-1.0, -2.0]])
    assert out["acc"] == 0.5 and math.isclose(out["acc_stderr"], 0.5)  # sqrt(0.5 / 2)


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
    need(TQA)
    corpus = REPO / "basque_jax" / "assets" / "eu_sample_corpus.jsonl"
    out = tmp_path / "results.json"
    args = ["--mc", str(TQA), "--limit", "4", "--num-fewshot", "1", "--log-samples"]
    assert main(["eval", str(tiny), *args, "--perplexity", str(corpus), "--seq-len", "128",
                 "--out", str(out)]) == 0
    from_folder = json.loads(out.read_text())
    mc = from_folder["multiple_choice"]
    assert (mc["items"], mc["num_fewshot"], mc["file"]) == (4, 1, str(TQA))
    assert 0.0 <= mc["acc"] <= 1.0 and from_folder["perplexity"]["perplexity"] > 1.0
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
    assert main(["eval", str(config), *args, "--perplexity"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    a, b = from_folder["multiple_choice"], from_run["multiple_choice"]
    np.testing.assert_allclose([s["loglikelihoods"] for s in a["samples"]][0],
                               [s["loglikelihoods"] for s in b["samples"]][0], rtol=1e-6)
    np.testing.assert_allclose(from_run["perplexity"]["nll"], from_folder["perplexity"]["nll"],
                               rtol=1e-6)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(("line", "message"), [
    ('{"question": "q", "choices": ["a", "b"]}', r"bad\.jsonl:2: missing key 'answer'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}',
     r"bad\.jsonl:2: 'answer' must be an index into 'choices' \(0\.\.1\), got 2"),
    ('{"question": "q", "choices": "ab", "answer": 0}', r"bad\.jsonl:2: 'choices' must be"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', r"bad\.jsonl:2: 'answer'"),
    ("{not json", r"bad\.jsonl:2: invalid JSON"),
])
def test_bad_mc_rows_are_named(tmp_path, line, message):
    good = '{"question": "q", "choices": ["a", "b"], "answer": 0}'
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(MCDataError, match=message):
        read_mc_jsonl(path)


def test_eval_cli_errors(hf_checkpoint, tiny, tmp_path, capsys):
    def fails(*args, match):
        assert main(["eval", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert match in err, err

    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"],
                                              "answer": 0}])
    fails(tiny, match="nothing to do; pass --perplexity and/or --mc")
    fails(hf_checkpoint("llama31"), "--mc", mc,
          match="no tokenizer files found with the model; give one")
    fails(hf_checkpoint("llama31"), "--mc", mc, "--tokenizer", "demo",
          match="has 1272 tokens, more than the model's vocab_size 256")
    fails(tiny, "--perplexity", match="--perplexity without files needs a run config")
    fails(tiny, "--mc", tmp_path / "missing.jsonl", match="missing.jsonl: file not found")
    fails(tmp_path / "nowhere", "--mc", mc, match="nowhere: does not exist")
    with pytest.raises(ValueError, match="num_fewshot=3 but only 0 other items"):
        evaluate_multiple_choice(None, load_tokenizer("demo"), read_mc_jsonl(mc),
                                 num_fewshot=3)
