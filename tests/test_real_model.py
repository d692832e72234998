"""The real SmolLM2-135M-Instruct through the pipeline: greedy decoding equals transformers
``generate`` token for token (LoRA adapters included, via peft), Magpie writes instructions that
end at its template's end of turn, and a few LoRA steps lower held-out Basque loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _model_utils import subprocess_env
from conftest import REAL_MODEL_WORKER, SHARED_DATA

from basque_jax.data.templates import make_chat_encoder
from basque_jax.sample import Request, Sampler, SamplingParams
from basque_jax.sample.sampler import SamplerConfig

pytestmark = [pytest.mark.slow, REAL_MODEL_WORKER]
REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Kaixo!", "Zer da euskara, eta non hitz egiten da?",
             "Write one sentence about the Basque Country and its mountains, please.",
             "List three colours in Basque and explain briefly where each word comes from."]
NEW_TOKENS = 40


def _cli(*args: str) -> None:
    """``basque-jax ARGS`` as users run it, on one CPU device (the 8 fake devices of the suite
    cost a 135M model's sharded steps 2x on 2 cores; the weights fit one device)."""
    proc = subprocess.run([sys.executable, "-m", "basque_jax.cli", *args], capture_output=True,
                          text=True, env=subprocess_env(devices=1), cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _prompts(tok) -> list[list[int]]:
    enc = make_chat_encoder(tok, "auto")
    prompts = [enc.encode_chat([("user", q)], add_generation_prompt=True)[0] for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # four different lengths
    return prompts


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    """transformers' greedy continuation of one prompt, past any end of turn (no eos ids)."""
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def adapted(smollm2, tmp_path_factory):
    """SmolLM2 with random (non-zero) rank-8 LoRA adapters on every projection, in peft, and
    the same adapters saved as a PEFT folder."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"])
    model = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # keeps the answers those of a language model, not noise
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return model, folder


def test_greedy_with_lora_equals_transformers_and_peft_generate(smollm2, adapted):
    """(Without adapters, logits equal transformers': tests/test_gguf.py.)"""
    from basque_jax.model.peft_io import load_peft_adapter
    from basque_jax.runs import load_model

    loaded = load_model(smollm2)
    tok = loaded.load_tokenizer()
    prompts = _prompts(tok)
    params = SamplingParams(0.0, max_new_tokens=NEW_TOKENS)
    config = SamplerConfig(batch_size=4, max_len=max(map(len, prompts)) + NEW_TOKENS)
    plain = Sampler(loaded.model, config).generate([Request(p, params) for p in prompts])
    peft_model, folder = adapted
    load_peft_adapter(loaded.model, folder)
    lora = Sampler(loaded.model, config).generate([Request(p, params) for p in prompts])
    want = [_hf_greedy(peft_model, p) for p in prompts]
    assert [c.tokens for c in lora] == want
    assert [c.tokens for c in lora] != [c.tokens for c in plain]  # the adapters do act
    text = tok.decode(plain[1].tokens, skip_special_tokens=True)
    assert len(set(text.split())) > 5, text  # a real model's words, not random ids


def test_magpie_instructions_end_at_the_template_end_of_turn(smollm2, tmp_path):
    from basque_jax.sample.shards import read_records

    _cli("generate", "configs/sample/magpie_smollm2.yaml", f"vars.out={tmp_path}",
         "num_samples=4", "response.max_new_tokens=24", "instruction.max_new_tokens=40",
         "sampler.max_len=160")
    records = list(read_records(sorted((tmp_path / "magpie").glob("shard-*.jsonl"))))
    assert len(records) == 4
    finished = [r for r in records if r["metadata"]["finish_reasons"][0] == "stop"]
    assert len(finished) >= 3, [r["metadata"] for r in records]
    for r in finished:
        query = r["conversations"][0]["content"]
        assert query and "<|im_" not in query and "im_start" not in query, query
        assert r["conversations"][1]["role"] == "assistant"


def test_lora_steps_lower_held_out_basque_loss(smollm2, tmp_path):
    bhtc = SHARED_DATA / "eu" / "bhtc_news_train.jsonl"
    val = SHARED_DATA / "eu" / "bhtc_news_val.jsonl"
    if not bhtc.exists():
        pytest.skip(f"{bhtc} not present")
    corpus = f"[{{kind: corpus, path: {bhtc}, name: bhtc, max_records: 200}}]"
    held = f"[{{kind: corpus, path: {val}, name: val, max_records: 32}}]"
    _cli("train", "configs/demo_smollm2.yaml",
         f"vars.out={tmp_path}", f"data.sources={corpus}", f"eval_data.sources={held}",
         "data.batch_size=8", "data.seq_len=64", "eval_data.batch_size=8",
         "eval_data.seq_len=64", "train.steps=12", "train.eval_every=12",
         "train.progress_bar=false", "train.tensorboard=false", "optim.lr=2e-3")
    evals = [json.loads(x)["eval_loss"] for x in
             (tmp_path / "train" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert len(evals) == 2 and np.isfinite(evals).all()
    assert evals[1] < evals[0] - 0.05, evals
