"""Train step: mesh invariance, gradient accumulation, LoRA freezing, optimizer recipe, FLOPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from basque_jax.config import RunConfig
from basque_jax.model.config import LlamaConfig
from basque_jax.sharding import use_sharding
from basque_jax.train.flops import lora_params, matmul_params, train_flops_per_token
from basque_jax.train.optim import lr_schedule
from basque_jax.train.setup import setup_training

# 8 query heads, 4 KV heads: divisible by every tensor size the meshes below use.
MESH_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4)


def _config(mesh: dict, *, lora: bool, micro_batches: int = 1, batch: int = 8, **train):
    return RunConfig.from_dict({
        "model": {"preset": "tiny", "attention": "xla"},
        "lora": {"enabled": lora, "rank": 4, "alpha": 8.0},
        "data": {"sources": [{"kind": "corpus", "path": "unused.jsonl"}], "seq_len": 32,
                 "batch_size": batch},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1, **mesh},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.2, "weight_decay": 0.1},
        "train": {"steps": 5, "micro_batches": micro_batches, "seed": 7, **train},
    })


@pytest.fixture(autouse=True)
def mesh_model(monkeypatch):
    from basque_jax.model import config as model_config

    tiny = LlamaConfig.preset("tiny").replace(**MESH_MODEL)
    monkeypatch.setitem(model_config.PRESETS, "tiny", tiny)


def _batches(n: int, batch: int = 8, seq: int = 32, seed: int = 0, distinct: int = 2):
    """Synthetic packed batches following the batch contract (two documents + padding);
    ``distinct`` different batches repeated, so the loss visibly falls within a few steps."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(distinct):
        ids = rng.integers(0, 256, size=(batch, seq + 1)).astype(np.int32)
        seg = np.ones((batch, seq), np.int32)
        seg[:, 20:] = 2
        seg[:, 28:] = 0
        pos = np.concatenate([np.arange(20), np.arange(8), np.arange(4)])[None].repeat(batch, 0)
        mask = (seg != 0).astype(np.float32)
        mask[:, 19] = 0  # last token of document 1 has no target inside the document
        out.append({"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
                    "positions": pos.astype(np.int32), "segment_ids": seg})
    return [out[i % distinct] for i in range(n)]


def _run(cfg, batches):
    setup = setup_training(cfg, devices=jax.devices()[: np.prod(
        [cfg.mesh.dcn, cfg.mesh.data, max(cfg.mesh.fsdp, 1), cfg.mesh.tensor])])
    state, losses = setup.state, []
    with use_sharding(setup.mesh, setup.rules):
        for local in batches:
            state, metrics = setup.step_fn(state, setup.frozen, setup.global_batch(local))
            losses.append(float(metrics["loss"]))
    params = {jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    frozen = {jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_flatten_with_path(setup.frozen)[0]}
    return np.array(losses), params, frozen


# Parameters after 5 AdamW steps at lr 1e-3: Adam's m / sqrt(v) turns float re-association of
# near-zero gradients (different reduction orders per mesh) into up to ~1% of one step.
PARAM_ATOL = 2e-5

MESHES = {
    "single": {},
    "data8": {"data": 8},
    "fsdp8": {"fsdp": 8},
    "tensor4_data2": {"tensor": 4, "data": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_same_losses_and_params_on_every_mesh(lora):
    batches = _batches(5)
    ref_losses, ref_params, _ = _run(_config({}, lora=lora), batches)
    assert ref_losses[-1] < ref_losses[0]
    for name, mesh in MESHES.items():
        if name == "single":
            continue
        losses, params, _ = _run(_config(mesh, lora=lora), batches)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name)
        for k in ref_params:
            np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=PARAM_ATOL,
                                       err_msg=f"{name} {k}")


def test_gradient_accumulation_equals_one_big_batch():
    batches = _batches(3)
    one_losses, one_params, _ = _run(_config({"data": 2}, lora=False), batches)
    acc_losses, acc_params, _ = _run(_config({"data": 2}, lora=False, micro_batches=4), batches)
    np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-6)
    for k in one_params:
        np.testing.assert_allclose(acc_params[k], one_params[k], rtol=1e-5, atol=PARAM_ATOL)


