"""Helpers shared by tests/test_export.py and tests/test_eval.py: tiny HF models that fit the
demo tokenizer, transformers / peft references, and the CLI run in-process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from conftest import HF_CASES

DEMO_VOCAB = 1280  # >= the demo tokenizer's 1272 ids


def make_tiny_hf(folder: Path, *, case: str = "llama31", seed: int = 0,
                 with_tokenizer: bool = True, **overrides) -> Path:
    """A random transformers Llama (``case`` sizes, vocab for the demo tokenizer) saved to
    ``folder``, with the demo tokenizer's HF files when ``with_tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = {**HF_CASES[case], "vocab_size": DEMO_VOCAB, **overrides}
    model = LlamaForCausalLM(LlamaConfig(**kwargs, rms_norm_eps=1e-5)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name
                    else 0.08 * torch.randn_like(p))
    model.save_pretrained(folder)
    if with_tokenizer:
        from basque_jax.data.tokenizer import load_tokenizer

        load_tokenizer("demo").save(folder)
    return folder


def hf_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    """float32 logits of the transformers model saved in ``folder``."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def subprocess_env(devices: int = 8) -> dict[str, str]:
    """The environment of a ``basque-jax`` subprocess: CPU, ``devices`` (fake) devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    env["JAX_PLATFORMS"] = "cpu"
    return env
