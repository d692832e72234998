"""One arena vote: who was compared, what was asked, what each answered and who won.

``winner`` is one of :data:`WINNERS`; :func:`normalize_winner` also accepts the spellings of
Chatbot Arena / FastChat (``model_a``, ``model_b``, ``tie (bothbad)``) and of the study's public
votes (``HiTZ/ebaluatoia``: ``model_a``, ``model_b``, ``tie``), so their files rate directly.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

WINNERS = ("a", "b", "tie", "both_bad")
WINNER_ALIASES = {"model_a": "a", "model_b": "b", "tie (bothbad)": "both_bad",
                  "bothbad": "both_bad", "both-bad": "both_bad"}


def normalize_winner(value: Any) -> str | None:
    """``"a"|"b"|"tie"|"both_bad"`` (or an alias) as one of :data:`WINNERS`; None if invalid."""
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    value = WINNER_ALIASES.get(value, value)
    return value if value in WINNERS else None


def new_vote_id() -> str:
    """A fresh vote id: the idempotency key under which a round's vote is stored once."""
    return str(uuid.uuid4())


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Vote:
    """One stored vote. ``id`` is chosen by the caller before submitting (a retried submit with
    the same id is stored once); ``session_id`` is the anonymous participant; ``shown_at`` is
    when the prompt was sent and ``created_at`` when the vote was cast (UTC)."""

    id: str
    session_id: str
    model_a: str
    model_b: str
    winner: str
    prompt: str
    answer_a: str
    answer_b: str
    system_prompt: str = ""
    created_at: datetime = field(default_factory=utc_now)
    shown_at: datetime | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    pairing: str | None = None
    latency_a_ms: int | None = None
    latency_b_ms: int | None = None
    finish_a: str | None = None
    finish_b: str | None = None

    def __post_init__(self) -> None:
        if self.winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}, got {self.winner!r}")
        if self.model_a == self.model_b:
            raise ValueError(f"a vote compares two different models, got {self.model_a!r} twice")
        if not self.id or not self.session_id:
            raise ValueError("a vote needs an id and a session_id")

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
