"""``basque-jax arena serve`` as a real process against the OpenAI-compatible test double:
a headless Chromium plays a round on the page, then 50 simulated voters vote through Gradio's
HTTP API until the server is killed with SIGKILL; after a restart every acknowledged vote is
in the export exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from _openai_stub import free_port

from basque_jax.arena.client import call_page, wait_until_up

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MODELS = ["alpha", "beta", "gamma", "delta"]
TOKEN = "test-admin-token"
VOTE_ID = re.compile(r"\(vote ([0-9a-f-]{36})\)")


class ArenaServer:
    """``python -m basque_jax.arena serve CONFIG`` in its own process."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.url = f"http://127.0.0.1:{port}/"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "basque_jax.arena", "serve", str(self.config), "--port",
                 str(self.port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_until_up(self.url + "healthz", self.proc, self.log)

    def kill_9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def export(self) -> list[dict]:
        r = httpx.get(self.url + "admin/export", params={"token": TOKEN}, timeout=60)
        r.raise_for_status()
        return [json.loads(line) for line in r.text.splitlines()]


@contextlib.contextmanager
def arena_page(tmp_path: Path, url: str):
    """Headless Chromium on the arena page at ``url``, once its prompt box is there."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.locator("#arena-prompt textarea").wait_for(timeout=60_000)
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def stub_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("stub") / "stub.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "_openai_stub.py"),
                                 str(port), "--models", ",".join(MODELS), "--delay", "0.05"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", proc, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(stub_url, tmp_path_factory):
    folder = tmp_path_factory.mktemp("arena")
    config = folder / "arena.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "title": "Test arena", "language": "en", "database": "votes.db",
        "models": [{"name": m, "base_url": stub_url} for m in MODELS],
        "admin_token": TOKEN, "leaderboard_refresh_s": 1.0, "leaderboard_bootstrap": 20,
        "max_tokens": 64}))
    arena = ArenaServer(config, free_port(), folder / "server.log")
    arena.start()
    try:
        yield arena
    finally:
        if arena.proc is not None and arena.proc.poll() is None:
            arena.proc.terminate()
            arena.proc.wait(timeout=30)


def test_page_in_a_real_browser(server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    prompt = "Kaixo! Zer moduz zaude?"
    with arena_page(tmp_path, server.url) as page:
        page.evaluate("""() => { window.seen = [];  // answer A's text at every change
            const a = document.querySelector('#arena-answer-a');
            new MutationObserver(() => window.seen.push(
                (a.querySelector('[data-testid=markdown]') || a).innerText.trim()))
                .observe(a, {subtree: true, childList: true, characterData: true}); }""")
        page.locator("#arena-prompt textarea").fill(prompt)
        page.locator("#arena-send").click()
        page.wait_for_function("() => !document.querySelector('#arena-vote-a').disabled",
                               timeout=60_000)
        answer_a = page.inner_text("#arena-answer-a [data-testid=markdown]").strip()
        answer_b = page.inner_text("#arena-answer-b [data-testid=markdown]").strip()
        name_a = re.match(r"<(\w+)>", answer_a).group(1)  # markup shown as text
        name_b = re.match(r"<(\w+)>", answer_b).group(1)
        assert name_a != name_b and {name_a, name_b} <= set(MODELS)
        partial = {t for t in page.evaluate("window.seen") if t and t != answer_a}
        assert partial and all(answer_a.startswith(t) for t in partial), partial  # streamed
        assert name_a not in page.inner_text("#arena-reveal")  # still anonymous

        page.locator("#arena-vote-a").click()
        page.wait_for_function(
            "() => document.querySelector('#arena-reveal').innerText.includes('(vote ')",
            timeout=60_000)
        reveal = page.inner_text("#arena-reveal")
        assert f"A was {name_a}, B was {name_b}" in reveal
        assert page.locator("#arena-vote-a").is_disabled()

        page.get_by_role("tab", name="Leaderboard").click()
        page.wait_for_function(  # the page refreshes its leaderboard by itself
            "() => document.querySelector('#arena-board-summary').innerText"
            ".startsWith('Votes: 1 ')", timeout=60_000)
        board = page.inner_text("#arena-board")
        assert all(m in board for m in MODELS)
        page.screenshot(path=str(tmp_path / "leaderboard.png"), full_page=True)

    rows = server.export()
    assert len(rows) == 1 and rows[0]["id"] == VOTE_ID.search(reveal).group(1)
    assert (rows[0]["model_a"], rows[0]["model_b"], rows[0]["winner"]) == (name_a, name_b, "a")
    assert rows[0]["prompt"] == prompt and rows[0]["answer_a"] == answer_a
    assert httpx.get(server.url + "admin/export", params={"token": "wrong"}).status_code == 403
    assert httpx.get(server.url + "admin/export").status_code == 403
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "jaxlib" not in maps and "libtorch" not in maps  # the arena stays light


class Voter(threading.Thread):
    """One simulated participant: prompt, wait for both answers, vote; sometimes resubmit
    the same vote (a retry). Stops at the first failure (the server was killed)."""

    def __init__(self, index: int, http: httpx.Client, url: str,
                 killed: threading.Event) -> None:
        super().__init__(daemon=True)
        self.index, self.http, self.url, self.killed = index, http, url, killed
        self.session = f"voter-{index}"
        self.acked: dict[str, str] = {}  # vote id -> winner, as acknowledged
        self.retries = self.unvotable = 0
        self.error: BaseException | None = None
        self.rng = random.Random(index)

    def call(self, api: str, data: list) -> list:
        return call_page(self.http, self.url, api, data, self.session)

    def run(self) -> None:
        rounds = 0
        try:
            while not self.killed.is_set():
                rounds += 1
                out = self.call("ask", [f"Galdera {self.index}.{rounds}", self.session])
                if out[3] != {"interactive": True, "__type__": "update"}:
                    self.unvotable += 1  # an answer failed: the page offers no vote
                    continue
                winner = self.rng.choice(["a", "b", "tie", "both_bad"])
                reveal = self.call(f"vote_{winner}", [self.session])[0]
                vote_id = VOTE_ID.search(reveal).group(1)
                self.acked[vote_id] = winner
                if self.index % 5 == 0:  # the same submit again: acknowledged, stored once
                    again = self.call(f"vote_{winner}", [self.session])[0]
                    assert again.startswith("This vote had already been recorded.")
                    assert VOTE_ID.search(again).group(1) == vote_id
                    self.retries += 1
        except (httpx.HTTPError, RuntimeError) as e:  # expected once the server is killed
            if not self.killed.is_set():
                self.error = e
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            self.error = e


def test_50_voters_then_kill_9_then_restart(server):
    before = {row["id"] for row in server.export()}
    http = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=200))
    killed = threading.Event()
    voters = [Voter(i, http, server.url, killed) for i in range(50)]
    start = time.monotonic()
    for voter in voters:
        voter.start()
    time.sleep(10.0)  # then on a loaded machine, wait (bounded) for a first batch of votes
    while (sum(len(v.acked) for v in voters) < 10 or not any(v.retries for v in voters)) \
            and time.monotonic() - start < 90:
        time.sleep(0.2)
    killed.set()
    server.kill_9()  # while rounds and votes are in flight
    voting_s = time.monotonic() - start
    for voter in voters:
        voter.join(timeout=60)
    assert not any(v.is_alive() for v in voters)
    errors = [repr(v.error) for v in voters if v.error is not None]
    assert not errors, errors[:3]
    acked = {vid: w for v in voters for vid, w in v.acked.items()}
    assert len(acked) >= 10, f"only {len(acked)} votes acknowledged"
    assert sum(v.retries for v in voters) >= 1

    server.start()  # same database, after SIGKILL
    rows = [r for r in server.export() if r["id"] not in before]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))  # nothing stored twice (retries included)
    stored = {r["id"]: r["winner"] for r in rows}
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged votes lost"
    assert all(stored[vid] == w for vid, w in acked.items())
    assert len(rows) <= len(acked) + len(voters)  # at most one unacknowledged vote each
    assert {r["session_id"] for r in rows} <= {v.session for v in voters}
    print(f"\n{len(acked)} votes acknowledged by 50 voters in {voting_s:.1f} s, "
          f"{sum(v.retries for v in voters)} retries, "
          f"{len(rows) - len(acked)} committed but unacknowledged at the kill")
