"""Typed configs of ``basque-jax generate`` (Magpie) and ``basque-jax translate``.

Read like the run config (YAML with ``base:`` composition, ``a.b=value`` overrides) and
validated by the same ``_build`` (errors name the key). Sampling parameters name stop tokens by
their vocabulary entry (``<|eot_id|>``) and are resolved against the tokenizer at start-up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from basque_jax.config import DTYPES, MeshSection, apply_overrides, read_yaml
from basque_jax.data.config import ConfigError, SourceConfig, _build
from basque_jax.sample.filters import FilterConfig
from basque_jax.sample.sampling import SamplingParams

# Magpie's stop set for the query: <|eot_id|> 128009, <|end_of_text|> 128001, and the header
# markers 128006/128007 (a model that starts another header has finished the user turn).
INSTRUCTION_STOPS = ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>",
                     "<|end_header_id|>"]
RESPONSE_STOPS = ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]


@dataclass
class ModelSource:
    """Where the weights come from: exactly one of ``preset`` (random, for tests),
    ``init_from`` (a Hugging Face folder) or ``train_dir`` (a ``basque-jax train`` output
    folder; its latest checkpoint, or ``step``). ``tokenizer`` defaults to the HF folder or
    the training run's ``data.tokenizer``. ``merge_lora``: fold a run's adapters into the
    weights before sampling (faster; otherwise they run unmerged)."""

    preset: str | None = None
    init_from: str | None = None
    train_dir: str | None = None
    step: int | None = None
    tokenizer: str | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    seed: int = 0
    merge_lora: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("preset", "init_from", "train_dir") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(f"model: set exactly one of preset, init_from, train_dir "
                              f"(got {given or 'none'})")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"model.{key}: expected one of {DTYPES}, got "
                                  f"{getattr(self, key)!r}")
        if self.preset and not self.tokenizer:
            raise ConfigError("model.tokenizer: required with model.preset (e.g. 'demo')")

    @property
    def display_name(self) -> str:
        return self.name or str(self.init_from or self.train_dir or f"preset:{self.preset}")


@dataclass
class SamplingSection:
    """Config form of :class:`~basque_jax.sample.sampling.SamplingParams`."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 512
    stop_tokens: list[str] = field(default_factory=lambda: list(RESPONSE_STOPS))
    include_stop: bool = False

    def __post_init__(self) -> None:
        try:
            SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p,
                           self.max_new_tokens)
        except ValueError as e:
            raise ConfigError(str(e).replace("sampling: ", "")) from None

    def params(self, tokenizer) -> SamplingParams:
        """Resolved against ``tokenizer`` (KeyError naming an unknown stop token)."""
        stops = []
        for name in self.stop_tokens:
            try:
                stops.append(tokenizer.token_id(name))
            except KeyError as e:
                raise ConfigError(f"stop_tokens: {e.args[0]}") from None
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p,
                              self.max_new_tokens, tuple(stops), self.include_stop)


@dataclass
class SamplerSection:
    """Row slots, cache length, decode steps between refills, per-layer weight copies."""

    batch_size: int = 32
    max_len: int = 4096
    chunk_steps: int = 32
    unstack: bool | None = None

    def __post_init__(self) -> None:
        for key in ("batch_size", "chunk_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"sampler.{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_len < 2:
            raise ConfigError(f"sampler.max_len: must be >= 2, got {self.max_len}")


@dataclass
class OutputSection:
    """Output folder (shards, ``filtered.jsonl``, ``filter_report.json``)."""

    dir: str
    fsync_every: int = 64


@dataclass
class InstructionSampling(SamplingSection):
    """Magpie's query sampling: temperature 0.9, top-p 1.0, stop on eot/end/header ids."""

    temperature: float = 0.9
    max_new_tokens: int = 512
    stop_tokens: list[str] = field(default_factory=lambda: list(INSTRUCTION_STOPS))


@dataclass
class ResponseSampling(SamplingSection):
    """Magpie's response sampling: temperature 0.6, top-p 0.9."""

    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 2048


@dataclass
class TranslationSampling(SamplingSection):
    """Greedy translation."""

    temperature: float = 0.0
    max_new_tokens: int = 2048


@dataclass
class GenerateConfig:
    """Magpie: ``num_samples`` conversations from the instruct model alone.

    system_prompt: a system block before the pre-query template (e.g. asking for Basque);
      null gives Magpie's bare ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>``.
    chat_template / chat_date / response_system_prompt: how the response prompt is built
      (the Llama 3.1 template always has a system block with dates, as ``apply_chat_template``).
    on_truncated_instruction: ``skip`` records a query that hit ``max_new_tokens`` without a
      stop token as status ``instruction_truncated``; ``respond`` answers it anyway.
    """

    model: ModelSource
    output: OutputSection
    num_samples: int
    seed: int = 0
    system_prompt: str | None = None
    chat_template: Literal["llama31", "llama3"] = "llama31"
    chat_date: str = "26 Jul 2024"
    response_system_prompt: str = ""
    on_truncated_instruction: Literal["skip", "respond"] = "skip"
    instruction: InstructionSampling = field(default_factory=InstructionSampling)
    response: ResponseSampling = field(default_factory=ResponseSampling)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    mesh: MeshSection = field(default_factory=lambda: MeshSection(data=-1, fsdp=1))
    filters: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self) -> None:
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

    model: ModelSource
    output: OutputSection
    source: SourceConfig
    prompt: str = DEFAULT_TRANSLATION_PROMPT
    system_prompt: str = ""
    roles: list[str] = field(default_factory=lambda: ["system", "user", "assistant"])
    num_records: int | None = None
    seed: int = 0
    chat_template: Literal["llama31", "llama3"] = "llama31"
    chat_date: str = "26 Jul 2024"
    sampling: TranslationSampling = field(default_factory=TranslationSampling)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    mesh: MeshSection = field(default_factory=lambda: MeshSection(data=-1, fsdp=1))
    filters: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self) -> None:
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


def _load(cls: type, path: str | Path, overrides: list[str] | tuple[str, ...]) -> Any:
    d = apply_overrides(read_yaml(path), list(overrides))
    return _build(cls, d, "config")


def load_generate_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                         ) -> GenerateConfig:
    """Read, override and validate a ``generate`` config."""
    return _load(GenerateConfig, path, overrides)


def load_translate_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                          ) -> TranslateConfig:
    """Read, override and validate a ``translate`` config (``@sample/`` paths allowed)."""
    from basque_jax.config import resolve_sample_paths

    d = apply_overrides(read_yaml(path), list(overrides))
    src = d.get("source")
    if isinstance(src, dict):
        resolve_sample_paths({"data": {"sources": [src]}})
    return _build(TranslateConfig, d, "config")
