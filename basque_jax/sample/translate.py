"""Machine translation of a chat data set into Basque, turn by turn, with the instruct model.

Every turn whose role is in ``roles`` becomes one request: the configured ``prompt`` (with
``{text}`` replaced by the turn) as a user message in the chat template, greedy by default. The
turns of a record run in parallel in the continuously batched sampler; the record is written
when its last turn is done, with the same roles in the same order (``conversations``), the
source turns (``original``) and metadata. Work index = record index in the source, so a
restarted job skips what its shards hold and resumes with no duplicate and no gap.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import jax

from basque_jax.data.formats import BadRecord, parse_record
from basque_jax.data.sources import open_random_access
from basque_jax.data.templates import ConversationEncoder, make_chat_encoder
from basque_jax.data.tokenizer import Tokenizer
from basque_jax.errors import ConfigError
from basque_jax.sample.config import TranslateConfig
from basque_jax.sample.runtime import derive_seed, finish, load_sampling_model, make_sampler
from basque_jax.sample.sampler import Completion, PromptTooLong, Request, Sampler
from basque_jax.sample.shards import ShardWriter, done_indices, todo_indices


def translation_encoder(cfg: TranslateConfig, tokenizer: Tokenizer) -> ConversationEncoder:
    """The chat encoder of translation prompts (template, date, system prompt)."""
    return make_chat_encoder(tokenizer, cfg.chat_template, date_string=cfg.chat_date,
                             system_prompt=cfg.system_prompt)


def translation_prompt(encoder: ConversationEncoder, prompt: str, text: str) -> list[int]:
    """Chat prompt ids asking (with ``prompt``, ``{text}`` filled) to translate ``text``."""
    ids, _ = encoder.encode_chat([("user", prompt.format(text=text))],
                                 add_generation_prompt=True)
    return ids


class TranslateJob:
    """Translates records of a random-access source (see module docstring)."""

    def __init__(self, cfg: TranslateConfig, sampler: Sampler, tokenizer: Tokenizer,
                 model_name: str):
        self.cfg = cfg
        self.sampler = sampler
        self.tok = tokenizer
        self.model_name = model_name
        self.encoder = translation_encoder(cfg, tokenizer)
        self.params = cfg.sampling.params(tokenizer, self.encoder.stop_ids)

    def record(self, index: int, status: str, turns: list[tuple[str, str]],
               translated: dict[int, str], completions: dict[int, Completion], where: str,
               reason: str | None = None) -> dict[str, Any]:
        conv = [{"role": r, "content": translated.get(k, c)} for k, (r, c) in enumerate(turns)]
        rec: dict[str, Any] = {
            "index": index, "status": status, "conversations": conv,
            "original": [{"role": r, "content": c} for r, c in turns],
            "source": {"name": self.cfg.source.name, "where": where},
            "metadata": {
                "translator": "basque_jax", "model": self.model_name, "seed": self.cfg.seed,
                "prompt": self.cfg.prompt, "system_prompt": self.cfg.system_prompt,
                "sampling": self.params.to_dict(),
                "finish_reasons": {str(k): c.finish_reason for k, c in completions.items()},
            },
        }
        if reason:
            rec["reason"] = reason
        return rec

    def run(self, source: Any, indices: list[int], writer: ShardWriter,
            log_every: float = 30.0) -> int:
        """Translate and write the records ``indices`` of ``source``; returns records written."""
        todo = iter(indices)
        pending: collections.deque[Request] = collections.deque()
        open_records: dict[int, dict[str, Any]] = {}
        cap = 2 * self.sampler.batch_size
        written, t0, last_log = 0, time.perf_counter(), time.perf_counter()

        def emit(rec: dict[str, Any]) -> None:
            nonlocal written
            writer.write(rec)
            written += 1

        def feed() -> None:
            while len(pending) < cap:
                i = next(todo, None)
                if i is None:
                    return
                rec = self._start(i, source[i], pending, open_records)
                if rec is not None:
                    emit(rec)

        feed()
        for req, comp in self.sampler.stream(pending):
            _, i, k = req.tag
            state = open_records[i]
            state["translated"][k] = self.tok.decode(comp.tokens, skip_special_tokens=True).strip()
            state["completions"][k] = comp
            state["remaining"] -= 1
            if state["remaining"] == 0:
                del open_records[i]
                truncated = any(c.finish_reason != "stop" for c in state["completions"].values())
                emit(self.record(i, "translation_truncated" if truncated else "ok",
                                 state["turns"], state["translated"], state["completions"],
                                 state["where"]))
            feed()
            if time.perf_counter() - last_log > log_every:
                last_log = time.perf_counter()
                rate = written / (last_log - t0)
                print(f"[translate] {written}/{len(indices)} records ({rate:.2f}/s)", flush=True)
        return written

    def _start(self, i: int, raw: Any, pending: collections.deque,
               open_records: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
        """Queue record ``i``'s turns, or return the record that ends here (bad / too long)."""
        try:
            conv = parse_record(raw.payload, "chat", messages_field=self.cfg.source.messages_field)
        except BadRecord as e:
            return self.record(i, "bad_record", [], {}, {}, raw.where, e.reason)
        turns = list(conv.messages)
        reqs = []
        for k, (role, content) in enumerate(turns):
            if role in self.cfg.roles and content.strip():
                reqs.append(Request(translation_prompt(self.encoder, self.cfg.prompt, content),
                                    self.params,
                                    derive_seed(self.cfg.seed, i, k), ("turn", i, k)))
        try:
            for r in reqs:
                self.sampler.check(r)
        except PromptTooLong as e:
            return self.record(i, "too_long", turns, {}, {}, raw.where, str(e))
        if not reqs:
            return self.record(i, "ok", turns, {}, {}, raw.where)
        open_records[i] = {"turns": turns, "translated": {}, "completions": {},
                           "remaining": len(reqs), "where": raw.where}
        pending.extend(reqs)
        return None


def run_translate(cfg: TranslateConfig) -> dict[str, Any]:
    """``basque-jax translate``: resume, translate this process's share, filter at the end."""
    if cfg.source.streaming:
        raise ConfigError("source.streaming: translate needs random access (indices); "
                          "use a non-streaming source")
    source = open_random_access(cfg.source)
    total = len(source) if cfg.num_records is None else min(cfg.num_records, len(source))
    loaded, tokenizer = load_sampling_model(cfg.model, cfg.mesh)
    sampler = make_sampler(loaded, cfg.sampler)
    job = TranslateJob(cfg, sampler, tokenizer, loaded.name)
    out = cfg.output.dir
    done = done_indices(out) if Path(out).is_dir() else set()
    todo = todo_indices(total, done, jax.process_index(), jax.process_count())
    print(f"[translate] {len(done)} of {total} records already in {out}; {len(todo)} to go on "
          f"process {jax.process_index()}/{jax.process_count()}", flush=True)
    with ShardWriter(out, jax.process_index(), jax.process_count(),
                     fsync_every=cfg.output.fsync_every) as writer:
        written = job.run(source, todo, writer)
    report = finish(out, cfg.filters)
    return {"written": written, "resumed_with": len(done), "filter_report": report}
