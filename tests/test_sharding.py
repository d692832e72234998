"""Meshes from config, their errors, and LoRA / base placement on a data × fsdp × tensor mesh."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from basque_jax import Llama, LlamaConfig
from basque_jax.errors import ConfigError
from basque_jax.model.lora import LoraConfig, apply_lora
from basque_jax.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    device_grid,
    make_mesh,
    param_shardings,
    rules_with_overrides,
    shard_model,
    use_sharding,
    validate_mesh,
)

TINY = LlamaConfig.preset("tiny")  # 4 heads, 2 KV heads, hidden 64, mlp 192, vocab 512


# ----------------------------------------------------------------------------- mesh config
@pytest.mark.parametrize("cfg,sizes", [
    (MeshConfig(), dict(dcn=1, data=1, fsdp=8, tensor=1)),
    (MeshConfig(data=2, fsdp=2, tensor=2), dict(dcn=1, data=2, fsdp=2, tensor=2)),
    (MeshConfig(data=-1, fsdp=1, tensor=4), dict(dcn=1, data=2, fsdp=1, tensor=4)),
    (MeshConfig(dcn=2, data=1, fsdp=-1, tensor=2), dict(dcn=2, data=1, fsdp=2, tensor=2)),
])
def test_make_mesh_resolves_sizes_with_auto_axes(cfg, sizes):
    mesh = make_mesh(cfg)
    assert dict(mesh.shape) == sizes
    assert mesh.axis_names == ("dcn", "data", "fsdp", "tensor")
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("sizes,message", [
    (dict(data=2, fsdp=2, tensor=1),
     r"mesh dcn=1 × data=2 × fsdp=2 × tensor=1 has 4 devices but 8 are available"),
    (dict(data=-1, fsdp=-1), "only one axis may be -1, got data and fsdp"),
    (dict(tensor=0), "mesh.tensor: size must be a positive integer or -1, got 0"),
    (dict(data=-2), "mesh.data: size must be a positive integer or -1, got -2"),
    (dict(fsdp=-1, tensor=3),
     "the fixed axes multiply to 3, which does not divide the 8 devices"),
])
def test_impossible_meshes(sizes, message):
    """Caught when the section is built (sizes alone) or the mesh is made (device count)."""
    with pytest.raises(ConfigError, match=message):
        make_mesh(MeshConfig(**sizes))


@dataclass(frozen=True)
class _FakeTpu:
    """Just enough of a device for mesh_utils: two slices of four chips."""

    id: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "fake"
    process_index: int = 0


def test_multi_slice_devices_put_one_slice_per_dcn_row():
    devices = [_FakeTpu(i, i // 4) for i in range(8)]
    grid = device_grid(MeshConfig(dcn=2, data=1, fsdp=-1, tensor=2), devices)
    assert grid.shape == (2, 1, 2, 2)
    for row in range(2):
        assert {d.slice_index for d in grid[row].flat} == {row}
    with pytest.raises(ValueError, match="the devices span 2 slices but mesh.dcn is 1; "
                                         "set mesh.dcn=2"):
        device_grid(MeshConfig(), devices)


# ----------------------------------------------------------------------------- validation
def test_validate_mesh_accepts_a_good_setup():
    validate_mesh(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), TINY, global_batch_size=4)


@pytest.mark.parametrize("cfg,model,batch,message", [
    (MeshConfig(data=1, fsdp=1, tensor=8), TINY, 8,
     "4 attention heads are not divisible by the tensor axis size 8"),
    (MeshConfig(data=2, fsdp=1, tensor=4), TINY, 8,
     "2 KV heads are not divisible by the tensor axis size 4"),
    (MeshConfig(data=2, fsdp=2, tensor=2), TINY, 6,
     r"global batch size 6 is not divisible by 4, the batch-sharding mesh axes "
     r"\(dcn=1 × data=2 × fsdp=2\)"),
    (MeshConfig(data=4, fsdp=1, tensor=2), TINY.replace(vocab_size=301), 8,
     "vocab_size=301 is not divisible by 2, the size of mesh axes 'tensor' that shard "
     "logical axis 'vocab'"),
    (MeshConfig(data=1, fsdp=8, tensor=1), TINY.replace(hidden_size=36, head_dim=16), 8,
     "hidden_size=36 is not divisible by 8"),
])
def test_validate_mesh_errors(cfg, model, batch, message):
    with pytest.raises(ValueError, match=message):
        validate_mesh(make_mesh(cfg), model, batch)


def test_rules_with_overrides():
    rules = rules_with_overrides({"embed": None, "batch": ["data", "fsdp"], "mlp": "fsdp"})
    assert rules["embed"] is None and rules["batch"] == ("data", "fsdp")
    assert rules["mlp"] == "fsdp" and rules["heads"] == DEFAULT_RULES["heads"]
    with pytest.raises(ValueError, match="mesh.rules.hidden: unknown logical axis; known: "):
        rules_with_overrides({"hidden": "fsdp"})
    with pytest.raises(ValueError, match=r"mesh.rules.vocab: expected a mesh axis of \('dcn', "
                                         r"'data', 'fsdp', 'tensor'\), a list of them, or null; "
                                         r"got 'model'"):
        rules_with_overrides({"vocab": "model"})
    with pytest.raises(ValueError, match="mesh.rules.batch: expected"):
        rules_with_overrides({"batch": ["data", 3]})


# ----------------------------------------------------------------------------- placement
@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def _lora_model(seed: int = 0) -> Llama:
    model = Llama(TINY, attention="xla", rngs=nnx.Rngs(seed))
    apply_lora(model, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam):  # non-zero B so the adapters matter
            var.set_value(jnp.asarray(0.05 * rng.standard_normal(var.get_value().shape),
                                      jnp.float32))
    return model


def _specs(linear) -> tuple[P, P, P]:
    return tuple(v.get_value().sharding.spec for v in (linear.kernel, linear.lora_a,
                                                        linear.lora_b))


def test_shard_model_places_adapters_like_their_base_and_keeps_logits(mesh):
    model = _lora_model()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 16)), jnp.int32)
    want = nnx.jit(lambda m, x: m(x))(model, ids)
    shard_model(model, mesh)
    attn, mlp = model.layers.self_attn, model.layers.mlp
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
        assert _specs(lin) == (P(None, "fsdp", "tensor"), P(None, "fsdp", None),
                               P(None, None, "tensor"))
    for lin in (attn.o_proj, mlp.down_proj):
        assert _specs(lin) == (P(None, "tensor", "fsdp"), P(None, "tensor", None),
                               P(None, None, "fsdp"))
    assert model.embed_tokens.embedding.get_value().sharding.spec == P("tensor", "fsdp")
    with use_sharding(mesh):
        got = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_adapters_on_a_sharded_model_are_born_sharded(mesh):
    model = shard_model(Llama(TINY, attention="xla", rngs=nnx.Rngs(0)), mesh)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj")),
               rngs=nnx.Rngs(1))
    assert _specs(model.layers.self_attn.q_proj)[1:] == (P(None, "fsdp", None),
                                                         P(None, None, "tensor"))
    assert _specs(model.layers.mlp.down_proj)[1:] == (P(None, "tensor", None),
                                                      P(None, None, "fsdp"))


def test_param_shardings_cover_optimizer_state(mesh):
    model = shard_model(_lora_model(), mesh)
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)
    shardings = param_shardings(opt, mesh)
    flat = dict(nnx.to_flat_state(shardings))
    mu_a = flat[("opt_state", 0, "mu", "layers", "self_attn", "q_proj", "lora_a")].get_value()
    assert mu_a == NamedSharding(mesh, P(None, "fsdp", None))
    assert flat[("opt_state", 0, "count")].get_value().spec == P()
    placed = jax.device_put(nnx.state(opt), shardings)  # the tree fits jit / device_put
    nu_b = dict(nnx.to_flat_state(placed))[
        ("opt_state", 0, "nu", "layers", "mlp", "down_proj", "lora_b")]
    assert nu_b.get_value().sharding.spec == P(None, None, "fsdp")
    model_sh = dict(nnx.to_flat_state(param_shardings(model, mesh)))
    assert model_sh[("layers", "input_layernorm", "weight")].get_value().spec == P(None, None)
