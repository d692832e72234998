"""The training loop, short enough to read in one sitting.

set-up (mesh, model, optimizer, step: ``train/setup.py``) → data → resume from the latest
checkpoint (its config checked, ``train/resume.py``) → steps (log, held-out loss, samples,
lm-eval tasks, save; all hosts stop together when the data ends; a preemption saves and stops,
``train/preemption.py``) → final save.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from basque_jax.checkpoint import Checkpointer
from basque_jax.config import RunConfig
from basque_jax.data.batch import make_global_batch
from basque_jax.data.pipeline import make_pipeline, pipeline_stats
from basque_jax.data.tokenizer import load_tokenizer
from basque_jax.distributed import all_processes_agree
from basque_jax.errors import UserError
from basque_jax.eval.perplexity import held_out_loss, make_eval_fn
from basque_jax.sample.attached import TrainingSampler
from basque_jax.sharding import use_sharding
from basque_jax.topology import peak_flops_per_device
from basque_jax.train.flops import train_flops_per_token
from basque_jax.train.metrics import MetricsWriter
from basque_jax.train.preemption import Preempted, PreemptionWatch
from basque_jax.train.resume import check_resume
from basque_jax.train.setup import TrainSetup, setup_training


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class _Clock:
    """Tokens/s over training steps only: compilation (the first step of a process), held-out
    loss, samples and checkpoint saves are left out."""

    def __init__(self) -> None:
        self.start, self.tokens, self.paused = time.perf_counter(), 0.0, 0.0

    def restart(self) -> None:
        self.__init__()

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def rate(self) -> float:
        now = time.perf_counter()
        tps = self.tokens / max(now - self.start - self.paused, 1e-9)
        self.start, self.tokens, self.paused = now, 0.0, 0.0
        return tps


def _timed(clock: _Clock, fn, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        clock.pause(time.perf_counter() - t0)


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """Train per ``cfg``; returns the last logged metrics (and ``eval_loss`` when evaluated).

    Raises :class:`Preempted` after saving when the machine is being preempted.
    """
    out_dir = epath.Path(cfg.train.output_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = with_exact_steps(cfg, tokenizer)
    setup = setup_training(cfg)
    state, frozen = setup.state, setup.frozen
    steps = cfg.train.steps
    with use_sharding(setup.mesh, setup.rules):
        if tokenizer.vocab_size > setup.model_config.vocab_size:
            raise UserError(f"data.tokenizer has {tokenizer.vocab_size} tokens but the model's "
                            f"vocab_size is {setup.model_config.vocab_size}")
        data = make_pipeline(cfg.data, tokenizer, process_index=jax.process_index(),
                             process_count=jax.process_count())
        ckpt = Checkpointer(out_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                            async_save=cfg.train.async_checkpoints)
        start = ckpt.latest_step()
        if start is not None:
            changes = check_resume(ckpt.read_meta(start)["config"], cfg.to_dict(),
                                   f"{ckpt.directory}/{start}", cfg.train.accept_config_changes)
            state, _ = ckpt.restore(start, state, data)
            print(f"[train] resumed from {ckpt.directory}/{start}"
                  + (f" (accepted changes: {'; '.join(changes)})" if changes else ""))
        start = start or 0

        eval_fn = make_eval_fn(setup.graphdef)

        def evaluate(params) -> float:
            assert cfg.eval_data is not None
            return held_out_loss(eval_fn, params, frozen, cfg.eval_data, tokenizer,
                                 setup.batch_sharding, max_batches=cfg.train.eval_batches).mean

        sampler = _training_sampler(cfg, tokenizer, setup, out_dir)
        lm_eval = _lm_eval_tasks(cfg, setup, out_dir)
        meta = {"config": cfg.to_dict(), "model_config": setup.model_config.to_hf_dict(),
                "lora": setup.lora_meta}
        writer = MetricsWriter(out_dir, tensorboard=cfg.train.tensorboard)
        lora = setup.lora_meta
        flops_per_token = train_flops_per_token(
            setup.model_config, cfg.data.seq_len, lora_rank=lora["rank"] if lora else None,
            lora_targets=lora["targets"] if lora else ())
        peak = peak_flops_per_device()
        hosts_agree = cfg.data.prepared is not None  # global batches: all run out together
        last: dict[str, Any] = {}
        bar = _progress(cfg, start, steps)
        clock, watch = _Clock(), PreemptionWatch()

        def save(step: int, force: bool = False) -> None:
            _timed(clock, ckpt.save, step, state, data, {**meta, "step": step}, force=force)

        try:
            if cfg.train.eval_every and start == 0:  # the baseline the run improves on
                writer.write(0, {"eval_loss": evaluate(state.params)})
            for step in range(start, steps):
                local = next(data, None)
                more = local is not None
                if not (more if hosts_agree else all_processes_agree(more)):
                    print(f"[train] data exhausted after step {step} of {steps} "
                          "(data.epochs passes done); stopping there")
                    break
                clock.tokens += float(np.sum(local["segment_ids"] != 0)) * jax.process_count()
                state, metrics = setup.step_fn(state, frozen,
                                               make_global_batch(local, setup.batch_sharding))
                done = step + 1
                if step == start:  # compilation is not throughput
                    jax.block_until_ready(metrics)
                    clock.restart()
                if bar is not None:
                    bar.update(1)
                if sampler is not None and done % cfg.sample.every == 0:
                    _timed(clock, sampler, done, state.params, frozen)  # live weights
                log_now = done % cfg.train.log_every == 0 or done == steps
                save_now = cfg.train.save_every and done % cfg.train.save_every == 0
                eval_now = cfg.train.eval_every and done % cfg.train.eval_every == 0
                if log_now or save_now or eval_now:
                    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not math.isfinite(host["loss"]):
                        raise TrainingDiverged(
                            f"loss is {host['loss']} at step {done}; stopping. The last good "
                            f"checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is "
                            "kept.")
                    tps = clock.rate()
                    host["tokens_per_s"] = tps
                    host["tflops_per_device"] = tps * flops_per_token / jax.device_count() / 1e12
                    if peak:
                        host["mfu"] = host["tflops_per_device"] * 1e12 / peak
                    if eval_now:
                        host["eval_loss"] = _timed(clock, evaluate, state.params)
                    if log_now or eval_now:
                        writer.write(done, host)
                        if bar is not None:
                            bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{host['lr']:.2e}")
                    last = host
                if lm_eval is not None and done % cfg.eval_tasks.every == 0:
                    scores = _timed(clock, lm_eval, done, state.params, frozen)  # live weights
                    writer.write(done, scores)
                    last = {**last, **scores}
                if save_now:
                    save(done)
                if done < steps and watch.should_stop(done):
                    save(done, force=True)
                    raise Preempted(f"preempted: saved step {done} in {ckpt.directory}; run the "
                                    "same command again to resume")
            final = int(state.step)
            if ckpt.latest_step() != final:
                save(final, force=True)
        finally:
            watch.close()
            ckpt.close()
            writer.close()
            if bar is not None:
                bar.close()
        last["data"] = pipeline_stats(data)
        return last


def with_exact_steps(cfg: RunConfig, tokenizer) -> RunConfig:
    """``cfg`` with ``train.steps: null`` replaced by the exact number of global batches of
    ``data.epochs`` passes over the prepared data."""
    if cfg.train.steps is not None:
        return cfg
    from basque_jax.data.global_batches import batches_per_run
    from basque_jax.data.prepared import open_prepared

    steps = batches_per_run(cfg.data, open_prepared(cfg.data, tokenizer))
    print(f"[train] {steps} steps: {cfg.data.epochs} pass(es) over the prepared data")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def _training_sampler(cfg: RunConfig, tokenizer, setup: TrainSetup,
                      out_dir: epath.Path) -> TrainingSampler | None:
    """The run's sampler on the live weights (None unless ``sample.every``)."""
    if not cfg.sample.every:
        return None
    d = cfg.data
    return TrainingSampler(cfg.sample, tokenizer, setup.graphdef, (setup.state.params,
                                                                   setup.frozen),
                           setup.mesh, setup.rules, out_dir, chat_template=d.chat_template,
                           chat_date=d.chat_date, system_prompt=d.system_prompt)


def _lm_eval_tasks(cfg: RunConfig, setup: TrainSetup, out_dir: epath.Path):
    """The run's lm-eval tasks on the live weights (None unless ``eval_tasks.every``)."""
    if not cfg.eval_tasks.every:
        return None
    from basque_jax.eval.live import LiveEvaluator

    return LiveEvaluator(cfg.eval_tasks, setup.graphdef, setup.mesh, setup.rules, cfg,
                         setup.model_config, out_dir=out_dir)


def _progress(cfg: RunConfig, start: int, steps: int):
    if not cfg.train.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True)
