"""A round without the web page: answers streamed through the official openai client from the
OpenAI-compatible test double, votes recorded once, pairs drawn uniformly or adaptively."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter
from datetime import datetime, timezone

import pytest
from _openai_stub import answer_tokens, serve_in_thread
from scipy.stats import chisquare

from basque_jax.arena.config import ArenaModel, arena_config_from_dict
from basque_jax.arena.endpoints import (
    ChatEndpoint,
    Generation,
    chat_messages,
    stream_pair,
    system_prompt_for,
)
from basque_jax.arena.markup import answer_markdown
from basque_jax.arena.pairing import PairSampler, pair_weights
from basque_jax.arena.rounds import Arena, RoundError
from basque_jax.arena.store import VoteStore, database_url

MODELS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def stub_url():
    with serve_in_thread(MODELS, delay_s=0.03, n_tokens=12) as url:
        yield url


async def collect(a: ChatEndpoint, b: ChatEndpoint, prompt: str, gen: Generation):
    steps = []
    async for answer_a, answer_b in stream_pair(a, b, chat_messages("sys", prompt), gen):
        steps.append((answer_a.text, answer_b.text))
    return steps, answer_a, answer_b


def test_stream_pair_streams_both_answers(stub_url):
    a, b = ChatEndpoint(ArenaModel("A", stub_url, model="alpha"), 10), ChatEndpoint(
        ArenaModel("B", stub_url, model="beta"), 10)
    steps, answer_a, answer_b = asyncio.run(collect(a, b, "Kaixo!", Generation(64, 0.9, 0.95)))
    assert answer_a.text == "".join(answer_tokens("alpha", "Kaixo!", 12))
    assert answer_b.text == "".join(answer_tokens("beta", "Kaixo!", 12))
    assert answer_a.finish_reason == answer_b.finish_reason == "stop"
    assert answer_a.ok and 0 < answer_a.first_token_ms <= answer_a.latency_ms
    assert len(steps) >= 3  # streamed in several updates, each extending the last
    for (pa, pb), (na, nb) in itertools.pairwise(steps):
        assert na.startswith(pa) and nb.startswith(pb)
    assert steps[0] != steps[-1]


def test_max_tokens_and_failing_endpoint(stub_url):
    a = ChatEndpoint(ArenaModel("A", stub_url, model="alpha"), 10)
    broken = ChatEndpoint(ArenaModel("B", stub_url, model="stub-error"), 10)
    _, answer_a, answer_b = asyncio.run(collect(a, broken, "x", Generation(3, 0.0, 1.0)))
    assert answer_a.text == "".join(answer_tokens("alpha", "x", 12)[:3])
    assert answer_a.finish_reason == "length" and answer_a.ok
    assert answer_b.done and not answer_b.ok and "500" in answer_b.error
    refused = ChatEndpoint(ArenaModel("C", "http://127.0.0.1:9/v1"), 5)
    _, _, answer_c = asyncio.run(collect(a, refused, "x", Generation(3, 0.0, 1.0)))
    assert "APIConnectionError" in answer_c.error


def make_arena(url: str, tmp_path, **extra) -> Arena:
    config = arena_config_from_dict({
        "models": [{"name": m, "base_url": url} for m in MODELS], "max_tokens": 64,
        "system_prompt": "Gaur {date} da. {ez} ukitu", "seed": 5, "max_prompt_chars": 50,
        **extra})
    return Arena(config, VoteStore(database_url("votes.db", tmp_path)))


async def play(arena: Arena, prompt: str):
    rnd = arena.new_round(prompt, "session-1")
    async for _ in arena.stream(rnd):
        pass
    return rnd


def test_round_vote_is_recorded_once(stub_url, tmp_path):
    arena = make_arena(stub_url, tmp_path)
    with pytest.raises(RoundError) as info:
        arena.new_round("   ", "s")
    assert info.value.reason == "empty"
    with pytest.raises(RoundError) as info:
        arena.new_round("x" * 51, "s")
    assert info.value.reason == "too_long"
    rnd = arena.new_round("Zer da euskara?", "session-1")
    with pytest.raises(RoundError) as info:
        arena.vote(rnd, "a")  # no answers yet
    assert info.value.reason == "not_votable"

    rnd = asyncio.run(play(arena, "Zer da euskara?"))
    assert rnd.answer_a.text.startswith(f"<{rnd.model_a}>")  # each side's own model answered
    assert rnd.answer_b.text.startswith(f"<{rnd.model_b}>")
    receipt = arena.vote(rnd, "tie")
    assert receipt.new and arena.store.count() == 1
    again = arena.vote(rnd, "b")  # a retried (or changed) submit of the same round
    assert not again.new and again.vote.winner == "tie" and again.vote.id == rnd.vote_id
    assert arena.store.count() == 1
    stored = arena.store.get(rnd.vote_id)
    assert (stored.model_a, stored.model_b, stored.session_id) == (rnd.model_a, rnd.model_b,
                                                                  "session-1")
    assert stored.answer_a == rnd.answer_a.text and stored.prompt == "Zer da euskara?"
    assert stored.system_prompt.startswith("Gaur ") and "{ez} ukitu" in stored.system_prompt
    assert (stored.temperature, stored.top_p, stored.max_tokens, stored.pairing) == (
        0.9, 0.95, 64, "uniform")
    assert stored.latency_a_ms > 0 and stored.finish_b == "stop"
    assert stored.shown_at <= stored.created_at


def test_system_prompt_date():
    when = datetime(2025, 3, 3, tzinfo=timezone.utc)
    assert system_prompt_for("Today is {date}. {x}", when) == "Today is Monday March  3, 2025. {x}"


def test_uniform_pairing_is_uniform_over_pairs_and_sides():
    models = ["m1", "m2", "m3", "m4"]
    sampler = PairSampler(models, "uniform", seed=1)
    draws = [sampler.draw() for _ in range(6000)]
    pairs = Counter(frozenset(d) for d in draws)
    assert len(pairs) == 6 and all(a != b for a, b in draws)
    assert chisquare(list(pairs.values())).pvalue > 1e-3
    first = Counter(a for a, _ in draws)
    assert chisquare([first[m] for m in models]).pvalue > 1e-3


def test_adaptive_pairing_prefers_uncertain_and_unsampled_pairs():
    models = ["a", "b", "c", "d"]
    intervals = {"a": (1100.0, 1140.0), "b": (1090.0, 1130.0), "c": (900.0, 940.0)}  # d: none
    votes = {frozenset("ab"): 100, frozenset("ac"): 100, frozenset("bc"): 100}
    weights = pair_weights(models, intervals, votes)
    mean_width = 40.0
    assert weights[("a", "b")] == pytest.approx((1 + 30 / mean_width) / math.sqrt(101))
    assert weights[("a", "c")] == pytest.approx(1 / math.sqrt(101))  # disjoint: settled
    assert weights[("a", "d")] == pytest.approx(2.0)  # no interval, no votes: most wanted
    assert weights[("a", "d")] > weights[("a", "b")] > weights[("a", "c")] > 0
    sampler = PairSampler(models, "adaptive", seed=2)
    draws = Counter(frozenset(sampler.draw(intervals, votes)) for _ in range(6000))
    total = sum(weights.values())
    expected = [6000 * weights[p] / total for p in weights]
    assert chisquare([draws[frozenset(p)] for p in weights], expected).pvalue > 1e-3


def test_answers_show_html_as_text_but_keep_code():
    from markdown_it import MarkdownIt

    text = "Erabili <b> & </b>:\n\n```html\n<b>lodia</b>\n```\neta `<i>` ere. <script>x</script>"
    assert "<script>" in MarkdownIt().render(text)  # CommonMark passes raw HTML through
    shown = MarkdownIt().render(answer_markdown(text))
    assert "<b>" not in shown and "<script>" not in shown
    assert "&lt;b&gt; &amp; &lt;/b&gt;" in shown and "&lt;script&gt;" in shown
    assert '<code class="language-html">&lt;b&gt;lodia&lt;/b&gt;' in shown  # code unchanged
    assert "<code>&lt;i&gt;</code>" in shown
    assert answer_markdown("```py\n<open") == "```py\n<open"  # a block still streaming


def test_leaderboard_rows_and_background_refresh(tmp_path):
    import time

    from basque_jax.arena.leaderboard import Leaderboard
    from basque_jax.arena.votes import Vote

    store = VoteStore(database_url("votes.db", tmp_path))
    board = Leaderboard(store, ["alpha", "beta", "gamma", "delta"], bootstrap=20, refresh_s=0.2)
    assert board.standings.rows(board.models) == [["", m, "", "", 0] for m in board.models]
    results = ["a", "a", "b", "tie", "a", "b"]  # alpha vs beta: both bounded
    for i, w in enumerate(results):
        store.record(Vote(id=f"v{i}", session_id="s", model_a="alpha", model_b="beta",
                          winner=w, prompt="q", answer_a="A", answer_b="B"))
    store.record(Vote(id="g", session_id="s", model_a="gamma", model_b="alpha", winner="a",
                      prompt="q", answer_a="A", answer_b="B"))  # gamma: only wins
    board.start()
    try:
        deadline = time.monotonic() + 30
        while board.standings.votes != 7 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        board.stop()
    rows = board.standings.rows(board.models)
    assert [r[1] for r in rows] == ["alpha", "beta", "gamma", "delta"]
    assert rows[0][0] == 1 and rows[1][0] == 2 and rows[0][2] > rows[1][2]
    assert rows[2] == ["", "gamma", "", "", 1]  # won every vote: no finite rating yet
    assert rows[3] == ["", "delta", "", "", 0]
    assert board.standings.pair_votes[frozenset(("alpha", "beta"))] == 6
    assert set(board.standings.intervals) >= {"alpha", "beta"}
