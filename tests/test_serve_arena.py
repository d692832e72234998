"""The real SmolLM2-135M-Instruct behind ``basque-jax serve`` (its own ChatML template):
answers equal transformers' greedy ``generate`` on ``apply_chat_template``'s prompt, ending on
its end of turn; then the arena, configured with two models of that real server, played in
headless Chromium: a prompt, two streamed answers, a vote, the names revealed, the
leaderboard updated, and each stored answer the one its model gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _openai_stub import free_port
from _serve_utils import hf_chat_reference, openai_client, served, tiny_chat_model
from conftest import REAL_MODEL_WORKER
from test_arena_server import CHROMIUM, TOKEN, ArenaServer, arena_page

pytestmark = [pytest.mark.slow, REAL_MODEL_WORKER]
SYSTEM = "Euskaraz erantzun, labur."
PROMPT = "Zer da euskara?"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
MAX_TOKENS = 32
REVEAL = re.compile(r"A was (\S+), B was (\S+) ")


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_real")
    tiny = tiny_chat_model(root / "tiny", seed=1)
    with served([str(smollm2), str(tiny), "--name", "smollm2", "--name", "tiny",
                 "--batch-size", "2", "--max-len", "256", "--chunk-steps", "4"],
                root / "serve.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=300)


def answer(client, model: str) -> str:
    r = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                       max_tokens=MAX_TOKENS)
    return r.choices[0].message.content


def test_smollm2_answers_like_transformers(smollm2, client):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    prompt, text, reason = hf_chat_reference(hf, tok, MESSAGES, MAX_TOKENS,
                                             [tok.convert_tokens_to_ids("<|im_end|>")])
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0,
                                       max_tokens=MAX_TOKENS)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, reason)
    assert r.usage.prompt_tokens == len(prompt)
    streamed = client.chat.completions.create(model="smollm2", messages=MESSAGES,
                                              temperature=0, max_tokens=MAX_TOKENS, stream=True)
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == text
    assert chunks[-1].finish_reason == reason


def test_arena_on_two_served_models(server, client, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    expected = {m: answer(client, m) for m in ("smollm2", "tiny")}  # greedy: what each says
    config = tmp_path / "arena.yaml"
    config.write_text(json.dumps({
        "title": "Serve arena", "language": "en", "database": "votes.db",
        "models": [{"name": m, "base_url": server.base_url} for m in ("smollm2", "tiny")],
        "system_prompt": SYSTEM, "temperature": 0.0, "top_p": 1.0, "max_tokens": MAX_TOKENS,
        "admin_token": TOKEN, "leaderboard_refresh_s": 1.0, "leaderboard_bootstrap": 10}))
    arena = ArenaServer(config, free_port(), tmp_path / "arena.log")
    arena.start()
    try:
        with arena_page(tmp_path, arena.url) as page:
            page.evaluate("""() => { window.seen = {a: [], b: []};
                for (const side of ['a', 'b']) {
                  const el = document.querySelector('#arena-answer-' + side);
                  new MutationObserver(() => window.seen[side].push(
                    (el.querySelector('[data-testid=markdown]') || el).innerText.trim()))
                    .observe(el, {subtree: true, childList: true, characterData: true});
                } }""")
            page.locator("#arena-prompt textarea").fill(PROMPT)
            page.locator("#arena-send").click()
            page.wait_for_function(
                "() => !document.querySelector('#arena-vote-a').disabled", timeout=120_000)
            shown = {s: page.inner_text(f"#arena-answer-{s} [data-testid=markdown]").strip()
                     for s in "ab"}
            seen = page.evaluate("window.seen")
            page.locator("#arena-vote-b").click()
            page.wait_for_function("() => document.querySelector('#arena-reveal')"
                                   ".innerText.includes('(vote ')", timeout=60_000)
            name_a, name_b = REVEAL.search(page.inner_text("#arena-reveal")).groups()
            page.get_by_role("tab", name="Leaderboard").click()
            page.wait_for_function(
                "() => document.querySelector('#arena-board-summary').innerText"
                ".startsWith('Votes: 1 ')", timeout=60_000)
            board = page.inner_text("#arena-board")
        rows = arena.export()
    finally:
        arena.proc.terminate()
        arena.proc.wait(timeout=30)

    assert {name_a, name_b} == {"smollm2", "tiny"}
    assert all(shown.values()) and "smollm2" in board and "tiny" in board
    real_side = "a" if name_a == "smollm2" else "b"
    partial = {t for t in seen[real_side] if t and t != shown[real_side]}
    assert partial, seen[real_side]  # SmolLM2's answer arrived in pieces
    assert len(rows) == 1
    row = rows[0]
    assert (row["model_a"], row["model_b"], row["winner"]) == (name_a, name_b, "b")
    assert row["prompt"] == PROMPT
    assert (row["answer_a"], row["answer_b"]) == (expected[name_a], expected[name_b])
