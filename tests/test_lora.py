"""LoRA adapters against Hugging Face peft: init, logits, merge, gradients, dropout, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx
from transformers import LlamaForCausalLM

from basque_jax import Llama, LlamaConfig, load_pretrained
from basque_jax.model.lora import (
    ALL_TARGETS,
    TARGETS,
    LoraConfig,
    apply_lora,
    cast_frozen,
    lora_metadata,
    merge_lora,
    trainable_filter,
)


def _ids(shape=(2, 16), vocab=256, seed=0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), jnp.int32)


@nnx.jit
def _fwd(model: Llama, ids: jax.Array, key: jax.Array | None = None) -> jax.Array:
    return model(ids, dropout_key=key)


_BASE: list[Llama] = []


def _tiny() -> Llama:
    """A fresh copy of one tiny random model (built once: eager init is the slow part)."""
    if not _BASE:
        _BASE.append(Llama(LlamaConfig.preset("tiny"), attention="xla", rngs=nnx.Rngs(0)))
    return nnx.clone(_BASE[0])


def _linear(model: Llama, target: str):
    return getattr(getattr(model.layers, TARGETS[target]), target)


def _randomize_b(model: Llama, seed: int = 0, std: float = 0.05) -> None:
    rng = np.random.default_rng(seed)
    for t in model.lora_config.targets:
        b = _linear(model, t).lora_b
        b.set_value(jnp.asarray(std * rng.standard_normal(b.get_value().shape), jnp.float32))


def test_zero_b_keeps_base_logits_exactly():
    model = _tiny()
    ids = _ids(vocab=512)
    base = _fwd(model, ids)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    for t in ALL_TARGETS:
        lin = _linear(model, t)
        layers, fan_in, fan_out = lin.kernel.get_value().shape
        assert lin.lora_a.get_value().shape == (layers, fan_in, 4)
        assert lin.lora_b.get_value().shape == (layers, 4, fan_out)
        assert lin.lora_a.get_value().dtype == jnp.float32
        assert float(jnp.abs(lin.lora_a.get_value()).max()) <= 1 / np.sqrt(fan_in)
    np.testing.assert_array_equal(_fwd(model, ids), base)


# ----------------------------------------------------------------------------- peft reference
def _peft_model(folder, targets, rank, alpha, rslora, seed=0):
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                          use_rslora=rslora, lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; make the adapters matter
                p.copy_(0.05 * torch.randn_like(p))
    return model


def _copy_from_peft(ours: Llama, theirs, targets) -> None:
    """HF lora_A ``[r, in]`` / lora_B ``[out, r]`` per layer → our stacked ``[L, in, r]``..."""
    layers = theirs.base_model.model.model.layers
    for t in targets:
        mods = [getattr(getattr(layer, TARGETS[t]), t) for layer in layers]
        a = np.stack([m.lora_A["default"].weight.detach().numpy().T for m in mods])
        b = np.stack([m.lora_B["default"].weight.detach().numpy().T for m in mods])
        lin = _linear(ours, t)
        lin.lora_a.set_value(jnp.asarray(a))
        lin.lora_b.set_value(jnp.asarray(b))
        assert lin.lora_scale == pytest.approx(mods[0].scaling["default"])


@pytest.mark.parametrize("targets,rslora", [
    (ALL_TARGETS, False),
    (("q_proj", "v_proj", "down_proj"), True),
])
def test_logits_and_merge_match_peft(hf_checkpoint, targets, rslora):
    folder = hf_checkpoint("llama31")
    theirs = _peft_model(folder, targets, rank=4, alpha=16, rslora=rslora)
    ids = _ids()
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()

    ours = load_pretrained(folder, attention="xla")
    apply_lora(ours, LoraConfig(4, 16.0, targets=targets, use_rslora=rslora),
               rngs=nnx.Rngs(0))
    # our A init follows peft's kaiming-uniform: same bound, similar spread
    a_ours = np.asarray(_linear(ours, targets[0]).lora_a.get_value())
    mods = [getattr(getattr(layer, TARGETS[targets[0]]), targets[0])
            for layer in theirs.base_model.model.model.layers]
    a_ref = np.stack([m.lora_A["default"].weight.detach().numpy() for m in mods])
    assert np.abs(a_ours).max() <= np.abs(a_ref).max() * 1.02
    assert a_ours.std() == pytest.approx(a_ref.std(), rel=0.15)

    _copy_from_peft(ours, theirs, targets)
    unmerged = np.asarray(_fwd(ours, ids))
    assert np.abs(ref).max() > 1.0
    np.testing.assert_array_less(np.abs(unmerged - ref).max(), 1e-4)

    merge_lora(ours)
    assert all(_linear(ours, t).lora_a is None for t in ALL_TARGETS)
    np.testing.assert_allclose(np.asarray(_fwd(ours, ids)), unmerged, atol=1e-5, rtol=0)
    merged_ref = theirs.merge_and_unload()
    for t in targets:
        want = np.stack([getattr(getattr(layer, TARGETS[t]), t).weight.detach().numpy().T
                         for layer in merged_ref.model.layers])
        np.testing.assert_allclose(np.asarray(_linear(ours, t).kernel.get_value()), want,
                                   atol=1e-6)


def test_bf16_frozen_base_merges_in_base_dtype():
    model = _tiny()
    apply_lora(model, LoraConfig(rank=2, alpha=4.0, targets=("k_proj", "up_proj")),
               rngs=nnx.Rngs(0))
    cast_frozen(model, jnp.bfloat16)
    assert model.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
    assert _linear(model, "k_proj").kernel.get_value().dtype == jnp.bfloat16
    assert _linear(model, "k_proj").lora_a.get_value().dtype == jnp.float32
    _randomize_b(model)
    kernel = _linear(model, "up_proj").kernel.get_value().astype(jnp.float32)
    lin = _linear(model, "up_proj")
    delta = jnp.einsum("lir,lro->lio", lin.lora_a.get_value(), lin.lora_b.get_value())
    want = (kernel + lin.lora_scale * delta).astype(jnp.bfloat16)
    merge_lora(model)
    got = _linear(model, "up_proj").kernel.get_value()
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# ----------------------------------------------------------------------------- training
def test_gradients_and_optimizer_only_for_adapters():
    model = _tiny()
    apply_lora(model, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    ids = _ids(vocab=512)

    @nnx.jit
    def grad_fn(m):
        def loss(m):
            return jnp.mean(jax.nn.logsumexp(m(ids), axis=-1))
        return nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)

    grads = grad_fn(model)
    flat = nnx.to_flat_state(grads)
    assert flat and all(path[-1] in ("lora_a", "lora_b") for path, _ in flat)
    assert len(flat) == 2 * len(ALL_TARGETS)
    assert all(float(jnp.abs(v.get_value()).max()) > 0 for p, v in flat if p[-1] == "lora_b")

    base_before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam)))]
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=trainable_filter("lora", model))
    moments = [p for p, _ in nnx.to_flat_state(nnx.state(opt.opt_state))
               if p[-1] not in ("count",)]
    assert moments and all(p[-1] in ("lora_a", "lora_b") for p in moments)
    opt.update(model, grads)
    base_after = jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    for x, y in zip(base_before, base_after, strict=True):
        np.testing.assert_array_equal(x, y)
    assert float(jnp.abs(_linear(model, "q_proj").lora_b.get_value()).max()) > 0


def test_trainable_filter_modes():
    model = _tiny()
    full = nnx.to_flat_state(nnx.state(model, trainable_filter("full", model)))
    assert len(full) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    with pytest.raises(ValueError, match="no adapters; call apply_lora"):
        trainable_filter("lora", model)
    apply_lora(model, LoraConfig(rank=2, alpha=2.0), rngs=nnx.Rngs(0))
    assert not any(p[-1].startswith("lora")
                   for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter("full"))))
    with pytest.raises(ValueError, match="mode 'full' but the model has LoRA adapters"):
        trainable_filter("full", model)
    with pytest.raises(ValueError, match="unknown training mode 'qlora'"):
        trainable_filter("qlora")


def test_dropout_needs_a_key_and_is_deterministic_per_key():
    model = _tiny()
    ids = _ids(vocab=512)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.5), rngs=nnx.Rngs(1))
    _randomize_b(model, std=0.2)
    plain = _fwd(model, ids)
    k0, k1 = jax.random.key(0), jax.random.key(1)
    a, a2, b = _fwd(model, ids, k0), _fwd(model, ids, k0), _fwd(model, ids, k1)
    np.testing.assert_array_equal(a, a2)
    assert float(jnp.abs(a - plain).max()) > 1e-3
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(_fwd(model, ids), plain)  # no key: no dropout

    no_drop = _tiny()
    apply_lora(no_drop, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    _randomize_b(no_drop, std=0.2)
    np.testing.assert_allclose(_fwd(no_drop, ids, k0), plain, atol=1e-6)


def test_dropout_hits_only_the_adapter_path():
    """With B = 0 the adapters add nothing, so dropout must leave the logits untouched."""
    model = _tiny()
    ids = _ids(vocab=512)
    base = _fwd(model, ids)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.3), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(_fwd(model, ids, jax.random.key(3)), base)


# ----------------------------------------------------------------------------- metadata, errors
def test_metadata_round_trip():
    model = _tiny()
    assert lora_metadata(model) is None
    cfg = LoraConfig(rank=8, alpha=16.0, dropout=0.05, targets=["q_proj", "v_proj"],
                     use_rslora=True, base_model="meta-llama/Llama-3.1-8B-Instruct")
    apply_lora(model, cfg, rngs=nnx.Rngs(0))
    meta = lora_metadata(model)
    assert meta == {"rank": 8, "alpha": 16.0, "dropout": 0.05, "targets": ["q_proj", "v_proj"],
                    "use_rslora": True, "base_model": "meta-llama/Llama-3.1-8B-Instruct"}
    assert LoraConfig.from_metadata(meta) == cfg
    assert _linear(model, "v_proj").lora_scale == pytest.approx(16.0 / np.sqrt(8))
    assert _linear(model, "k_proj").lora_a is None
    merge_lora(model)
    assert lora_metadata(model) is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(targets=("q_proj", "qkv_proj")), r"lora.targets: unknown \['qkv_proj'\]"),
    (dict(targets=()), "lora.targets: unknown empty list"),
    (dict(targets=("q_proj", "q_proj")), "lora.targets: duplicate targets"),
    (dict(rank=0), "lora.rank: must be a positive integer, got 0"),
    (dict(alpha=0.0), "lora.alpha: must be > 0, got 0.0"),
    (dict(dropout=1.0), r"lora.dropout: must be in \[0, 1\), got 1.0"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**{"rank": 4, "alpha": 8.0, **kwargs})


def test_apply_and_merge_errors():
    model = _tiny()
    with pytest.raises(ValueError, match=r"LoRA targets \['q_proj'\] match no projection in MLP"):
        apply_lora(model.layers.mlp, LoraConfig(4, 8.0, targets=("q_proj", "up_proj")),
                   rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        merge_lora(model)
    apply_lora(model, LoraConfig(4, 8.0, targets=("o_proj",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="o_proj already has LoRA adapters"):
        apply_lora(model, LoraConfig(4, 8.0), rngs=nnx.Rngs(0))
