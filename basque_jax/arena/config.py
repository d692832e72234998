"""The arena configuration (``basque-jax arena serve CONFIG``): models, generation, pairing,
vote database, admin token and server address, read from YAML.

Read and validated like every config of the project (``basque_jax.yaml_config``: ``base:``,
``vars:``, ``key=value`` overrides): an unknown key, a wrong type or an impossible value raises
:class:`ConfigError` naming the file and the key (``arena.yaml: models[1].base_url: expected
str, got int 5``).

Defaults follow the study's arena (``evaluation/human/frontend`` in hitz-zentroa/latxa-instruct):
its system prompt (``{date}`` becomes today's date), ``max_tokens`` 2048, ``temperature`` 0.9,
``top_p`` 0.95, and two models drawn uniformly at random for each prompt. For example::

    models:
      - {name: latxa-8b-instruct, base_url: "http://gpu1:8000/v1"}   # basque-jax serve
      - {name: llama-3.1-8b-instruct, base_url: "http://gpu2:8000/v1",
         model: meta-llama/Llama-3.1-8B-Instruct}                   # vLLM
      - {name: gpt-4o, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
    pairing: adaptive
    database: votes.db            # or postgresql+psycopg://user@host/arena
    admin_token_env: ARENA_ADMIN_TOKEN
    host: 0.0.0.0
    port: 7860
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from basque_jax.errors import ConfigError
from basque_jax.yaml_config import build, load_yaml_config

STUDY_SYSTEM_PROMPT = (
    "You are a helpful Artificial Intelligence assistant called Latxa, created and developed by "
    "HiTZ, the Basque Center for Language Technology research center. The user will engage in a "
    "multi-round conversation with you, asking initial questions and following up with "
    "additional related questions. Your goal is to provide thorough, relevant and insightful "
    "responses to help the user with their queries. Every conversation will be conducted in "
    "standard Basque, this is, the first question from the user will be in Basque, and you "
    "should respond in formal Basque as well. Conversations will cover a wide range of topics, "
    "including but not limited to general knowledge, science, technology, entertainment, "
    "coding, mathematics, and more. Today is {date}."
)


@dataclass
class ArenaModel:
    """One contestant: ``name`` is what the leaderboard and the reveal show; ``base_url`` an
    OpenAI-compatible endpoint (``http://host:8000/v1``: ``basque-jax serve``, vLLM ...);
    ``model`` the id to request there (default: ``name``); ``api_key_env`` the environment
    variable holding its API key (default: none, the key ``EMPTY`` is sent)."""

    name: str
    base_url: str
    model: str | None = None
    api_key_env: str | None = None

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("name: must not be empty")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url: expected an http(s) URL, got {self.base_url!r}")
        if self.model is None:
            self.model = self.name

    @property
    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else "EMPTY"


@dataclass
class ArenaConfig:
    """Everything ``basque-jax arena serve`` needs.

    language: of the page's labels and messages (Basque or English).
    pairing: ``uniform`` (every pair equally likely, as in the study) or ``adaptive`` (pairs
      whose ratings are still uncertain and that have few votes are drawn more often; see
      ``basque_jax.arena.pairing``).
    database: an SQLite file (relative to the config file) or any SQLAlchemy URL.
    admin_token / admin_token_env: the token (or the variable holding it) that
      ``GET /admin/export`` requires; with neither, export is disabled.
    leaderboard_bootstrap / leaderboard_refresh_s: bootstrap rounds of the page's intervals and
      how often the page's leaderboard is recomputed and refreshed.
    stream_update_s: the page shows the growing answers at most this often (each update is a
      message to the participant's browser; raise it for very large events).
    seed: seed of the pair draws (default: fresh randomness).
    """

    models: list[ArenaModel]
    title: str = "basque-jax arena"
    language: Literal["eu", "en"] = "eu"
    system_prompt: str = STUDY_SYSTEM_PROMPT
    max_tokens: int = 2048
    temperature: float = 0.9
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)
    request_timeout_s: float = 120.0
    stream_update_s: float = 0.1
    max_prompt_chars: int = 4000
    pairing: Literal["uniform", "adaptive"] = "uniform"
    database: str = "arena_votes.db"
    admin_token: str | None = None
    admin_token_env: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    concurrency: int = 64
    leaderboard_bootstrap: int = 100
    leaderboard_refresh_s: float = 10.0
    seed: int | None = None

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        checks = [
            (len(self.models) >= 2, "models", "give at least two models to compare"),
            (not dupes, "models", f"duplicate model names {dupes}"),
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (0 <= self.temperature <= 2, "temperature", "must be in [0, 2]"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.request_timeout_s > 0, "request_timeout_s", "must be > 0"),
            (self.stream_update_s >= 0, "stream_update_s", "must be >= 0"),
            (self.max_prompt_chars >= 1, "max_prompt_chars", "must be >= 1"),
            (1 <= self.port <= 65535, "port", "must be in [1, 65535]"),
            (self.concurrency >= 1, "concurrency", "must be >= 1"),
            (self.leaderboard_bootstrap >= 0, "leaderboard_bootstrap", "must be >= 0"),
            (self.leaderboard_refresh_s > 0, "leaderboard_refresh_s", "must be > 0"),
            (not (self.admin_token and self.admin_token_env), "admin_token",
             "set admin_token or admin_token_env, not both"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key}: {message}")

    def resolved_admin_token(self) -> str | None:
        """The admin token, read from ``admin_token_env`` when that is how it is given."""
        if self.admin_token_env:
            token = os.environ.get(self.admin_token_env)
            if not token:
                raise ConfigError(f"admin_token_env: environment variable "
                                  f"{self.admin_token_env} is not set")
            return token
        return self.admin_token

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def arena_config_from_dict(d: Any) -> ArenaConfig:
    """Validate plain YAML/JSON values (a ConfigError names the key)."""
    return build(ArenaConfig, d)


def load_arena_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                      ) -> ArenaConfig:
    """Read, override (``key=value``) and validate an arena YAML file. A relative SQLite
    ``database`` path is taken relative to the config file."""
    config = load_yaml_config(ArenaConfig, path, overrides)
    if "://" not in config.database and not Path(config.database).is_absolute():
        config.database = str((Path(path).parent / config.database).resolve())
    return config
