"""The vote table as the newest migration leaves it (``migrations/versions``).

Queries use this table; the schema itself is created and upgraded only by the migrations, and
``tests/test_arena_store.py`` checks with alembic's autogenerate comparison that the two agree.
"""

from __future__ import annotations

import sqlalchemy as sa

from basque_jax.arena.votes import WINNERS

METADATA = sa.MetaData()
WINNER_CHECK = "winner IN (" + ", ".join(f"'{w}'" for w in WINNERS) + ")"

votes = sa.Table(
    "votes",
    METADATA,
    # revision 0001: what every arena vote records
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("session_id", sa.String(64), nullable=False, index=True),
    sa.Column("model_a", sa.String(200), nullable=False),
    sa.Column("model_b", sa.String(200), nullable=False),
    sa.Column("winner", sa.String(8), nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("answer_a", sa.Text, nullable=False),
    sa.Column("answer_b", sa.Text, nullable=False),
    sa.Column("system_prompt", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    # revision 0002: generation settings, pairing and timings of the round
    sa.Column("shown_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("temperature", sa.Float, nullable=True),
    sa.Column("top_p", sa.Float, nullable=True),
    sa.Column("max_tokens", sa.Integer, nullable=True),
    sa.Column("pairing", sa.String(16), nullable=True),
    sa.Column("latency_a_ms", sa.Integer, nullable=True),
    sa.Column("latency_b_ms", sa.Integer, nullable=True),
    sa.Column("finish_a", sa.String(32), nullable=True),
    sa.Column("finish_b", sa.String(32), nullable=True),
    sa.CheckConstraint(WINNER_CHECK, name="ck_votes_winner"),
)
