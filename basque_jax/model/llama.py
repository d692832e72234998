"""Llama 3.x in Flax NNX with Hugging Face semantics, read top to bottom.

* Decoder layers are stored once with stacked parameters (leading ``layers`` axis) and applied
  with ``jax.lax.scan``; the scanned body is rematerialised per :data:`REMAT_POLICIES`.
* Every parameter carries ``logical_axes`` metadata; activations are pinned with
  :func:`basque_jax.sharding.constrain`. The mapping to mesh axes lives in ``sharding.py`` only.
* One forward: ``__call__`` (training, scoring, prefill of whole sequences). Decoding with a KV
  cache reuses these modules, mask and attention math in :mod:`basque_jax.model.decode`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from basque_jax.model.attention import AttentionMask, attention
from basque_jax.model.config import LlamaConfig
from basque_jax.model.precision import matmul
from basque_jax.model.rope import apply_rope, inverse_frequencies, rope_tables
from basque_jax.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def _normal(std: float):
    return jax.nn.initializers.normal(stddev=std)


class Linear(nnx.Module):
    """Bias-free projection, kernel ``[in, out]`` (HF ``weight`` transposed), optionally stacked.

    LoRA adapters, when attached (``basque_jax.model.lora``), live beside the kernel as
    ``lora_a [in, r]`` and ``lora_b [r, out]`` and are added as
    ``B(A(dropout(x))) * lora_scale`` (peft's order); dropout runs only when a key is given.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str, str],
        *,
        num_layers: int | None,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        init_std: float,
        rngs: nnx.Rngs,
    ):
        lead = () if num_layers is None else (num_layers,)
        lead_axes = () if num_layers is None else ("layers",)
        self.kernel = nnx.Param(
            _normal(init_std)(rngs.params(), (*lead, in_features, out_features), param_dtype),
            logical_axes=(*lead_axes, *axes),
        )
        self.dtype = dtype
        self.lora_a: nnx.Param | None = nnx.data(None)  # data slots: adapters attach later
        self.lora_b: nnx.Param | None = nnx.data(None)
        self.lora_scale: float = 0.0
        self.lora_dropout: float = 0.0

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        # Leading dims flattened: the backward pass's weight gradients are then plain
        # [tokens, in]^T @ [tokens, out] products; contracting over (batch, sequence) made
        # XLA:CPU materialise a transposed copy of the output gradient (2x slower LoRA step).
        lead = x.shape[:-1]
        x = x.astype(self.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        y = matmul(x2, self.kernel[...], self.dtype)
        if self.lora_a is not None and self.lora_b is not None:
            xa = x2
            if dropout_key is not None and self.lora_dropout > 0.0:
                keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, x.shape)
                xa = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(self.dtype)
                xa = xa.reshape(x2.shape)
            low = matmul(xa, self.lora_a[...], self.dtype)
            y = y + matmul(low, self.lora_b[...], self.dtype) * jnp.asarray(
                self.lora_scale, self.dtype
            )
        return y.reshape(*lead, y.shape[-1])


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then multiply by the weight."""

    def __init__(self, dim: int, eps: float, *, num_layers: int | None, param_dtype, dtype):
        lead = () if num_layers is None else (num_layers,)
        lead_axes = () if num_layers is None else ("layers",)
        self.weight = nnx.Param(jnp.ones((*lead, dim), param_dtype), logical_axes=(*lead_axes,
                                                                                   "norm"))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings."""

    def __init__(self, cfg: LlamaConfig, *, num_layers, param_dtype, dtype, attention_impl, rngs):
        hd = cfg.resolved_head_dim
        common = dict(num_layers=num_layers, param_dtype=param_dtype, dtype=dtype,
                      init_std=cfg.initializer_range, rngs=rngs)
        h = cfg.hidden_size
        self.q_proj = Linear(h, cfg.num_attention_heads * hd, ("embed", "heads"), **common)
        self.k_proj = Linear(h, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), **common)
        self.v_proj = Linear(h, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), **common)
        self.o_proj = Linear(cfg.num_attention_heads * hd, h, ("heads", "embed"), **common)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = hd
        self.attention_impl = attention_impl

    def __call__(self, x, cos, sin, mask: AttentionMask, dropout_key=None):
        b, t, _ = x.shape
        keys = _projection_keys(dropout_key, 4)
        q = self.q_proj(x, keys[0]).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x, keys[1]).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, keys[2]).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = constrain(apply_rope(q, cos, sin), ("batch", "sequence", "act_heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "sequence", "act_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "sequence", "act_kv_heads", "head_dim"))
        out = attention(q, k, v, mask, implementation=self.attention_impl)
        out = constrain(out, ("batch", "sequence", "act_heads", "head_dim"))
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), keys[3])


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig, *, num_layers, param_dtype, dtype, rngs):
        common = dict(num_layers=num_layers, param_dtype=param_dtype, dtype=dtype,
                      init_std=cfg.initializer_range, rngs=rngs)
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, i, ("embed", "mlp"), **common)
        self.up_proj = Linear(h, i, ("embed", "mlp"), **common)
        self.down_proj = Linear(i, h, ("mlp", "embed"), **common)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        keys = _projection_keys(dropout_key, 3)
        hidden = jax.nn.silu(self.gate_proj(x, keys[0])) * self.up_proj(x, keys[1])
        return self.down_proj(constrain(hidden, ("batch", "sequence", "act_mlp")), keys[2])


