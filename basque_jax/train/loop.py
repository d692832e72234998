"""The training loop, short enough to read in one sitting.

set-up (mesh, model, optimizer, step: ``train/setup.py``) → data → resume from the latest
checkpoint → steps (log, held-out loss, samples, save) → final save.
"""

from __future__ import annotations

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
from basque_jax.errors import UserError
from basque_jax.eval.perplexity import held_out_loss, make_eval_fn
from basque_jax.sample.attached import TrainingSampler
from basque_jax.sharding import use_sharding
from basque_jax.topology import peak_flops_per_device
from basque_jax.train.flops import train_flops_per_token
from basque_jax.train.metrics import MetricsWriter
from basque_jax.train.setup import TrainSetup, setup_training


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """Train per ``cfg``; returns the last logged metrics (and ``eval_loss`` when evaluated)."""
    out_dir = epath.Path(cfg.train.output_dir)
    setup = setup_training(cfg)
    state, frozen = setup.state, setup.frozen
    with use_sharding(setup.mesh, setup.rules):
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        if tokenizer.vocab_size > setup.model_config.vocab_size:
            raise UserError(f"data.tokenizer has {tokenizer.vocab_size} tokens but the model's "
                            f"vocab_size is {setup.model_config.vocab_size}")
        data = make_pipeline(cfg.data, tokenizer, process_index=jax.process_index(),
                             process_count=jax.process_count())
        ckpt = Checkpointer(out_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                            async_save=cfg.train.async_checkpoints)
        start = ckpt.latest_step()
        if start is not None:
            state, _ = ckpt.restore(start, state, data)
            print(f"[train] resumed from {ckpt.directory}/{start}")
        start = start or 0

        eval_fn = make_eval_fn(setup.graphdef)

        def evaluate(params) -> float:
            assert cfg.eval_data is not None
            return held_out_loss(eval_fn, params, frozen, cfg.eval_data, tokenizer,
                                 setup.batch_sharding, max_batches=cfg.train.eval_batches).mean

        sampler = _training_sampler(cfg, tokenizer, setup, out_dir)
        meta = {"config": cfg.to_dict(), "model_config": setup.model_config.to_hf_dict(),
                "lora": setup.lora_meta}
        writer = MetricsWriter(out_dir, tensorboard=cfg.train.tensorboard)
        lora_rank = setup.lora_meta["rank"] if setup.lora_meta else None
        lora_targets = setup.lora_meta["targets"] if setup.lora_meta else ()
        flops_per_token = train_flops_per_token(setup.model_config, cfg.data.seq_len,
                                                lora_rank=lora_rank, lora_targets=lora_targets)
        peak = peak_flops_per_device()
        last: dict[str, Any] = {}
        bar = _progress(cfg, start)
        t_last, tokens_since = time.perf_counter(), 0.0
        try:
            if cfg.train.eval_every and start == 0:  # the baseline the run improves on
                writer.write(0, {"eval_loss": evaluate(state.params)})
            for step in range(start, cfg.train.steps):
                try:
                    local = next(data)
                except StopIteration:
                    print(f"[train] data exhausted after step {step} of {cfg.train.steps} "
                          "(data.epochs passes done); stopping there")
                    break
                tokens_since += float(np.sum(local["segment_ids"] != 0)) * jax.process_count()
                state, metrics = setup.step_fn(state, frozen,
                                               make_global_batch(local, setup.batch_sharding))
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
                host["tflops_per_device"] = tps * flops_per_token / jax.device_count() / 1e12
                if peak:
                    host["mfu"] = host["tflops_per_device"] * 1e12 / peak
                t_last, tokens_since = now, 0.0
                if eval_now:
                    host["eval_loss"] = evaluate(state.params)
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


def _progress(cfg: RunConfig, start: int):
    if not cfg.train.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True)