def test_lora_training_moves_only_adapters():
    cfg = _config({"data": 2}, lora=True)
    setup = setup_training(cfg, devices=jax.devices()[:2])
    frozen_before = jax.tree.map(np.asarray, setup.frozen)
    params_before = jax.tree.map(np.asarray, setup.state.params)
    state = setup.state
    with use_sharding(setup.mesh, setup.rules):
        for local in _batches(3):
            state, _ = setup.step_fn(state, setup.frozen, setup.global_batch(local))
    names = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(state.params)[0]]
    assert names and all("lora_a" in n or "lora_b" in n for n in names)
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(setup.frozen), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # base bitwise unchanged
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(params_before), jax.tree.leaves(state.params), strict=True)]
    assert all(moved)
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    assert sum(x.size for x in opt_leaves) == 2 * n_adapter  # Adam moments for adapters only


def test_fsdp_shards_optimizer_state():
    setup = setup_training(_config({"fsdp": 8}, lora=False))
    mu = setup.state.opt_state[1][0].mu
    kernel = mu["layers"]["mlp"]["up_proj"]["kernel"]
    kernel = getattr(kernel, "value", kernel)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)


def test_schedule_matches_study_recipe():
    sched = lr_schedule(1e-5, 1000, 0.1, 0.33)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(50)), 0.5e-5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 1e-5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(1000)), 0.33e-5, rtol=1e-5)
    mid = 100 + 450
    np.testing.assert_allclose(float(sched(mid)), 0.33e-5 + 0.67e-5 * 0.5, rtol=1e-5)


def test_flops_full_vs_lora():
    cfg = LlamaConfig.preset("llama3.1-8b")
    n = matmul_params(cfg)
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    assert n == cfg.num_parameters - cfg.vocab_size * cfg.hidden_size - norms  # matmuls only
    full = train_flops_per_token(cfg, 8192)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora = train_flops_per_token(cfg, 8192, lora_rank=16, lora_targets=targets)
    attn = full - 6 * n
    assert attn == pytest.approx(3 * 4 * 32 * 4096 * 8192 / 2)
    assert lora == pytest.approx(4 * n + 6 * lora_params(cfg, 16, targets) + attn)
    assert lora_params(cfg, 16, targets) == 41_943_040  # peft's count for r=16, all 7 targets


def test_neftune_noise_magnitude():
    from basque_jax.model.loss import neftune_noise

    x = jnp.zeros((2, 16, 64))
    noisy = neftune_noise(jax.random.key(0), x, 5.0)
    bound = 5.0 / np.sqrt(16 * 64)
    assert float(jnp.abs(noisy).max()) <= bound
    assert float(jnp.abs(noisy).max()) > 0.9 * bound


def test_cross_entropy_matches_optax():
    from basque_jax.model.loss import masked_cross_entropy

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32)
    nll, _ = masked_cross_entropy(logits, targets, mask)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(float(nll), float(jnp.sum(ref * mask)), rtol=1e-6)


def test_chunked_cross_entropy_equals_full_loss_and_gradient():
    from basque_jax.model.loss import chunked_cross_entropy

    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 32, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (2, 32)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (2, 32)), jnp.float32)

    def loss(w, chunk):
        nll, z = chunked_cross_entropy(lambda h: h @ w, hidden, targets, mask, 1e-4, chunk)
        return nll + z

    full, g_full = jax.value_and_grad(loss)(w, 0)
    part, g_part = jax.value_and_grad(loss)(w, 8)
    np.testing.assert_allclose(part, full, rtol=1e-6)
    np.testing.assert_allclose(g_part, g_full, rtol=1e-5, atol=1e-6)
    ref = optax.softmax_cross_entropy_with_integer_labels(hidden @ w, targets)
    lse = jax.nn.logsumexp(hidden @ w, axis=-1)
    np.testing.assert_allclose(full, jnp.sum((ref + 1e-4 * lse**2) * mask), rtol=1e-5)
