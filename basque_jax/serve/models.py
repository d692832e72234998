"""The models one ``basque-jax serve`` process serves: loaded, named, with their prompts.

Every source :func:`basque_jax.runs.load_model` takes can be served: a Hugging Face folder, a
named model (``smollm2-135m-instruct``), a training run (LoRA adapters unmerged unless
``merge_lora``), one of its checkpoints, or a run config. Each keeps its own chat template --
a run's ``data.chat_template`` / ``chat_date`` / ``system_prompt``, else ``auto`` (Llama 3.1's
format for a Llama 3 tokenizer, else the tokenizer's own Jinja template) -- so a client's
messages are encoded exactly as the model was trained on them, and generation stops on that
template's end-of-turn ids.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from basque_jax.data.templates import make_chat_encoder
from basque_jax.data.tokenizer import Tokenizer
from basque_jax.errors import UserError
from basque_jax.serve.engine import Job


class Worker(Protocol):
    """What the HTTP layer needs from a model's batching loop."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, jobs: Sequence[Job]) -> None: ...

    def stats(self) -> dict[str, int]: ...


@dataclass
class ServedModel:
    """One model behind the API: its id, tokenizer, chat encoder, batching worker, limits.

    ``check(request)`` raises UserError for a request the sampler cannot run (length,
    vocabulary); ``max_len``: prompt + completion tokens at most.
    """

    name: str
    tokenizer: Tokenizer
    encoder: Any
    worker: Worker
    max_len: int
    check: Any
    source: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(self.encoder.stop_ids)

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Prompt ids of a conversation, up to the assistant header (the generation prompt)."""
        return self.encoder.encode_chat(messages, add_generation_prompt=True)[0]

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids of a raw completion prompt: the document BOS (unless the text starts
        with it) and the text with its special-token strings parsed, as transformers and vLLM
        tokenize prompts (so a prompt already in chat format works)."""
        tok = self.tokenizer
        bos = [tok.bos_id] if tok.bos_id is not None and not (
            tok.bos_token and text.startswith(tok.bos_token)) else []
        return bos + tok.encode_template(text)


def default_name(source: str, step: int | None) -> str:
    """A model id for ``source``: a named model keeps its name; a run is ``DIR-stepN``; a
    folder or config file its base name."""
    p = Path(source)
    if not p.exists():
        return source
    p = p.resolve()
    if p.name.isdigit() and p.parent.name == "checkpoints":
        p = p.parent.parent
    elif p.name == "checkpoints":
        p = p.parent
    if step is not None:
        return f"{p.stem if p.is_file() else p.name}-step{step}"
    return p.stem if p.is_file() else p.name


def model_names(sources: Sequence[str], names: Sequence[str]) -> list[str | None]:
    """The ``--name`` of each source (None: derived once loaded); UserError on a mismatch."""
    if len(names) > len(sources):
        raise UserError(f"{len(names)} --name values for {len(sources)} models; give at most "
                        "one name per model, in the order of the models")
    return [*names, *[None] * (len(sources) - len(names))]


def check_unique(models: Sequence[ServedModel]) -> None:
    seen: dict[str, str] = {}
    for m in models:
        if m.name in seen:
            raise UserError(f"two models are named {m.name!r} ({seen[m.name]} and {m.source}); "
                            "name them with --name, one per model in order")
        seen[m.name] = m.source


def load_served_model(source: str, name: str | None, sampler_config: Any, *,
                      dtype: str | None = None, tensor: int = 1,
                      merge_lora: bool = False) -> ServedModel:
    """Load ``source`` onto this process's devices (rows over the data axis, ``tensor``-way
    tensor parallel) with a :class:`~basque_jax.sample.sampler.Sampler` and its worker."""
    import jax

    from basque_jax.runs import load_model
    from basque_jax.sample.sampler import Sampler
    from basque_jax.serve.engine import BatchWorker
    from basque_jax.sharding import MeshConfig

    mesh = MeshConfig(data=-1, fsdp=1, tensor=tensor)
    loaded = load_model(source, mesh=mesh, devices=jax.local_devices(), dtype=dtype,
                        merge_lora=merge_lora)
    tokenizer = loaded.load_tokenizer()
    data = loaded.data
    if data is not None:  # a training run: the template it was trained with
        encoder = make_chat_encoder(tokenizer, data.chat_template, date_string=data.chat_date,
                                    system_prompt=data.system_prompt)
    else:
        encoder = make_chat_encoder(tokenizer, "auto")
    sampler = Sampler(loaded.model, sampler_config, mesh=loaded.mesh, rules=loaded.rules)
    name = name or default_name(source, loaded.step)
    return ServedModel(name=name, tokenizer=tokenizer, encoder=encoder,
                       worker=BatchWorker(sampler, name), max_len=sampler.max_len,
                       check=sampler.check, source=str(source))
