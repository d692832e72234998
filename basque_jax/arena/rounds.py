"""One arena round, without any web framework: draw two models, stream both answers, record
the vote.

A :class:`Round` gets its vote id when it starts; that id is the idempotency key of its vote,
so submitting the vote of a round again (a double click, a retried request) stores it once and
reports the vote that was kept. The round lives on the server (the page keeps it in the
participant's session state), so a participant can neither see which models answer before
voting nor choose which models a vote is attributed to.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from basque_jax.arena.config import ArenaConfig
from basque_jax.arena.endpoints import (
    Answer,
    ChatEndpoint,
    Generation,
    chat_messages,
    stream_pair,
    system_prompt_for,
)
from basque_jax.arena.leaderboard import Leaderboard
from basque_jax.arena.pairing import PairSampler
from basque_jax.arena.store import VoteStore, database_url
from basque_jax.arena.votes import WINNERS, Vote, new_vote_id, utc_now
from basque_jax.errors import UserError

log = logging.getLogger(__name__)


class RoundError(UserError):
    """The participant cannot do that now; ``reason`` is ``empty``, ``too_long``,
    ``not_votable`` or ``bad_winner``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Round:
    vote_id: str
    session_id: str
    model_a: str
    model_b: str
    prompt: str
    system_prompt: str
    shown_at: datetime
    answer_a: Answer = field(default_factory=Answer)
    answer_b: Answer = field(default_factory=Answer)

    @property
    def votable(self) -> bool:
        return self.answer_a.ok and self.answer_b.ok

    def failed_sides(self) -> list[str]:
        return [side for side, answer in (("A", self.answer_a), ("B", self.answer_b))
                if answer.done and answer.error is not None]


@dataclass(frozen=True)
class Receipt:
    """What the store holds for a round after a vote: ``new`` is False when the vote had been
    recorded before (then ``vote`` is the stored one, whatever this submit said)."""

    vote: Vote
    new: bool


class Arena:
    """The arena's state shared by all participants: endpoints, pair sampler, store and
    leaderboard (call :meth:`start` to run the leaderboard's background refresh)."""

    def __init__(self, config: ArenaConfig, store: VoteStore | None = None) -> None:
        self.config = config
        self.store = store if store is not None else VoteStore(database_url(config.database))
        self.models = [m.name for m in config.models]
        self.endpoints = {m.name: ChatEndpoint(m, config.request_timeout_s)
                          for m in config.models}
        self.generation = Generation.from_config(config)
        self.sampler = PairSampler(self.models, config.pairing, config.seed)
        self.leaderboard = Leaderboard(self.store, self.models,
                                       bootstrap=config.leaderboard_bootstrap,
                                       refresh_s=config.leaderboard_refresh_s)

    def start(self) -> None:
        self.leaderboard.start()

    def stop(self) -> None:
        self.leaderboard.stop()

    def new_round(self, prompt: str, session_id: str) -> Round:
        prompt = (prompt or "").strip()
        if not prompt:
            raise RoundError("empty prompt", "empty")
        if len(prompt) > self.config.max_prompt_chars:
            raise RoundError(f"prompt too long ({len(prompt)} > "
                             f"{self.config.max_prompt_chars} characters)", "too_long")
        standings = self.leaderboard.standings
        model_a, model_b = self.sampler.draw(standings.intervals, standings.pair_votes)
        now = utc_now()
        return Round(vote_id=new_vote_id(), session_id=session_id, model_a=model_a,
                     model_b=model_b, prompt=prompt,
                     system_prompt=system_prompt_for(self.config.system_prompt, now),
                     shown_at=now)

    async def stream(self, rnd: Round) -> AsyncIterator[Round]:
        """Fill both answers of ``rnd``, yielding it whenever one has grown."""
        messages = chat_messages(rnd.system_prompt, rnd.prompt)
        async for answer_a, answer_b in stream_pair(self.endpoints[rnd.model_a],
                                                    self.endpoints[rnd.model_b], messages,
                                                    self.generation,
                                                    self.config.stream_update_s):
            rnd.answer_a, rnd.answer_b = answer_a, answer_b
            yield rnd

    def vote(self, rnd: Round, winner: str) -> Receipt:
        """Record the vote of ``rnd`` (committed when this returns)."""
        if winner not in WINNERS:
            raise RoundError(f"winner must be one of {WINNERS}, got {winner!r}", "bad_winner")
        if not rnd.votable:
            raise RoundError("both answers must be complete before voting", "not_votable")
        vote = Vote(
            id=rnd.vote_id, session_id=rnd.session_id, model_a=rnd.model_a,
            model_b=rnd.model_b, winner=winner, prompt=rnd.prompt,
            answer_a=rnd.answer_a.text, answer_b=rnd.answer_b.text,
            system_prompt=rnd.system_prompt, shown_at=rnd.shown_at,
            temperature=self.generation.temperature, top_p=self.generation.top_p,
            max_tokens=self.generation.max_tokens, pairing=self.config.pairing,
            latency_a_ms=rnd.answer_a.latency_ms, latency_b_ms=rnd.answer_b.latency_ms,
            finish_a=rnd.answer_a.finish_reason, finish_b=rnd.answer_b.finish_reason)
        new = self.store.record(vote)
        if new:
            self.leaderboard.request_refresh()
            return Receipt(vote, True)
        stored = self.store.get(vote.id)
        assert stored is not None, "a vote id reported as stored is missing"
        return Receipt(stored, False)