class DecoderLayer(nnx.Module):
    """One pre-norm transformer block; built with stacked parameters for all layers at once."""

    def __init__(self, cfg: LlamaConfig, *, num_layers, param_dtype, dtype, attention_impl, rngs):
        norm = dict(num_layers=num_layers, param_dtype=param_dtype, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.self_attn = Attention(cfg, num_layers=num_layers, param_dtype=param_dtype,
                                   dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.mlp = MLP(cfg, num_layers=num_layers, param_dtype=param_dtype, dtype=dtype,
                       rngs=rngs)

    def __call__(self, x, cos, sin, mask, dropout_key=None):
        attn_key, mlp_key = _projection_keys(dropout_key, 2)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, attn_key)
        x = x + self.mlp(self.post_attention_layernorm(x), mlp_key)
        return constrain(x, ("batch", "sequence", "act_embed"))


class Embed(nnx.Module):
    """Token embedding table ``[vocab, hidden]``."""

    def __init__(self, vocab: int, dim: int, *, param_dtype, dtype, init_std, rngs):
        self.embedding = nnx.Param(
            _normal(init_std)(rngs.params(), (vocab, dim), param_dtype),
            logical_axes=("vocab", "embed"),
        )
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: ``x @ embedding.T``."""
        return matmul(x, self.embedding[...].T, self.dtype)


class Llama(nnx.Module):
    """Llama 3.x causal LM: ``model(input_ids, positions=None, segment_ids=None) -> logits``.

    Args:
      config: architecture.
      param_dtype: dtype parameters are stored in.
      dtype: compute dtype (bfloat16 for training at scale; float32 for exact parity).
      attention: ``auto`` | ``xla`` | ``dot_product`` | ``cudnn`` | ``splash`` |
        ``splash_interpret`` (see :mod:`basque_jax.model.attention`).
      remat: a key of :data:`REMAT_POLICIES`, applied to each scanned layer.
      scan_unroll: layers per iteration of the layer loop (``True``: no loop; e.g. for XLA's
        cost analysis, which counts a loop body once).
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype = jnp.float32,
        attention: str = "auto",
        remat: str = "none",
        scan_unroll: int | bool = 1,
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose from {list(REMAT_POLICIES)}")
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.remat = remat
        self.scan_unroll = scan_unroll
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, param_dtype=param_dtype,
                                  dtype=dtype, init_std=config.initializer_range, rngs=rngs)
        self.layers = DecoderLayer(config, num_layers=config.num_hidden_layers,
                                   param_dtype=param_dtype, dtype=dtype,
                                   attention_impl=attention, rngs=rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, num_layers=None,
                            param_dtype=param_dtype, dtype=dtype)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, ("embed", "vocab"), num_layers=None,
            param_dtype=param_dtype, dtype=dtype, init_std=config.initializer_range, rngs=rngs)

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        return_hidden: bool = False,
        dropout_key: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``[batch, seq, vocab]``.

        ``positions`` default to each token's index; ``segment_ids`` default to one document
        per row; 0 marks padding (tokens attend within their own segment, causally). With
        ``return_hidden`` the final normalised hidden states are returned instead of logits
        (for chunked losses). ``dropout_key`` turns on LoRA dropout (training); it is split per
        layer and folded in per projection, so the result is a pure function of the key.
        ``inputs_embeds`` replaces the embedding lookup of ``input_ids`` (e.g. NEFTune).
        """
        b, t = input_ids.shape
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = AttentionMask(slots, slots, seg, seg)
        pos = slots if positions is None else positions.astype(jnp.int32)
        cos, sin = rope_tables(pos, inverse_frequencies(self.config))

        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = constrain(x.astype(self.dtype), ("batch", "sequence", "act_embed"))
        x = self.norm(self._run_layers(x, cos, sin, mask, dropout_key))
        return x if return_hidden else self.logits(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output projection (tied to the embedding for Llama 3.2)."""
        out = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return constrain(out, ("batch", "sequence", "act_vocab"))

    def _run_layers(self, x, cos, sin, mask, dropout_key=None):
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            layer_state, key = xs
            return nnx.merge(graphdef, layer_state)(carry, cos, sin, mask, key), None

        if self.remat != "none":
            # A loop already keeps XLA from merging the recomputation into the forward pass;
            # unrolled layers need the explicit barrier.
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat],
                                  prevent_cse=self.scan_unroll != 1)
        keys = None if dropout_key is None else jax.random.split(
            dropout_key, self.config.num_hidden_layers)
        return jax.lax.scan(body, x, (state, keys), unroll=self.scan_unroll)[0]


def _projection_keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent keys folded from ``key`` (all None without one)."""
    return [None] * n if key is None else [jax.random.fold_in(key, i) for i in range(n)]
