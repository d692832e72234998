"""Analytic training FLOPs per token (for MFU), full fine-tuning and LoRA counted apart.

Forward FLOPs of a matmul are ``2 * in * out`` per token. Backward costs twice the forward for a
trained weight (activation gradient + weight gradient) but only once for a frozen one
(activation gradient only), so full FT costs ``6 N`` and LoRA ``4 N + 6 N_adapters``. Attention
scores and values add ``4 * layers * ctx * heads * head_dim`` forward FLOPs per token (causal:
half the context on average), backward twice that. Rematerialisation is not counted (MFU, not
hardware FLOPs utilisation).
"""

from __future__ import annotations

from collections.abc import Iterable

from basque_jax.model.config import LlamaConfig

_PROJ_SHAPES = {
    "q_proj": lambda c: (c.hidden_size, c.num_attention_heads * c.resolved_head_dim),
    "k_proj": lambda c: (c.hidden_size, c.num_key_value_heads * c.resolved_head_dim),
    "v_proj": lambda c: (c.hidden_size, c.num_key_value_heads * c.resolved_head_dim),
    "o_proj": lambda c: (c.num_attention_heads * c.resolved_head_dim, c.hidden_size),
    "gate_proj": lambda c: (c.hidden_size, c.intermediate_size),
    "up_proj": lambda c: (c.hidden_size, c.intermediate_size),
    "down_proj": lambda c: (c.intermediate_size, c.hidden_size),
}


def matmul_params(cfg: LlamaConfig) -> int:
    """Parameters that take part in matmuls per token (all but the embedding lookup)."""
    per_layer = sum(i * o for i, o in (f(cfg) for f in _PROJ_SHAPES.values()))
    return cfg.num_hidden_layers * per_layer + cfg.hidden_size * cfg.vocab_size


def lora_params(cfg: LlamaConfig, rank: int, targets: Iterable[str]) -> int:
    """Adapter parameters (A and B) over all layers."""
    return cfg.num_hidden_layers * sum(rank * sum(_PROJ_SHAPES[t](cfg)) for t in targets)


def attention_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Forward QK^T and AV FLOPs per token, causal (average context ``seq_len / 2``)."""
    width = cfg.num_attention_heads * cfg.resolved_head_dim
    return 4.0 * cfg.num_hidden_layers * width * seq_len / 2


def train_flops_per_token(cfg: LlamaConfig, seq_len: int, *, lora_rank: int | None = None,
                          lora_targets: Iterable[str] = ()) -> float:
    """Training FLOPs per token (forward + backward)."""
    n = matmul_params(cfg)
    attn = 3 * attention_flops_per_token(cfg, seq_len)
    if lora_rank is None:
        return 6.0 * n + attn
    return 4.0 * n + 6.0 * lora_params(cfg, lora_rank, lora_targets) + attn
