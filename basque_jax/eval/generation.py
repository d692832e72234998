"""lm-eval ``generate_until`` requests on the continuous-batching :class:`Sampler`, with the
outputs of lm-eval's ``hf`` backend at batch size 1.

Per request, as HFLM does it: generation kwargs normalised by lm-eval
(``normalize_gen_kwargs``, the eos string added to ``until``), the prompt encoded and
left-truncated to ``max_length - max_gen_toks``, then decoding until an eos id of the generation
config, ``max_gen_toks`` tokens, or a stop string. A stop string ends the row at the token
where transformers' stopping criterion (lm-eval's ``MultiTokenEOSCriteria``) would: once the
string occurs in the decoded last ``len(encode(string)) + 2`` generated tokens (special tokens
kept). :class:`StopScan` replays that criterion token by token, while decoding (``watch``: the
row stops early) and once more on the final tokens (the exact cut). The text is
``decode(tokens, skip_special_tokens=True)`` cut at the first stop string
(``postprocess_generated_text``).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from basque_jax.errors import UserError
from basque_jax.sample.requests import FINE_BUCKETS, Request, SamplerConfig, bucket
from basque_jax.sample.sampler import Sampler
from basque_jax.sample.sampling import SamplingParams

if TYPE_CHECKING:
    from basque_jax.eval.harness import BasqueJaxLM

# The shortest KV cache a sampler gets: calls with shorter prompts share one compiled sampler.
MIN_CACHE_LEN = 512
# Keys of lm-eval generation kwargs the sampler honours; others must be at their no-op value.
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p")
NO_OP_KWARGS = {"num_beams": 1, "repetition_penalty": 1.0, "num_return_sequences": 1,
                "use_cache": True, "early_stopping": False, "length_penalty": 1.0}


class StopScan:
    """transformers' stop-string criterion of lm-eval (``MultiTokenEOSCriteria``) on one row:
    the first generated token after which any ``until`` string appears in the decoded window
    of the last ``len(encode(s)) + 2`` tokens."""

    def __init__(self, tokenizer: Any, until: Sequence[str]):
        self.tokenizer = tokenizer
        self.rules = [(s, len(tokenizer.encode(s, add_special_tokens=False)) + 2) for s in until]
        self.checked = 0
        self.hit: int | None = None

    def first_stop(self, tokens: Sequence[int]) -> int | None:
        """Index of the token the row stops after (None: not yet); scans new tokens only."""
        while self.hit is None and self.checked < len(tokens):
            t = self.checked
            for s, n in self.rules:
                if s in self.tokenizer.decode(list(tokens[max(0, t + 1 - n):t + 1])):
                    self.hit = t
                    break
            self.checked += 1
        return self.hit


@dataclass
class _Job:
    context: str
    gen_kwargs: dict
    prompt: list[int]
    params: SamplingParams
    until: list[str]
    stops: StopScan


def sampling_params(kwargs: dict, max_new: int, lm: BasqueJaxLM) -> SamplingParams:
    """Sampler parameters for normalised lm-eval generation kwargs (``until`` and
    ``max_gen_toks`` already taken out): greedy unless ``do_sample``; top-k / top-p / min-p
    from the kwargs, else the model's generation config, else transformers' defaults."""
    unknown = {k: v for k, v in kwargs.items()
               if k not in SAMPLING_KEYS and k != "max_length" and NO_OP_KWARGS.get(k, v) != v}
    if unknown:
        raise UserError(f"generation kwargs {unknown} are not supported by basque_jax (it "
                        f"decodes greedily or samples with {', '.join(SAMPLING_KEYS[1:])})")
    if max_new < 1:
        raise UserError(f"generation kwargs leave no room to generate (max_new_tokens {max_new})")
    stops = lm.generation.stop_ids
    temperature = float(kwargs.get("temperature") or 0.0)
    if not kwargs.get("do_sample") or temperature == 0.0:
        return SamplingParams(0.0, max_new_tokens=max_new, stop_ids=stops, include_stop=True)
    g = lm.generation

    def pick(key: str, default: Any, off: Any) -> Any:
        value = kwargs.get(key, default)
        return off if value is None else value

    return SamplingParams(temperature, int(pick("top_k", g.top_k, 0)),
                          float(pick("top_p", g.top_p, 1.0)), float(pick("min_p", g.min_p, 0.0)),
                          max_new, stops, include_stop=True)


def _jobs(lm: BasqueJaxLM, args: Sequence[tuple[str, dict]]) -> list[_Job]:
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    jobs = []
    for context, gen_kwargs in args:
        if not isinstance(gen_kwargs, dict):
            raise UserError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen = kwargs.pop("max_gen_toks")
        max_ctx = lm.max_length - max_gen
        if max_ctx <= 0:
            raise UserError(f"max_gen_toks {max_gen} leaves no room for a prompt within "
                            f"max_length {lm.max_length}")
        prompt = lm.generation_prompt(context, left_truncate_len=max_ctx)
        max_new = int(kwargs.pop("max_length", len(prompt) + max_gen)) - len(prompt)
        params = sampling_params(kwargs, max_new, lm)
        jobs.append(_Job(context, gen_kwargs, prompt, params, until, StopScan(lm.tokenizer, until)))
    return jobs


def sampler_for(lm: BasqueJaxLM, rows: int, max_len: int) -> Sampler:
    """A sampler of ``lm``'s current weights with ``rows`` slots and a ``max_len`` cache: one
    per shape, compiled once and kept with the model (new weights are swapped in)."""
    m = lm.model
    key = ("sampler", rows, max_len, lm.chunk_steps)
    sampler, version = m.compiled.get(key, (None, None))
    if sampler is None:
        config = SamplerConfig(batch_size=rows, max_len=max_len,
                               chunk_steps=lm.chunk_steps, prompt_buckets=FINE_BUCKETS,
                               max_stop_ids=max(8, len(lm.generation.stop_ids)))
        sampler = Sampler(config=config, graphdef=m.graphdef, params=m.states, mesh=m.mesh,
                          rules=m.rules)
    elif version != m.version:
        sampler.set_params(*m.states)
    m.compiled[key] = (sampler, m.version)
    return sampler


def generate_until(lm: BasqueJaxLM, args: Sequence[tuple[str, dict]]) -> list[str]:
    """Texts for ``(context, gen_kwargs)`` requests, in order (see the module docstring)."""
    from lm_eval.models.utils import postprocess_generated_text

    if not args:
        return []
    jobs = _jobs(lm, args)
    need = max(len(j.prompt) + j.params.max_new_tokens for j in jobs)
    sampler = sampler_for(lm, lm.rows_for(len(jobs)),
                          min(max(bucket(need, lm.max_length), MIN_CACHE_LEN), lm.max_length))
    order = sorted(range(len(jobs)), key=lambda i: (-len(jobs[i].prompt), jobs[i].context))
    pending = collections.deque(Request(jobs[i].prompt, jobs[i].params, lm.seed + i, i)
                                for i in order)

    def watch(req: Request, tokens: list[int]) -> bool:
        return jobs[req.tag].stops.first_stop(tokens) is not None

    texts: list[str | None] = [None] * len(jobs)
    for req, completion in sampler.stream(pending, watch=watch):
        job = jobs[req.tag]
        hit = job.stops.first_stop(completion.tokens)
        tokens = completion.tokens if hit is None else completion.tokens[:hit + 1]
        text = lm.tok_decode(tokens, skip_special_tokens=True)
        text = postprocess_generated_text(generation=text, stop=job.until, think_end_token=None)
        texts[req.tag] = text
        lm.cache_hook.add_partial("generate_until", (job.context, job.gen_kwargs), text)
    return texts  # type: ignore[return-value]
