"""votes: generation settings, pairing mode and per-answer timings of each round.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = [
    ("shown_at", sa.DateTime(timezone=True)),
    ("temperature", sa.Float()),
    ("top_p", sa.Float()),
    ("max_tokens", sa.Integer()),
    ("pairing", sa.String(16)),
    ("latency_a_ms", sa.Integer()),
    ("latency_b_ms", sa.Integer()),
    ("finish_a", sa.String(32)),
    ("finish_b", sa.String(32)),
]


def upgrade() -> None:
    with op.batch_alter_table("votes") as batch:
        for name, type_ in COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("votes") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
