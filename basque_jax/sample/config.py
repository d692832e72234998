"""Typed configs of ``basque-jax generate`` (Magpie) and ``basque-jax translate``.

Read like every config (:func:`basque_jax.yaml_config.load_yaml_config`: ``base:``, ``vars:``,
``a.b=value`` overrides, ``@embedded/`` paths; errors name the file and key). The sections are
the objects the code takes: ``model`` (:class:`~basque_jax.config.ModelConfig`), ``mesh``,
``sampler`` (:class:`~basque_jax.sample.sampler.SamplerConfig`), sampling
(:class:`~basque_jax.sample.sampling.SamplingConfig`, stop tokens named by their vocabulary
entry and resolved against the tokenizer at start-up), ``filters``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from basque_jax.config import ModelConfig
from basque_jax.data.config import SourceConfig
from basque_jax.data.templates import check_chat_template_setting
from basque_jax.errors import ConfigError
from basque_jax.sample.filters import FilterConfig
from basque_jax.sample.sampler import SamplerConfig
from basque_jax.sample.sampling import SamplingConfig
from basque_jax.sharding import MeshConfig
from basque_jax.yaml_config import load_yaml_config


@dataclass
class OutputConfig:
    """Output folder (shards, ``filtered.jsonl``, ``filter_report.json``)."""

    dir: str
    fsync_every: int = 64


@dataclass
class InstructionSampling(SamplingConfig):
    """Magpie's query sampling: temperature 0.9, top-p 1.0; stops (by default) on the chat
    template's tokens after a user turn (Llama 3.1: eot, end of text, header markers)."""

    temperature: float = 0.9
    max_new_tokens: int = 512


@dataclass
class ResponseSampling(SamplingConfig):
    """Magpie's response sampling: temperature 0.6, top-p 0.9; stops (by default) on the
    template's end of turn."""

    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 2048


@dataclass
class TranslationSampling(SamplingConfig):
    """Greedy translation, stopping (by default) at the template's end of turn."""

    temperature: float = 0.0
    max_new_tokens: int = 2048


@dataclass
class GenerateConfig:
    """Magpie: ``num_samples`` conversations from the instruct model alone.

    system_prompt: a system message before the pre-query prompt (e.g. asking for Basque);
      null gives Magpie's bare ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>``
      for Llama 3.1, the template's own default system block for other templates.
    chat_template (auto | llama31 | llama3 | PATH.jinja, as ``data.chat_template``) /
      chat_date / response_system_prompt: the pre-query prompt, the stop tokens and the
      response prompt all come from it.
    on_truncated_instruction: ``skip`` records a query that hit ``max_new_tokens`` without a
      stop token as status ``instruction_truncated``; ``respond`` answers it anyway.
    """

    model: ModelConfig
    output: OutputConfig
    num_samples: int
    seed: int = 0
    system_prompt: str | None = None
    chat_template: str = "auto"
    chat_date: str = "26 Jul 2024"
    response_system_prompt: str = ""
    on_truncated_instruction: Literal["skip", "respond"] = "skip"
    instruction: InstructionSampling = field(default_factory=InstructionSampling)
    response: ResponseSampling = field(default_factory=ResponseSampling)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    mesh: MeshConfig = field(default_factory=lambda: MeshConfig(data=-1, fsdp=1))
    filters: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self) -> None:
        _needs_tokenizer(self.model)
        check_chat_template_setting(self.chat_template, "chat_template")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: must be >= 1, got {self.num_samples}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_TRANSLATION_PROMPT = (
    "Translate the following text from English into Basque. Keep the meaning, the tone and "
    "the formatting (line breaks, lists, code, names). Reply with the translation only.\n\n"
    "{text}"
)


@dataclass
class TranslateConfig:
    """Turn-by-turn translation of a chat data set (``source``: a ``kind: chat`` source, file
    or hub name) with ``prompt`` (``{text}`` is replaced by the turn). ``roles``: the turns
    translated (others are copied). ``num_records``: the first N records only."""

    model: ModelConfig
    output: OutputConfig
    source: SourceConfig
    prompt: str = DEFAULT_TRANSLATION_PROMPT
    system_prompt: str = ""
    roles: list[str] = field(default_factory=lambda: ["system", "user", "assistant"])
    num_records: int | None = None
    seed: int = 0
    chat_template: str = "auto"
    chat_date: str = "26 Jul 2024"
    sampling: TranslationSampling = field(default_factory=TranslationSampling)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    mesh: MeshConfig = field(default_factory=lambda: MeshConfig(data=-1, fsdp=1))
    filters: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self) -> None:
        _needs_tokenizer(self.model)
        check_chat_template_setting(self.chat_template, "chat_template")
        if "{text}" not in self.prompt:
            raise ConfigError("prompt: must contain the placeholder {text}")
        try:
            self.prompt.format(text="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"prompt: only {{text}} may be a placeholder (double other "
                              f"braces): {e!r}") from None
        if self.source.kind != "chat":
            raise ConfigError(f"source.kind: translate reads chat data, got {self.source.kind!r}")
        if self.num_records is not None and self.num_records < 1:
            raise ConfigError(f"num_records: must be >= 1, got {self.num_records}")
        unknown = [r for r in self.roles if r not in ("system", "user", "assistant")]
        if unknown:
            raise ConfigError(f"roles: unknown {unknown}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _needs_tokenizer(model: ModelConfig) -> None:
    if model.preset and not model.tokenizer:
        raise ConfigError("model.tokenizer: required with model.preset (e.g. 'demo')")


def load_generate_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                         ) -> GenerateConfig:
    """Read, override and validate a ``generate`` config."""
    return load_yaml_config(GenerateConfig, path, overrides)


def load_translate_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                          ) -> TranslateConfig:
    """Read, override and validate a ``translate`` config."""
    return load_yaml_config(TranslateConfig, path, overrides)
