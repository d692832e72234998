"""``basque-jax plan``: TPU topologies by name, AOT compilation for a TPU slice on this CPU host
(skipped without libtpu), and the sharded splash-attention path the TPU compile uses."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from basque_jax.cli import main
from basque_jax.topology import parse_topology

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
TINY = ["eval_data=null", "train.eval_every=0", "model.preset=tiny", "data.seq_len=128",
        "data.batch_size=8"]

try:
    import libtpu  # noqa: F401

    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed "
                                  "(pip install 'basque-jax[aot]'): no TPU compiler here")


@pytest.mark.parametrize(("name", "chips", "shape", "accelerator"), [
    ("v5p-32", 16, (2, 2, 4), "v5p-32"),
    ("v5e-8", 8, (2, 4), "v5litepod-8"),
    ("v5litepod-16", 16, (4, 4), "v5litepod-16"),
    ("v6e-8", 8, (2, 4), "v6e-8"),
    ("v4-8", 4, (2, 2, 1), "v4-8"),
    ("v5e:2x2", 4, (2, 2), "v5litepod-4"),
    ("v5p:4x4x4", 64, (4, 4, 4), "v5p-128"),
])
def test_topologies_by_name(name, chips, shape, accelerator):
    t = parse_topology(name)
    assert (t.chips, t.shape, t.accelerator_type) == (chips, shape, accelerator)


@pytest.mark.parametrize(("name", "message"), [
    ("v7x-8", "unknown TPU generation"),
    ("v5p-31", "suffix must be even"),
    ("v5e-12", "no standard v5e slice with 12 chips"),
    ("v5p:2x2", "3-D shapes"),
    ("tpu", "expected e.g. v5e-8"),
])
def test_bad_topologies_say_why(name, message):
    with pytest.raises(ValueError, match=message):
        parse_topology(name)


def test_plan_without_topology_or_architecture_is_an_error(capsys):
    assert main(["plan", str(DEMO), *TINY]) == 2
    assert "no topology" in capsys.readouterr().err
    assert main(["plan", str(DEMO), *TINY, "plan.topology=v5e-9"]) == 2
    assert "plan.topology" in capsys.readouterr().err


@needs_libtpu
def test_plan_compiles_for_a_v5e_2x2_slice(capsys):
    code = main(["plan", str(DEMO), *TINY, "lora.enabled=false", "--topology", "v5e:2x2",
                 "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["chips"] == 4 and r["chip"] == "TPU v5 lite" and r["mesh"]["data"] == 4
    assert r["fits"] and 0 < r["train_memory"]["total"] < r["hbm_bytes"]
    assert r["train_memory"]["arguments"] > 0 and r["train_memory"]["outputs"] > 0
    assert r["decode_memory"]["total"] > 0 and r["decode_batch"] == 4
    # XLA's count of the compiled program vs ours: matmuls dominate; the compiled program
    # also computes the masked half of attention and elementwise work
    assert 0.95 < r["flops_ratio"] < 1.3, r["flops_ratio"]
    assert r["tokens_per_step"] == 8 * 128 and r["steps"] == 150
    expected = 150 * r["analytic_flops_per_step"] / (4 * 197e12 * 0.4) / 3600 * 4
    assert r["chip_hours"] == pytest.approx(expected)


@needs_libtpu
def test_plan_says_when_it_does_not_fit(capsys):
    code = main(["plan", str(DEMO), *TINY[:3], "data.seq_len=8192", "data.batch_size=1024",
                 "--topology", "v5e:2x2", "--no-flops", "--no-decode"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "DOES NOT FIT" in out and "16.00 GiB" in out


@needs_libtpu
def test_plan_with_splash_attention_on_a_tensor_parallel_mesh():
    from basque_jax.config import load_config
    from basque_jax.plan import format_report, plan_run

    cfg = load_config(DEMO, [*TINY, "model.attention=auto", "mesh.data=2", "mesh.fsdp=1",
                             "mesh.tensor=2"])
    r = plan_run(cfg, "v5e:2x2", decode=False, count_flops=False)
    assert r.attention == "splash" and r.mesh["tensor"] == 2 and r.fits
    assert "DOES NOT FIT" not in format_report(r)


def test_sharded_splash_attention_matches_reference():
    """The shard_map'd Pallas kernel (interpret mode on CPU) under a data x tensor mesh."""
    from basque_jax.model.attention import AttentionMask, splash_attention, xla_attention
    from basque_jax.sharding import MeshConfig, make_mesh, use_sharding

    rng = np.random.default_rng(0)
    b, t, h, kvh, d = 4, 128, 4, 2, 32
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((b, t, h, d), (b, t, kvh, d), (b, t, kvh, d)))
    seg = jnp.asarray(np.repeat([[1, 2, 0, 3]], t // 4, axis=1).repeat(b, axis=0))
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = AttentionMask(slots, slots, seg, seg)
    ref = xla_attention(q, k, v, mask)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    with use_sharding(mesh):
        out = jax.jit(lambda *a: splash_attention(*a, mask, interpret=True))(q, k, v)
    real = np.asarray(seg)[..., None, None] != 0  # padding rows are undefined in both
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=2e-5)


def test_architecture_comes_from_the_checkpoint_when_readable(hf_checkpoint, tmp_path):
    from basque_jax.config import load_config
    from basque_jax.plan import PlanError, resolve_architecture

    folder = hf_checkpoint("odd_shapes")
    cfg = load_config(DEMO, [*TINY, "model.preset=null", f"model.init_from={folder}"])
    got = resolve_architecture(cfg)
    assert (got.vocab_size, got.hidden_size, got.head_dim) == (301, 48, 16)
    missing = [*TINY, "model.preset=null", f"model.init_from={tmp_path}/nowhere"]
    with pytest.raises(PlanError, match="set plan.architecture"):
        resolve_architecture(load_config(DEMO, missing))
    cfg = load_config(DEMO, [*missing, "plan.architecture=llama3.1-70b"])
    assert resolve_architecture(cfg).num_hidden_layers == 80


def test_unrolled_layers_compute_the_same_values_and_gradients():
    """The flop probes unroll the layer loop; values and remat'd gradients must not change."""
    from flax import nnx

    from basque_jax.model.config import LlamaConfig
    from basque_jax.model.llama import Llama

    cfg = LlamaConfig.preset("tiny")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 512, (2, 16)), jnp.int32)

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(ids), axis=-1))

    scanned = Llama(cfg, attention="xla", remat="full", rngs=nnx.Rngs(0))
    unrolled = Llama(cfg, attention="xla", remat="full", scan_unroll=True, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(unrolled(ids), scanned(ids), atol=1e-6)
    for a, b in zip(jax.tree.leaves(nnx.grad(loss)(unrolled)),
                    jax.tree.leaves(nnx.grad(loss)(scanned)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_plan_decode_memory_is_the_samplers_program():
    """``plan`` reports the memory of the decode program ``generate`` runs: planned on the
    abstract weights, it equals the compiled program of a real sampler that just decoded."""
    from flax import nnx

    from basque_jax.config import load_config
    from basque_jax.model.config import LlamaConfig
    from basque_jax.plan import decode_memory
    from basque_jax.runs import construct
    from basque_jax.sample import Request, Sampler, SamplingParams
    from basque_jax.sample.sampler import SamplerConfig
    from basque_jax.sharding import mesh_and_rules, use_sharding
    from basque_jax.train.setup import assemble_setup, setup_training

    cfg = load_config(DEMO, TINY)
    mesh, rules = mesh_and_rules(cfg.mesh)
    with use_sharding(mesh, rules):
        model = nnx.eval_shape(lambda: construct(cfg, LlamaConfig.preset("tiny")))
        planned = decode_memory(assemble_setup(cfg, mesh, rules, model, abstract=True), 8, 64)
        live = setup_training(cfg)
        sampler = Sampler(None, SamplerConfig(batch_size=8, max_len=64, unstack=False),
                          graphdef=live.graphdef, params=(live.state.params, live.frozen),
                          mesh=mesh, rules=rules)
        done = sampler.generate([Request([1, 2, 3], SamplingParams(0.0, max_new_tokens=4))])
        assert len(done[0].tokens) == 4
        ran = sampler.lower_decode()[0].compile().memory_analysis()
    assert (planned.arguments, planned.outputs, planned.aliased, planned.temporaries) == (
        ran.argument_size_in_bytes, ran.output_size_in_bytes, ran.alias_size_in_bytes,
        ran.temp_size_in_bytes)
    assert planned.arguments > 2 * 2 * 8 * 64 * 2 * 16 * 4  # K and V of every layer, f32


@pytest.mark.parametrize(("kind", "peak"), [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("cpu", None)])
def test_mfu_knows_every_tpu_generation(kind, peak):
    """MFU is logged on every TPU generation (v5p reports "TPU v5")."""
    from basque_jax.topology import peak_flops

    assert peak_flops(kind) == peak
