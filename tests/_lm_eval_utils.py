"""Helpers of the lm-eval tests: offline task configs over ../shared/data, a tiny random Llama 3.1
folder with the real Llama 3 tokenizer, and lm-eval's own ``hf`` backend as the reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _data_utils import JINJA, LLAMA_TOKENIZER, SHARED_DATA

TQA = SHARED_DATA / "eu" / "truthfulqa_eu_mc1.jsonl"
BHTC = SHARED_DATA / "eu" / "bhtc_news_val.jsonl"
QNLI_TRAIN = SHARED_DATA / "eu" / "qnli_train.jsonl"
QNLI_VAL = SHARED_DATA / "eu" / "qnli_val.jsonl"
TASK_FILES = (TQA, BHTC, QNLI_TRAIN, QNLI_VAL)
LLAMA3_FILES = (LLAMA_TOKENIZER, JINJA)
ATOL = 1e-4  # per-request log-likelihoods, ours vs the hf backend
ATOL_TOKENS = 32  # ... up to 32 scored tokens; beyond, x sqrt(tokens / 32): float32 rounding
# noise of independent tokens adds up as a random walk (a 200-token document: 2.5e-4)
F32_ULP = 2.0**-23  # float32 rounding of a value, relative (its totals are float32 sums)


def mc_task(name: str = "tqa_eu_mc1_local") -> dict[str, Any]:
    """Multiple choice over TruthfulQA-eu (shots drawn from the same split, doc excluded)."""
    return {
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(TQA)}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "Galdera: {{question}}\nErantzuna:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def rolling_task(name: str = "bhtc_news_ppl") -> dict[str, Any]:
    """Rolling log-likelihood (perplexity) over BHTC news paragraphs."""
    return {
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(BHTC)}}, "test_split": "test",
        "output_type": "loglikelihood_rolling", "num_fewshot": 0, "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                        {"metric": "bits_per_byte"}],
        "metadata": {"version": 1.0},
    }


def gen_task(name: str = "qnli_eu_gen", max_gen_toks: int = 8,
             until: tuple[str, ...] = ("\n", ".")) -> dict[str, Any]:
    """Greedy generation + exact match over QNLI-eu (shots from its train split)."""
    return {
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(QNLI_TRAIN), "test": str(QNLI_VAL)}},
        "training_split": "train", "fewshot_split": "train", "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Galdera: {{question}}\nEsaldia: {{sentence}}\nEsaldiak erantzuten al dio "
                       "galderari (bai/ez)?\nErantzuna:",
        "doc_to_target": "{{'bai' if label == 'entailment' else 'ez'}}",
        "generation_kwargs": {"until": list(until), "max_gen_toks": max_gen_toks,
                              "do_sample": False, "temperature": 0.0},
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                     {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                         "higher_is_better": True, "ignore_case": True,
                         "ignore_punctuation": True}],
        "metadata": {"version": 1.0},
    }


def write_task_yaml(folder: Path, config: dict[str, Any]) -> Path:
    """``config`` as ``folder/<task>.yaml`` (JSON is valid YAML)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config['task']}.yaml"
    path.write_text(json.dumps(config, ensure_ascii=False, indent=1))
    return path


def make_llama3_folder(folder: Path, *, seed: int = 0, max_position_embeddings: int = 256
                       ) -> Path:
    """A random 2-layer Llama 3.1 (hidden 32, the full 128256 vocabulary) saved with the real
    Llama 3 tokenizer as Meta ships it (a post-processor that adds <|begin_of_text|>), the 3.1
    chat template and Llama 3.1 Instruct's stop ids in generation_config.json."""
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    from basque_jax.data.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128256, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings, rope_theta=500000.0,
                         bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # O(1) logits, so that the choices' scores differ visibly
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name
                    else 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    hf = load_tokenizer(LLAMA_TOKENIZER).to_hf(JINJA.read_text())
    hf.backend_tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 128000)])])
    hf.save_pretrained(folder)
    return folder


def one_torch_thread():
    """torch on one thread for the module (its OpenMP threads stall on a loaded 2-core
    machine: ~10x slower there); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_reference(folder: Path, *, batch_size: int = 1, dtype: str = "float32", **kwargs: Any):
    """lm-eval's own ``hf`` backend on ``folder``: CPU, float32 (or ``dtype``)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), device="cpu", dtype=dtype, batch_size=batch_size,
                **kwargs)


