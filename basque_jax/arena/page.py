"""The arena page (Gradio): a prompt, two anonymous answers streamed side by side, four vote
buttons, the names revealed after the vote, and a leaderboard tab that refreshes itself.

Participants are anonymous: a random session id kept in the browser's local storage
(``gr.BrowserState``; anything but 1-64 letters, digits, ``_`` or ``-`` is replaced by a new
one) ties their votes together. The round (which models answer, the vote id)
stays in server-side session state. API names (for ``gradio_client`` and load tests):
``/ask`` (prompt, session id) and ``/vote_a``, ``/vote_b``, ``/vote_tie``, ``/vote_both_bad``
(session id); every vote reply names its vote id once it is committed.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import gradio as gr

from basque_jax.arena.markup import answer_markdown
from basque_jax.arena.rounds import Arena, Round, RoundError

TEXT = {
    "eu": {
        "intro": "Idatzi mezu bat euskaraz. Bi eredu anonimok erantzungo dute; bozkatu "
                 "erantzun hobea. Ereduen izenak botoa eman ondoren ikusiko dituzu.",
        "prompt": "Zure mezua", "send": "Bidali", "model": "{side} eredua",
        "a": "👈 A hobea", "tie": "🤝 Berdinketa", "both_bad": "👎 Biak txarrak",
        "b": "👉 B hobea", "arena": "Arena", "board": "Sailkapena",
        "columns": ["#", "Eredua", "Puntuazioa", "95% tartea", "Botoak"],
        "reveal": "A: **{a}** · B: **{b}** · zure botoa: {choice}. Eskerrik asko! "
                  "(botoa {id})",
        "again": "Boto hau lehendik jasota zegoen.",
        "failed": "{sides} ereduak ez du erantzun; saiatu beste mezu batekin.",
        "first": "Bidali mezu bat eta itxaron bi erantzunak.",
        "empty": "Idatzi mezu bat lehenik.", "long": "Mezua luzeegia da.",
        "summary": "Botoak: {votes} · Bradley-Terry (Elo eskala), bootstrap tartea "
                   "{rounds} laginekin",
    },
    "en": {
        "intro": "Write a prompt. Two anonymous models answer it side by side; vote for the "
                 "better answer. You will see their names after your vote.",
        "prompt": "Your prompt", "send": "Send", "model": "Model {side}",
        "a": "👈 A is better", "tie": "🤝 Tie", "both_bad": "👎 Both are bad",
        "b": "👉 B is better", "arena": "Arena", "board": "Leaderboard",
        "columns": ["#", "Model", "Rating", "95% interval", "Votes"],
        "reveal": "A was **{a}**, B was **{b}** · your vote: {choice}. Thank you! "
                  "(vote {id})",
        "again": "This vote had already been recorded.",
        "failed": "Model {sides} did not answer; please try another prompt.",
        "first": "Send a prompt and wait for both answers first.",
        "empty": "Write a prompt first.", "long": "The prompt is too long.",
        "summary": "Votes: {votes} · Bradley-Terry (Elo scale), bootstrap interval from "
                   "{rounds} resamples",
    },
}
CHOICES = ("a", "tie", "both_bad", "b")  # button order on the page
_SESSION = re.compile(r"[A-Za-z0-9_-]{1,64}")


def build_page(arena: Arena) -> gr.Blocks:
    """The Gradio app of ``arena`` (not launched; ``server.build_app`` mounts it)."""
    config = arena.config
    text = TEXT[config.language]

    def board() -> tuple[Any, str]:
        standings = arena.leaderboard.standings
        summary = text["summary"].format(votes=standings.votes, rounds=config.
                                         leaderboard_bootstrap)
        return gr.update(value=standings.rows(arena.models)), summary

    def buttons(enabled: bool) -> list[Any]:
        return [gr.update(interactive=enabled) for _ in CHOICES]

    async def ask(prompt: str, session_id: str | None, rnd: Round | None):
        if not isinstance(session_id, str) or not _SESSION.fullmatch(session_id):
            session_id = uuid.uuid4().hex  # a new participant (or a malformed id)
        try:
            rnd = arena.new_round(prompt, session_id)
        except RoundError as e:
            gr.Warning(text["empty"] if e.reason == "empty" else text["long"])
            yield tuple(gr.skip() for _ in range(len(CHOICES) + 6))  # the round stays
            return
        yield ("", "", "", *buttons(False), gr.update(interactive=False), rnd, session_id)
        unchanged = [gr.skip()] * (len(CHOICES) + 4)  # only the answers change meanwhile
        async for update in arena.stream(rnd):
            yield (answer_markdown(update.answer_a.text), answer_markdown(update.answer_b.text),
                   *unchanged)
        failed = rnd.failed_sides()
        notice = text["failed"].format(sides=" & ".join(failed)) if failed else ""
        yield (answer_markdown(rnd.answer_a.text), answer_markdown(rnd.answer_b.text), notice,
               *buttons(rnd.votable),
               gr.update(interactive=True), rnd, session_id)

    def make_vote(choice: str):
        def vote(session_id: str | None, rnd: Round | None):
            if rnd is None or not rnd.votable:
                gr.Warning(text["first"])
                return (gr.skip(), *buttons(False), rnd, *board())
            receipt = arena.vote(rnd, choice)  # committed before anything is shown
            stored = receipt.vote
            reveal = text["reveal"].format(a=stored.model_a, b=stored.model_b,
                                           choice=text[stored.winner], id=stored.id)
            if not receipt.new:
                reveal = f"{text['again']} {reveal}"
            return (reveal, *buttons(False), rnd, *board())

        vote.__name__ = f"vote_{choice}"
        return vote

    with gr.Blocks(title=config.title, analytics_enabled=False) as demo:
        session = gr.BrowserState(None, storage_key="basque-jax-arena-session")
        round_state = gr.State(None)
        gr.Markdown(f"# {config.title}\n{text['intro']}")
        with gr.Tab(text["arena"], id="arena"):
            prompt = gr.Textbox(label=text["prompt"], lines=3, elem_id="arena-prompt",
                                max_length=config.max_prompt_chars)
            send = gr.Button(text["send"], variant="primary", elem_id="arena-send")
            with gr.Row(equal_height=True):
                with gr.Column():
                    gr.Markdown(f"### {text['model'].format(side='A')}")
                    answer_a = gr.Markdown(elem_id="arena-answer-a", min_height=120)
                with gr.Column():
                    gr.Markdown(f"### {text['model'].format(side='B')}")
                    answer_b = gr.Markdown(elem_id="arena-answer-b", min_height=120)
            with gr.Row():
                vote_buttons = [gr.Button(text[c], interactive=False, elem_id=f"arena-vote-{c}")
                                for c in CHOICES]
            reveal = gr.Markdown(elem_id="arena-reveal")
        with gr.Tab(text["board"], id="board"):
            table = gr.Dataframe(headers=text["columns"], interactive=False,
                                 elem_id="arena-board")
            summary = gr.Markdown(elem_id="arena-board-summary")

        ask_io = dict(fn=ask, inputs=[prompt, session, round_state],
                      outputs=[answer_a, answer_b, reveal, *vote_buttons, send, round_state,
                               session], concurrency_limit=config.concurrency,
                      show_progress="minimal", show_progress_on=[answer_a, answer_b])
        send.click(**ask_io, api_name="ask")
        prompt.submit(**ask_io, api_name=False)
        for choice, button in zip(CHOICES, vote_buttons, strict=True):
            button.click(make_vote(choice), inputs=[session, round_state],
                         outputs=[reveal, *vote_buttons, round_state, table, summary],
                         api_name=f"vote_{choice}", concurrency_limit=config.concurrency,
                         show_progress="hidden")
        timer = gr.Timer(config.leaderboard_refresh_s)
        timer.tick(board, outputs=[table, summary], api_name=False, show_progress="hidden",
                   concurrency_limit=None)
        demo.load(board, outputs=[table, summary], api_name=False)
    return demo
