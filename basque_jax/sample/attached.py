"""Sampling attached to training: complete a few prompts with the weights being trained.

The training loop hands over its live parameter states (trainable + frozen, already on the
mesh); the :class:`Sampler` merges them inside its compiled programs, so nothing is reloaded
and nothing goes to the host except the generated token ids. Built once per run (compiles
once); each call only swaps the weights in.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import jax
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from basque_jax.data.templates import make_chat_encoder
from basque_jax.data.tokenizer import Tokenizer
from basque_jax.errors import ConfigError
from basque_jax.jsonl_log import JsonlLog
from basque_jax.sample.sampler import Request, Sampler, SamplerConfig
from basque_jax.sample.sampling import SamplingParams


@dataclass
class TrainingSamplesConfig:
    """The run config's ``sample:`` section: every ``every`` steps (0: never) ``prompts`` are
    completed with the weights being trained and logged to ``samples.jsonl``.

    chat: prompts are user messages through ``data.chat_template`` (else raw text after BOS).
    temperature 0 is greedy; ``seed`` fixes sampled completions across steps.
    """

    every: int = 0
    prompts: list[str] = field(default_factory=list)
    chat: bool = True
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"sample.every: must be >= 0, got {self.every}")
        if self.every and not self.prompts:
            raise ConfigError("sample.prompts: give at least one prompt to sample every "
                              f"{self.every} steps")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sample.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("sample: temperature must be >= 0, top_p in (0, 1], top_k >= 0")


class TrainingSampler:
    """``sampler(step, *params) -> records``; appends them to ``<out_dir>/samples.jsonl``."""

    def __init__(self, cfg: TrainingSamplesConfig, tokenizer: Tokenizer, graphdef: nnx.GraphDef,
                 params: tuple[Any, ...], mesh: Mesh, rules: dict[str, Any],
                 out_dir: str | os.PathLike, *, chat_template: str = "auto",
                 chat_date: str = "26 Jul 2024", system_prompt: str = ""):
        self.cfg = cfg
        self.tok = tokenizer
        self.log = JsonlLog(epath.Path(out_dir) / "samples.jsonl")
        enc = make_chat_encoder(tokenizer, chat_template, date_string=chat_date,
                                system_prompt=system_prompt)
        self.params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, 0.0,
                                     cfg.max_new_tokens, enc.stop_ids)
        if cfg.chat:
            ids = [enc.encode_chat([("user", p)], add_generation_prompt=True)[0]
                   for p in cfg.prompts]
        else:
            bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
            ids = [bos + tokenizer.encode(p) for p in cfg.prompts]
        self.requests = [Request(p, self.params, cfg.seed + i, i) for i, p in enumerate(ids)]
        max_len = max(len(p) for p in ids) + cfg.max_new_tokens
        self.sampler = Sampler(config=SamplerConfig(batch_size=len(ids), max_len=max_len),
                               graphdef=graphdef, params=params, mesh=mesh, rules=rules)

    def __call__(self, step: int, *params: Any) -> list[dict[str, Any]]:
        """Complete the prompts with ``params`` (the run's current states) and log them."""
        t0 = time.perf_counter()
        self.sampler.set_params(*params)
        completions = self.sampler.generate(self.requests)
        seconds = time.perf_counter() - t0
        records = [{"step": step, "prompt": prompt, "completion": self.tok.decode(c.tokens),
                    "finish_reason": c.finish_reason, "tokens": c.tokens,
                    "seconds": round(seconds, 3)}
                   for prompt, c in zip(self.cfg.prompts, completions, strict=True)]
        if jax.process_index() == 0:
            self.log.append(records)
            for r in records:
                print(f"[sample] step {step}: {r['prompt']!r} -> {r['completion']!r}",
                      flush=True)
        return records
