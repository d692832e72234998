"""Magpie: instruction data from an instruct model alone (Xu et al., 2024).

For each work index ``i``:

1. the model sees only the chat template up to where a user message starts -- for Llama 3.1
   ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n`` (optionally after a
   system block), for other templates their rendering cut where the user's content begins --
   and writes the user query (defaults: temperature 0.9, top-p 1.0; stops on the template's
   tokens after a user turn: ``<|eot_id|>``, ``<|end_of_text|>`` and the header markers);
2. the query goes back as a normal chat prompt and the model answers it (temperature 0.6,
   top-p 0.9).

Both phases share one continuously batched sampler: a finished query immediately queues its
response request, ahead of new queries. Each record is written when its response finishes, to
this process's shard, in the study's schema plus metadata; seeds derive from ``(seed, i)``, so
a restarted job continues with the indices not yet written and produces the same records.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import jax

from basque_jax.data.templates import make_chat_encoder
from basque_jax.data.tokenizer import Tokenizer
from basque_jax.sample.config import GenerateConfig
from basque_jax.sample.runtime import derive_seed, finish, load_sampling_model, make_sampler
from basque_jax.sample.sampler import Completion, PromptTooLong, Request, Sampler
from basque_jax.sample.shards import ShardWriter, done_indices, todo_indices


class MagpieJob:
    """Generates records for a list of work indices with one sampler (see module docstring)."""

    def __init__(self, cfg: GenerateConfig, sampler: Sampler, tokenizer: Tokenizer,
                 model_name: str):
        self.cfg = cfg
        self.sampler = sampler
        self.tok = tokenizer
        self.model_name = model_name
        self.encoder = make_chat_encoder(tokenizer, cfg.chat_template, date_string=cfg.chat_date,
                                         system_prompt=cfg.response_system_prompt)
        self.pre_query = self.encoder.pre_query_ids(cfg.system_prompt)
        self.instruction_params = cfg.instruction.params(tokenizer,
                                                         self.encoder.user_turn_stop_ids)
        self.response_params = cfg.response.params(tokenizer, self.encoder.stop_ids)
        sampler.check(Request(self.pre_query, self.instruction_params))

    def record(self, index: int, status: str, query: str, answer: str | None,
               completions: list[Completion]) -> dict[str, Any]:
        conv = [{"role": "user", "content": query}]
        if answer is not None:
            conv.append({"role": "assistant", "content": answer})
        return {
            "index": index, "status": status, "conversations": conv,
            "metadata": {
                "generator": "magpie", "model": self.model_name, "seed": self.cfg.seed,
                "sample_seeds": [derive_seed(self.cfg.seed, index, p) for p in (0, 1)],
                "system_prompt": self.cfg.system_prompt,
                "instruction_sampling": self.instruction_params.to_dict(),
                "response_sampling": self.response_params.to_dict(),
                "finish_reasons": [c.finish_reason for c in completions],
                "num_tokens": [len(c.tokens) for c in completions],
            },
        }

    def run(self, indices: list[int], writer: ShardWriter, log_every: float = 30.0) -> int:
        """Generate and write the records of ``indices``; returns how many were written."""
        todo = iter(indices)
        pending: collections.deque[Request] = collections.deque()
        cap = 2 * self.sampler.batch_size
        written, t0, last_log = 0, time.perf_counter(), time.perf_counter()

        def feed() -> None:
            n_queries = sum(1 for r in pending if r.tag[0] == "instruction")
            for _ in range(cap - n_queries):
                i = next(todo, None)
                if i is None:
                    return
                pending.append(Request(self.pre_query, self.instruction_params,
                                       derive_seed(self.cfg.seed, i, 0), ("instruction", i)))

        feed()
        for req, comp in self.sampler.stream(pending):
            phase, i = req.tag[0], req.tag[1]
            if phase == "instruction":
                rec = self._after_query(i, comp, pending)
            else:
                query, first = req.tag[2], req.tag[3]
                answer = self.tok.decode(comp.tokens, skip_special_tokens=True).strip()
                status = "ok" if comp.finish_reason == "stop" else "response_truncated"
                rec = self.record(i, status, query, answer, [first, comp])
            if rec is not None:
                writer.write(rec)
                written += 1
            feed()
            if time.perf_counter() - last_log > log_every:
                last_log = time.perf_counter()
                rate = written / (last_log - t0)
                print(f"[generate] {written}/{len(indices)} records ({rate:.2f}/s)", flush=True)
        return written

    def _after_query(self, i: int, comp: Completion, pending: collections.deque
                     ) -> dict[str, Any] | None:
        """Queue the response request for a finished query, or the record that ends here."""
        query = self.tok.decode(comp.tokens, skip_special_tokens=True).strip()
        if not query:
            return self.record(i, "empty_instruction", query, None, [comp])
        if comp.finish_reason != "stop" and self.cfg.on_truncated_instruction == "skip":
            return self.record(i, "instruction_truncated", query, None, [comp])
        prompt, _ = self.encoder.encode_chat([("user", query)], add_generation_prompt=True)
        req = Request(prompt, self.response_params, derive_seed(self.cfg.seed, i, 1),
                      ("response", i, query, comp))
        try:
            self.sampler.check(req)
        except PromptTooLong:
            return self.record(i, "too_long", query, None, [comp])
        pending.appendleft(req)  # answers first: records complete at a steady pace
        return None


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """``basque-jax generate``: resume, generate this process's share, filter at the end."""
    loaded, tokenizer = load_sampling_model(cfg.model, cfg.mesh)
    sampler = make_sampler(loaded, cfg.sampler)
    job = MagpieJob(cfg, sampler, tokenizer, loaded.name)
    out = cfg.output.dir
    done = done_indices(out) if Path(out).is_dir() else set()
    todo = todo_indices(cfg.num_samples, done, jax.process_index(), jax.process_count())
    print(f"[generate] {len(done)} records already in {out}; {len(todo)} to go on process "
          f"{jax.process_index()}/{jax.process_count()}", flush=True)
    with ShardWriter(out, jax.process_index(), jax.process_count(),
                     fsync_every=cfg.output.fsync_every) as writer:
        written = job.run(todo, writer)
    report = finish(out, cfg.filters)
    return {"written": written, "resumed_with": len(done), "filter_report": report}
