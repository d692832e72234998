"""Versioned schema of the vote database: alembic, driven from Python.

:func:`upgrade` brings any database (new, or written by an older basque-jax) to the newest
revision inside one transaction; on SQLite that transaction starts with ``BEGIN IMMEDIATE``, so
two servers starting on the same file migrate it once, one after the other. The revision is
kept in the table ``arena_alembic_version`` (not alembic's default), so the votes can share a
PostgreSQL database with other alembic-managed applications.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "arena_alembic_version"


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An alembic ``Config`` for the packaged migrations (no ``alembic.ini`` needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: sa.Engine) -> str | None:
    """The database's revision (None for a database the arena has never written)."""
    with engine.connect() as conn:
        return MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (default: the newest), atomically."""
    with engine.connect() as conn:
        conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            command.upgrade(alembic_config(conn), revision)
