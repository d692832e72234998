"""Sampling attached to training: complete a few prompts with the weights being trained.

The training loop hands over its live parameter states (trainable + frozen, already on the
mesh); the :class:`Sampler` merges them inside its compiled programs, so nothing is reloaded
and nothing goes to the host except the generated token ids. Built once per run (compiles
once); each call only swaps the weights in.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from basque_jax.config import RunConfig, SampleSection
from basque_jax.data.chat import ChatEncoder
from basque_jax.data.tokenizer import EOS, EOT, Tokenizer
from basque_jax.sample.sampler import Request, Sampler
from basque_jax.sample.sampling import SamplingParams


class TrainingSampler:
    """``sampler(step, *params) -> records``; appends them to ``<out_dir>/samples.jsonl``."""

    def __init__(self, cfg: SampleSection, tokenizer: Tokenizer, graphdef: nnx.GraphDef,
                 params: tuple[Any, ...], mesh: Mesh, rules: dict[str, Any],
                 out_dir: str | os.PathLike, *, chat_template: str = "llama31",
                 chat_date: str = "26 Jul 2024", system_prompt: str = ""):
        self.cfg = cfg
        self.tok = tokenizer
        self.path = epath.Path(out_dir) / "samples.jsonl"
        self.remote = "://" in os.fspath(out_dir)  # object stores cannot append: rewrite
        self._lines: list[str] = []
        stops = tuple(tokenizer.token_id(t) for t in (EOT, EOS) if _has(tokenizer, t))
        self.params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, 0.0,
                                     cfg.max_new_tokens, stops)
        if cfg.chat:
            enc = ChatEncoder(tokenizer, template=chat_template, date_string=chat_date,
                              system_prompt=system_prompt)
            ids = [enc.encode_chat([("user", p)], add_generation_prompt=True)[0]
                   for p in cfg.prompts]
        else:
            bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
            ids = [bos + tokenizer.encode(p) for p in cfg.prompts]
        self.requests = [Request(p, self.params, cfg.seed + i, i) for i, p in enumerate(ids)]
        max_len = max(len(p) for p in ids) + cfg.max_new_tokens
        self.sampler = Sampler(graphdef=graphdef, params=params, batch_size=len(ids),
                               max_len=max_len, mesh=mesh, rules=rules)

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
            self._write([json.dumps(r, ensure_ascii=False) + "\n" for r in records])
            for r in records:
                print(f"[sample] step {step}: {r['prompt']!r} -> {r['completion']!r}",
                      flush=True)
        return records

    def _write(self, lines: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.remote:
            if not self._lines and self.path.exists():
                self._lines = self.path.read_text().splitlines(keepends=True)
            self._lines += lines
            self.path.write_text("".join(self._lines))
        else:
            with self.path.open("a") as f:
                f.write("".join(lines))


def attached_sampler(cfg: RunConfig, tokenizer: Tokenizer, setup: Any,
                     out_dir: str | os.PathLike) -> TrainingSampler | None:
    """The run's :class:`TrainingSampler` (None unless ``sample.every``), for ``setup`` (a
    ``train.loop.TrainSetup``: graphdef, live states, mesh, rules)."""
    if not cfg.sample.every:
        return None
    d = cfg.data
    return TrainingSampler(cfg.sample, tokenizer, setup.graphdef, (setup.state.params,
                                                                   setup.frozen),
                           setup.mesh, setup.rules, out_dir, chat_template=d.chat_template,
                           chat_date=d.chat_date, system_prompt=d.system_prompt)


def _has(tokenizer: Tokenizer, token: str) -> bool:
    try:
        tokenizer.token_id(token)
    except KeyError:
        return False
    return True
