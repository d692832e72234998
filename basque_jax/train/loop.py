"""The training loop, short enough to read in one sitting.

mesh → model (preset or HF folder) → LoRA (optional) → shard → split trainable/frozen →
optimizer → data → resume from the latest checkpoint → steps (log, eval, save) → final save.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from basque_jax.config import RunConfig
from basque_jax.data.batch import batch_spec, make_global_batch
from basque_jax.data.pipeline import make_pipeline, pipeline_stats
from basque_jax.data.tokenizer import load_tokenizer
from basque_jax.model.config import LlamaConfig
from basque_jax.model.hf import load_pretrained
from basque_jax.model.llama import Llama
from basque_jax.model.lora import (
    LoraConfig,
    apply_lora,
    cast_frozen,
    lora_metadata,
    trainable_filter,
)
from basque_jax.model.peft_io import load_peft_adapter
from basque_jax.sample.attached import attached_sampler
from basque_jax.sharding import (
    MeshConfig,
    make_mesh,
    param_shardings,
    rules_with_overrides,
    shard_model,
    use_sharding,
    validate_mesh,
)
from basque_jax.train.checkpoint import Checkpointer
from basque_jax.train.flops import train_flops_per_token
from basque_jax.train.metrics import MetricsWriter, peak_flops_per_device
from basque_jax.train.optim import make_optimizer
from basque_jax.train.step import (
    StepOptions,
    TrainState,
    batch_shardings,
    jit_step,
    make_eval_fn,
    make_step_fn,
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def attach_lora(cfg: RunConfig, model: Llama) -> Llama:
    """LoRA adapters per ``cfg.lora`` (and the frozen base cast to ``base_dtype``), if enabled."""
    if cfg.lora.enabled:
        lc = cfg.lora
        if lc.init_from:  # continue from a PEFT adapter (its rank, alpha, targets)
            load_peft_adapter(model, lc.init_from, dropout=lc.dropout,
                              base_model=cfg.model.init_from or cfg.model.preset)
        else:
            apply_lora(model, LoraConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout,
                                         targets=tuple(lc.targets), use_rslora=lc.use_rslora,
                                         base_model=cfg.model.init_from or cfg.model.preset),
                       rngs=nnx.Rngs(cfg.train.seed + 1))
        if lc.base_dtype:
            cast_frozen(model, jnp.dtype(lc.base_dtype))
    return model


def construct_model(cfg: RunConfig, config: LlamaConfig, *, attention: str | None = None,
                    **llama_kwargs: Any) -> Llama:
    """A randomly initialised ``config`` model with ``cfg``'s dtypes, remat and LoRA (unplaced).

    Under ``nnx.eval_shape`` this is the abstract model ``basque-jax plan`` compiles.
    """
    m = cfg.model
    llama_kwargs.setdefault("scan_unroll", m.scan_unroll)
    model = Llama(config, param_dtype=jnp.dtype(m.param_dtype), dtype=jnp.dtype(m.dtype),
                  attention=attention or m.attention, remat=m.remat,
                  rngs=nnx.Rngs(cfg.train.seed), **llama_kwargs)
    return attach_lora(cfg, model)


def build_model(cfg: RunConfig, mesh, rules) -> Llama:
    """The backbone (random preset or HF folder), with LoRA attached when enabled, placed."""
    m = cfg.model
    if m.init_from:
        model = load_pretrained(m.init_from, dtype=m.param_dtype, compute_dtype=m.dtype,
                                mesh=mesh, rules=rules, attention=m.attention, remat=m.remat,
                                scan_unroll=m.scan_unroll)
        attach_lora(cfg, model)
    else:
        model = construct_model(cfg, LlamaConfig.preset(m.preset))
    shard_model(model, mesh, rules)
    return model


def run_mesh(cfg: RunConfig, devices=None) -> tuple[Mesh, dict[str, Any]]:
    """The mesh of ``cfg.mesh`` over ``devices`` (default: all) and its logical-axis rules."""
    mc = cfg.mesh
    mesh = make_mesh(MeshConfig(dcn=mc.dcn, data=mc.data, fsdp=mc.fsdp, tensor=mc.tensor),
                     devices)
    return mesh, rules_with_overrides(mc.rules)


def run_optimizer(cfg: RunConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and learning-rate schedule of ``cfg.optim`` over ``cfg.train.steps``."""
    o = cfg.optim
    return make_optimizer(lr=o.lr, total_steps=cfg.train.steps, warmup_ratio=o.warmup_ratio,
                          min_lr_ratio=o.min_lr_ratio, b1=o.b1, b2=o.b2, eps=o.eps,
                          weight_decay=o.weight_decay, clip_norm=o.clip_norm)


