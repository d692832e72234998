"""Driving running servers from Python: wait until one answers, play the arena page.

:func:`wait_until_up` polls a URL until HTTP 200 (or the server process exits);
:func:`call_page` runs one event of the arena page through Gradio's HTTP API -- the same
``ask`` / ``vote_a`` / ``vote_b`` / ``vote_tie`` / ``vote_both_bad`` calls the browser makes
-- for scripted participants (the CPU demo's automatic votes, load tests).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx


def wait_until_up(url: str, proc: subprocess.Popen | None = None, log: Path | None = None,
                  timeout: float = 120, what: str = "server") -> None:
    """Return once ``GET url`` answers 200; RuntimeError (with ``log``'s text) if ``proc``
    exits first or ``timeout`` seconds pass."""
    def tail() -> str:
        return f":\n{log.read_text()}" if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}{tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not up at {url} after {timeout:.0f} s{tail()}")


def call_page(http: httpx.Client, url: str, api: str, data: list, session: str) -> list:
    """The outputs of the page's event ``api`` on ``data`` for the Gradio session ``session``
    (``url``: the page, ending in ``/``); RuntimeError if the event fails."""
    r = http.post(f"{url}gradio_api/call/{api}", json={"data": data, "session_hash": session})
    r.raise_for_status()
    event = None
    with http.stream("GET", f"{url}gradio_api/call/{api}/{r.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "complete":
                return json.loads(line[5:])
            elif line.startswith("data:") and event == "error":
                raise RuntimeError(f"{api}: {line}")
    raise RuntimeError(f"{api}: stream ended without a result")
