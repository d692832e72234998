"""votes: the pair, the prompt, both answers, the winner, the participant and the time.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "votes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("model_a", sa.String(200), nullable=False),
        sa.Column("model_b", sa.String(200), nullable=False),
        sa.Column("winner", sa.String(8), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("answer_a", sa.Text, nullable=False),
        sa.Column("answer_b", sa.Text, nullable=False),
        sa.Column("system_prompt", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("winner IN ('a', 'b', 'tie', 'both_bad')", name="ck_votes_winner"),
    )
    op.create_index("ix_votes_session_id", "votes", ["session_id"])
    op.create_index("ix_votes_created_at", "votes", ["created_at"])


def downgrade() -> None:
    op.drop_table("votes")
