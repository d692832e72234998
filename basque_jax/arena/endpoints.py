"""Answers from OpenAI-compatible endpoints, streamed two at a time.

Each contestant is reached through the official ``openai`` client (``AsyncOpenAI``), so any
server speaking the chat-completions API works: ``basque-jax serve``, vLLM, a hosted API.
:func:`stream_pair` runs both requests concurrently and yields both answers so far whenever
either grows, for the page to show them side by side. A failed request (connection refused,
HTTP error, timeout) ends that answer with ``error`` set instead of raising: the round is then
not votable, and the page says which side failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import openai

from basque_jax.arena.config import ArenaConfig, ArenaModel

log = logging.getLogger(__name__)
DATE_FORMAT = "%A %B %e, %Y"  # the study's "{date}": e.g. "Monday March  3, 2025"
UPDATE_INTERVAL_S = 0.1  # at most ten page updates a second per round


@dataclass(frozen=True)
class Generation:
    """Sampling settings sent with every request."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: ArenaConfig) -> Generation:
        return cls(config.max_tokens, config.temperature, config.top_p, tuple(config.stop))


@dataclass
class Answer:
    """One side's answer as it streams: text so far, and once ``done`` the finish reason (or
    the error), the time to the first token and the total time in milliseconds."""

    text: str = ""
    done: bool = False
    error: str | None = None
    finish_reason: str | None = None
    first_token_ms: int | None = None
    latency_ms: int | None = None

    @property
    def ok(self) -> bool:
        return self.done and self.error is None


def system_prompt_for(template: str, now: datetime) -> str:
    """The system prompt with ``{date}`` replaced by ``now`` (other braces are left alone)."""
    return template.replace("{date}", now.strftime(DATE_FORMAT))


def chat_messages(system_prompt: str, prompt: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


class ChatEndpoint:
    """One contestant's endpoint (a reused ``AsyncOpenAI`` client, no automatic retries: a
    participant waiting for an answer is better served by an error than by a silent retry)."""

    def __init__(self, model: ArenaModel, timeout_s: float) -> None:
        self.name = model.name
        self.model = model.model or model.name
        self.client = openai.AsyncOpenAI(base_url=model.base_url, api_key=model.api_key,
                                         timeout=timeout_s, max_retries=0)

    async def stream(self, messages: list[dict[str, str]], gen: Generation, answer: Answer,
                     changed: asyncio.Event | None = None) -> None:
        """Fill ``answer`` as tokens arrive (setting ``changed`` on each); always ends with
        ``answer.done`` set."""
        start = time.monotonic()
        try:
            stream = await self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True, max_tokens=gen.max_tokens,
                temperature=gen.temperature, top_p=gen.top_p, stop=list(gen.stop) or None)
            async for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.delta and choice.delta.content:
                    if answer.first_token_ms is None:
                        answer.first_token_ms = int(1000 * (time.monotonic() - start))
                    answer.text += choice.delta.content
                    if changed is not None:
                        changed.set()
                if choice.finish_reason:
                    answer.finish_reason = choice.finish_reason
        except openai.OpenAIError as e:
            answer.error = f"{type(e).__name__}: {e}"
            log.warning("arena: %s (%s) failed: %s", self.name, self.model, answer.error)
        finally:
            answer.latency_ms = int(1000 * (time.monotonic() - start))
            answer.done = True
            if changed is not None:
                changed.set()


async def stream_pair(a: ChatEndpoint, b: ChatEndpoint, messages: list[dict[str, str]],
                      gen: Generation, min_interval_s: float = UPDATE_INTERVAL_S,
                      ) -> AsyncIterator[tuple[Answer, Answer]]:
    """Both answers so far, yielded when either has grown but at most every
    ``min_interval_s`` (each update costs the page a round trip); the last yield has both
    done. A slow consumer gets fewer, larger steps instead of falling behind."""
    answers = (Answer(), Answer())
    changed = asyncio.Event()
    tasks = [asyncio.create_task(endpoint.stream(messages, gen, answer, changed))
             for endpoint, answer in zip((a, b), answers, strict=True)]
    try:
        while True:
            await changed.wait()
            await asyncio.wait(tasks, timeout=min_interval_s)  # early once both have ended
            changed.clear()
            finished = all(answer.done for answer in answers)
            yield answers
            if finished:
                return
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

