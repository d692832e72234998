"""Continuous batching for HTTP requests: one sampler loop per model, fed by a queue.

Each served model has a :class:`BatchWorker`: a background thread that runs
:meth:`basque_jax.sample.sampler.Sampler.stream` over its queue. Requests join while others
run -- the sampler's ``watch`` callback, called after every chunk of decode steps, moves newly
submitted rows from the thread-safe inbox into the sampler's pending queue, streams each
running row's new text to its HTTP request, stops rows on a stop string, and stops the rows of
a request whose client has gone away (freeing their slots at once).

A :class:`Job` is one generated row (a request with ``n`` choices or several prompts has one
per choice); its events go to the request's :class:`Channel`, an ``asyncio.Queue`` filled
from the worker thread with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from basque_jax.sample.sampler import Completion, Request, Sampler
from basque_jax.serve.text import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """``delta`` (new text of choice ``index``), ``done`` (its finish reason and generated
    token count) or ``error``."""

    kind: str
    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


class Channel:
    """Where the jobs of one HTTP request send their events (thread-safe); ``cancel`` when
    the client has gone: its rows stop after the current decode chunk."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self.cancelled = True

    def cancel(self) -> None:
        self.cancelled = True


class Job:
    """One generated row: the sampler request, its text stream, its channel and choice index.

    ``prompt_text`` is sent first when the request echoes its prompt (completions).
    """

    def __init__(self, request: Request, index: int, text: TextStream, channel: Channel,
                 prompt_text: str = "") -> None:
        self.request = Request(request.prompt, request.params, request.seed, self)
        self.index = index
        self.text = text
        self.channel = channel
        self.prompt_text = prompt_text

    @property
    def cancelled(self) -> bool:
        return self.channel.cancelled

    def progress(self, tokens: list[int]) -> bool:
        """Stream the new text of ``tokens`` (all generated so far); True ends the row."""
        if self.cancelled:
            return True
        if tokens and tokens[-1] in self.request.params.stop_ids:  # the row has just ended
            tokens = tokens[:-1]
        self._send(self.text.update(tokens))
        return self.text.stopped

    def finish(self, completion: Completion) -> None:
        """The row has ended: the rest of its text, then ``done``."""
        if self.cancelled:
            return
        self._send(self.text.update(completion.tokens, final=True))
        reason = "stop" if self.text.stopped else completion.finish_reason
        generated = len(completion.tokens) + (completion.stop_id is not None)
        self.channel.put(Event("done", self.index, finish_reason=reason,
                               completion_tokens=generated))

    def fail(self, message: str) -> None:
        self.channel.put(Event("error", self.index, text=message))

    def _send(self, delta: str) -> None:
        if delta:
            self.channel.put(Event("delta", self.index, delta))


class BatchWorker:
    """The sampler loop of one model in a daemon thread (see the module docstring)."""

    def __init__(self, sampler: Sampler, name: str) -> None:
        self.sampler = sampler
        self.name = name
        self.inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.live: set[Job] = set()  # taken from the inbox, not finished
        self.served = self.cancelled = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"serve-{name}")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self.inbox.put(job)

    def stats(self) -> dict[str, int]:
        """Rows in the sampler or its queue, submitted but not taken yet, finished, and
        stopped because their client went away."""
        return {"active": len(self.live), "queued": self.inbox.qsize(), "served": self.served,
                "cancelled": self.cancelled}

    def _loop(self) -> None:
        while not self._stopping:
            first = self.inbox.get()
            if first is None:
                continue
            pending: collections.deque[Request] = collections.deque()
            self._admit(first, pending)
            self._take_new(pending)
            if not pending:
                continue

            def watch(req: Request, tokens: list[int], pending=pending) -> bool:
                self._take_new(pending)
                return req.tag.progress(tokens)

            try:
                for req, completion in self.sampler.stream(pending, watch=watch):
                    job = req.tag
                    self.live.discard(job)
                    if job.cancelled:
                        self.cancelled += 1
                    else:
                        job.finish(completion)
                        self.served += 1
            except Exception:  # noqa: BLE001 - a bug: logged with its traceback, requests fail
                log.exception("serve: the sampler loop of %s failed", self.name)
                for job in self.live:
                    job.fail("internal error in the sampler loop (see the server log)")
                self.live.clear()

    def _admit(self, job: Job, pending: collections.deque[Request]) -> None:
        if job.cancelled:
            self.cancelled += 1
        else:
            pending.append(job.request)
            self.live.add(job)

    def _take_new(self, pending: collections.deque[Request]) -> None:
        """Move submitted jobs into the sampler's queue; drop those cancelled meanwhile."""
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                break
            if job is not None:  # None: stop() while rows run; they finish first
                self._admit(job, pending)
        if any(r.tag.cancelled for r in pending):
            kept = [r for r in pending if not r.tag.cancelled]
            for r in pending:
                if r.tag.cancelled:
                    self.live.discard(r.tag)
                    self.cancelled += 1
            pending.clear()
            pending.extend(kept)