def step_options(cfg: RunConfig) -> StepOptions:
    t = cfg.train
    return StepOptions(micro_batches=t.micro_batches, neftune_alpha=t.neftune_alpha,
                       z_loss=t.z_loss, seed=t.seed, loss_chunk=t.loss_chunk)


def abstract_with_shardings(state: Any, mesh: Mesh, rules) -> Any:
    """``ShapeDtypeStruct`` s of an abstract (``nnx.eval_shape``) state, each carrying the
    sharding its logical axes give on ``mesh``."""
    shardings = param_shardings(state, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def opt_state_shardings(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """Shardings for the optimizer state: a leaf whose key path ends with a parameter's path
    (Adam moments) takes that parameter's sharding; everything else is replicated."""
    by_path = {p: x.sharding for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    mesh = next(iter(by_path.values())).mesh
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        for n in range(len(path)):
            sh = by_path.get(path[n:])
            if sh is not None and leaf.shape == params_shape[path[n:]]:
                return sh
        return replicated

    params_shape = {p: x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    abstract = jax.eval_shape(optimizer.init, params)
    return jax.tree_util.tree_map_with_path(pick, abstract)


@dataclass
class TrainSetup:
    """Everything a run needs before its first batch: mesh, split model, optimizer, step."""

    mesh: Mesh
    rules: dict[str, Any]
    model_config: LlamaConfig
    mode: str
    graphdef: nnx.GraphDef
    state: TrainState
    frozen: nnx.State
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    batch_sharding: dict[str, NamedSharding]
    step_fn: Any
    lora_meta: dict[str, Any] | None

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows → global arrays sharded over the batch axes."""
        return make_global_batch(local, self.batch_sharding["input_ids"])


def setup_training(cfg: RunConfig, devices=None) -> TrainSetup:
    """Build mesh, model (+LoRA), trainable/frozen split, optimizer state and the jitted step.

    Call (and use the result) inside ``use_sharding(setup.mesh, setup.rules)``.
    """
    mesh, rules = run_mesh(cfg, devices)
    with use_sharding(mesh, rules):
        return assemble_setup(cfg, mesh, rules, build_model(cfg, mesh, rules))


def assemble_setup(cfg: RunConfig, mesh: Mesh, rules: dict[str, Any], model: Llama, *,
                   abstract: bool = False) -> TrainSetup:
    """Split ``model``, build the optimizer state and the jitted step (call under
    ``use_sharding``). ``abstract``: ``model`` comes from ``nnx.eval_shape`` and every state
    array is a sharded ``ShapeDtypeStruct`` (nothing is allocated; for AOT compilation)."""
    validate_mesh(mesh, model.config, cfg.data.batch_size, rules)
    mode = "lora" if cfg.lora.enabled else "full"
    model_config = model.config
    lora_meta = lora_metadata(model) if mode == "lora" else None
    graphdef, params, frozen = nnx.split(model, trainable_filter(mode), ...)
    del model
    optimizer, schedule = run_optimizer(cfg)
    replicated = NamedSharding(mesh, PartitionSpec())
    if abstract:
        params = abstract_with_shardings(params, mesh, rules)
        frozen = abstract_with_shardings(frozen, mesh, rules)
        opt_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(optimizer.init, params), opt_state_shardings(optimizer, params))
        step0 = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    else:
        opt_state = jax.jit(optimizer.init,
                            out_shardings=opt_state_shardings(optimizer, params))(params)
        step0 = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    state = TrainState(step0, params, opt_state)
    b_sharding = batch_shardings(mesh, batch_spec(mesh))
    step_fn = jit_step(make_step_fn(graphdef, optimizer, schedule, step_options(cfg)), state,
                       frozen, b_sharding)
    return TrainSetup(mesh, rules, model_config, mode, graphdef, state, frozen, optimizer,
                      schedule, b_sharding, step_fn, lora_meta)


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """Train per ``cfg``; returns the last logged metrics (and ``eval_loss`` when evaluated)."""
    out_dir = epath.Path(cfg.train.output_dir)
    setup = setup_training(cfg)
    mesh, rules, cfg_model, mode = setup.mesh, setup.rules, setup.model_config, setup.mode
    graphdef, state, frozen = setup.graphdef, setup.state, setup.frozen
    step_fn, b_sharding = setup.step_fn, setup.batch_sharding
    with use_sharding(mesh, rules):
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        if tokenizer.vocab_size > cfg_model.vocab_size:
            raise ValueError(f"data.tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {cfg_model.vocab_size}")
        data = make_pipeline(cfg.data, tokenizer, process_index=jax.process_index(),
                             process_count=jax.process_count())
        ckpt = Checkpointer(out_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                            async_save=cfg.train.async_checkpoints)
        start = ckpt.latest_step()
        if start is not None:
            state, _ = ckpt.restore(start, state, data)
            print(f"[train] resumed from {ckpt.directory}/{start}")
        start = start or 0

        eval_fn = jax.jit(make_eval_fn(graphdef))
        sampler = attached_sampler(cfg, tokenizer, setup, out_dir)  # None unless sample.every
        meta = {"config": cfg.to_dict(), "model_config": cfg_model.to_hf_dict(),
                "lora": setup.lora_meta}
        writer = MetricsWriter(out_dir, tensorboard=cfg.train.tensorboard)
        flops_per_token = train_flops_per_token(
            cfg_model, cfg.data.seq_len,
            lora_rank=cfg.lora.rank if mode == "lora" else None,
            lora_targets=cfg.lora.targets)
        peak = peak_flops_per_device()
        last: dict[str, Any] = {}
        bar = _progress(cfg, start)
        t_last, tokens_since = time.perf_counter(), 0.0
        try:
            if cfg.train.eval_every and start == 0:  # the baseline the run improves on
                writer.write(0, {"eval_loss": evaluate(cfg, tokenizer, eval_fn, state.params,
                                                       frozen, b_sharding)})
            for step in range(start, cfg.train.steps):
                try:
                    local = next(data)
                except StopIteration:
                    print(f"[train] data exhausted after step {step} of {cfg.train.steps} "
                          "(data.epochs passes done); stopping there")
                    break
                tokens_since += float(np.sum(local["segment_ids"] != 0)) * jax.process_count()
                batch = make_global_batch(local, b_sharding["input_ids"])
                state, metrics = step_fn(state, frozen, batch)
                done = step + 1
                if bar is not None:
                    bar.update(1)
                if sampler is not None and done % cfg.sample.every == 0:
                    sampler(done, state.params, frozen)  # the live weights, no copy to host
                log_now = done % cfg.train.log_every == 0 or done == cfg.train.steps
                save_now = cfg.train.save_every and done % cfg.train.save_every == 0
                eval_now = cfg.train.eval_every and done % cfg.train.eval_every == 0
                if not (log_now or save_now or eval_now):
                    continue
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(host["loss"]):
                    raise TrainingDiverged(
                        f"loss is {host['loss']} at step {done}; stopping. The last good "
                        f"checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is kept.")
                now = time.perf_counter()
                tps = tokens_since / max(now - t_last, 1e-9)
                host["tokens_per_s"] = tps
                if peak:
                    host["mfu"] = tps * flops_per_token / (peak * jax.device_count())
                t_last, tokens_since = now, 0.0
                if eval_now:
                    host["eval_loss"] = evaluate(cfg, tokenizer, eval_fn, state.params, frozen,
                                                 b_sharding)
                if log_now or eval_now:
                    writer.write(done, host)
                    if bar is not None:
                        bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{host['lr']:.2e}")
                last = host
                if save_now:
                    ckpt.save(done, state, data, {**meta, "step": done})
            final = int(state.step)
            if ckpt.latest_step() != final:
                ckpt.save(final, state, data, {**meta, "step": final}, force=True)
        finally:
            ckpt.close()
            writer.close()
            if bar is not None:
                bar.close()
        last["data"] = pipeline_stats(data)
        return last


def restore_model(cfg: RunConfig, step: int | None = None) -> Llama:
    """The model of a run's checkpoint (latest by default): backbone + trained parameters."""
    setup = setup_training(cfg)
    ckpt = Checkpointer(epath.Path(cfg.train.output_dir) / "checkpoints", async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{ckpt.directory}: no checkpoint to restore")
        with use_sharding(setup.mesh, setup.rules):
            state, _ = ckpt.restore(step, setup.state, None)
    finally:
        ckpt.close()
    return nnx.merge(setup.graphdef, state.params, setup.frozen)


def evaluate(cfg: RunConfig, tokenizer, eval_fn, params, frozen, b_sharding) -> float:
    """Mean held-out loss over ``train.eval_batches`` batches of ``eval_data``."""
    assert cfg.eval_data is not None
    it = make_pipeline(cfg.eval_data, tokenizer, process_index=jax.process_index(),
                       process_count=jax.process_count())
    nll = tokens = 0.0
    for _ in range(cfg.train.eval_batches):
        try:
            local = next(it)
        except StopIteration:
            break
        s, n = eval_fn(params, frozen, make_global_batch(local, b_sharding["input_ids"]))
        nll, tokens = nll + float(s), tokens + float(n)
    return nll / max(tokens, 1.0)


def _progress(cfg: RunConfig, start: int):
    if not cfg.train.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True)