def build_instances(task_config: dict[str, Any], *, limit: int, num_fewshot: int = 0,
                    chat_lm=None, system_instruction: str | None = None) -> tuple[Any, list]:
    """The lm-eval task of ``task_config`` and its request instances (prompts through
    ``chat_lm``'s chat template, few-shot as multiturn, when given)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_defaults=False)
    task = next(iter(tm.load([task_config])["tasks"].values()))
    if task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=1234)
    chat = chat_lm is not None
    task.build_all_requests(limit=limit, rank=0, world_size=1, apply_chat_template=chat,
                            fewshot_as_multiturn=chat, system_instruction=system_instruction,
                            chat_template=chat_lm.apply_chat_template if chat else None,
                            tokenizer_name=chat_lm.tokenizer_name if chat else "")
    return task, task.instances


def doc_metrics(task, instances: list, responses: list) -> list[dict]:
    """lm-eval's per-document metrics (``task.process_results``) of one LM's responses."""
    by_doc: dict[int, list] = {}
    for inst, resp in zip(instances, responses, strict=True):
        by_doc.setdefault(inst.doc_id, []).append((inst.idx, inst.doc, resp))
    out = []
    for doc_id in sorted(by_doc):
        rows = sorted(by_doc[doc_id], key=lambda r: r[0])
        out.append(task.process_results(rows[0][1], [r[2] for r in rows]))
    return out


def assert_same_loglikelihoods(ours, hf, config, *, limit, shots=0, chat=False,
                               exact=None) -> int:
    """Per-request (logprob, is_greedy) and per-document metrics of both backends agree:
    |ours - hf| <= ATOL (see :func:`tolerance`). With ``exact`` (the hf backend in float64):
    |ours - exact| <= ATOL and |ours - hf| <= ATOL + |hf - exact|, i.e. any larger difference
    is the float32 hf backend's own rounding (see ``test_smollm2_equals_hf``)."""
    task, instances = build_instances(config, limit=limit, num_fewshot=shots,
                                      chat_lm=hf if chat else None)
    got, want = ours.loglikelihood(instances), hf.loglikelihood(instances)
    ll_ours, ll_hf = np.array([g[0] for g in got]), np.array([w[0] for w in want])
    tokens = np.array([len(hf._encode_pair(*inst.args)[1]) for inst in instances])
    _check_against(config["task"], ll_ours, ll_hf,
                   None if exact is None else [e[0] for e in exact.loglikelihood(instances)],
                   atol=tolerance(tokens))
    assert [g[1] for g in got] == [w[1] for w in want]
    assert doc_metrics(task, instances, got) == doc_metrics(task, instances, want)
    return len(instances)


def assert_same_rolling(ours, hf, config, *, limit, exact=None) -> None:
    """:func:`assert_same_loglikelihoods` for ``loglikelihood_rolling`` requests."""
    _, instances = build_instances(config, limit=limit)
    tokens = np.array([len(hf.tok_encode(inst.args[0])) for inst in instances])
    _check_against(config["task"], np.array(ours.loglikelihood_rolling(instances)),
                   np.array(hf.loglikelihood_rolling(instances)),
                   None if exact is None else exact.loglikelihood_rolling(instances),
                   atol=tolerance(tokens))


def tolerance(tokens: np.ndarray) -> np.ndarray:
    """Per-request tolerance for requests scoring ``tokens`` tokens (see ATOL_TOKENS)."""
    return ATOL * np.sqrt(np.maximum(1.0, tokens / ATOL_TOKENS))


def _check_against(name: str, ours: np.ndarray, hf: np.ndarray, exact, atol=ATOL) -> None:
    delta = np.abs(ours - hf)
    print(f"{name}: max |ours - hf| {delta.max():.2e} over {len(ours)} requests")
    if exact is None:  # lm-eval's float32 sums of a long document: 1e-4 is below their ulp
        assert (delta <= atol + F32_ULP * np.abs(hf)).all(), delta
        return
    exact = np.asarray(exact)
    to_exact, hf_error = np.abs(ours - exact), np.abs(hf - exact)
    print(f"{name}: max |ours - hf float64| {to_exact.max():.2e}, "
          f"max |hf - hf float64| {hf_error.max():.2e}")
    assert (to_exact <= atol).all(), to_exact
    assert (delta <= atol + hf_error).all(), (delta, hf_error)


def assert_same_generations(ours, hf, config, *, limit, shots=0, chat=False) -> list[str]:
    """Generated texts of both backends are identical."""
    _, instances = build_instances(config, limit=limit, num_fewshot=shots,
                                      chat_lm=hf if chat else None)
    got = ours.generate_until(instances)
    assert got == hf.generate_until(instances)
    return got
