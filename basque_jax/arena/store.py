"""The vote store: any SQLAlchemy database, an SQLite file by default.

``VoteStore(url).record(vote)`` commits before it returns, so a vote the page has acknowledged
survives the server being killed; a vote whose ``id`` is already stored is not stored again
(``INSERT ... ON CONFLICT DO NOTHING`` on the primary key), so a retried submit counts once no
matter how many servers or threads write at the same time.

SQLite runs in WAL mode (readers never block the writer) with ``synchronous=FULL`` (a commit is
on disk, not only in the OS cache) and a busy timeout: concurrent writers queue instead of
failing. Writes start with ``BEGIN IMMEDIATE``; the sqlite3 driver's own transaction handling
is switched off so that SQLAlchemy's BEGIN/COMMIT are the ones that run.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from basque_jax.arena.migrate import upgrade as upgrade_schema
from basque_jax.arena.schema import votes
from basque_jax.arena.votes import Vote
from basque_jax.errors import UserError

BUSY_TIMEOUT_MS = 30_000


def database_url(spec: str, base_dir: str | Path | None = None) -> str:
    """A SQLAlchemy URL as given (``postgresql+psycopg://...``), or a path to an SQLite file
    (relative paths against ``base_dir``, e.g. the config file's folder) turned into one."""
    if "://" in spec:
        return spec
    path = Path(spec).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return f"sqlite:///{path.resolve()}"


def make_engine(url: str, *, wal: bool = True) -> sa.Engine:
    """An engine for ``url``; SQLite files get WAL, full sync, a busy timeout and real BEGINs."""
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as e:
        raise UserError(f"database {url!r}: {e}") from None
    except ImportError as e:  # the URL's driver (psycopg, pymysql...) is not installed
        raise UserError(f"database {url!r}: its driver is missing ({e}); install it "
                        "(e.g. pip install 'psycopg[binary]' for postgresql+psycopg://)") from None
    if engine.dialect.name != "sqlite":
        return engine

    @sa.event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN (below) and COMMIT
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if wal:
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', '')}")

    return engine


def _as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; the store only ever writes UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class VoteStore:
    """Votes in a database. ``migrate=True`` (serving) creates or upgrades the schema; read-only
    users (ratings, export) pass ``migrate=False`` and may read a database of any revision."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url, wal=migrate)
        if migrate:
            try:
                upgrade_schema(self.engine)
            except sa.exc.OperationalError as e:
                raise UserError(f"database {self.safe_url}: cannot open or migrate it "
                                f"({e.orig})") from None
        self._writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden (for messages and logs)."""
        return self.engine.url.render_as_string(hide_password=True)

    def record(self, vote: Vote) -> bool:
        """Store ``vote`` and commit; False (and nothing written) if its id is already stored."""
        row = vote.to_row()
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
            stmt = insert(votes).values(**row).on_conflict_do_nothing(index_elements=["id"])
            with self._writer.begin() as conn:
                return conn.execute(stmt).rowcount == 1
        try:
            with self._writer.begin() as conn:
                conn.execute(votes.insert().values(**row))
            return True
        except sa.exc.IntegrityError:
            if self.get(vote.id) is None:
                raise
            return False

    def get(self, vote_id: str) -> Vote | None:
        with self.engine.connect() as conn:
            row = conn.execute(votes.select().where(votes.c.id == vote_id)).mappings().first()
        if row is None:
            return None
        fields = dict(row)
        fields["created_at"] = _as_utc(fields["created_at"])
        fields["shown_at"] = _as_utc(fields["shown_at"])
        return Vote(**fields)

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(votes)).scalar_one()

    def outcomes(self) -> list[tuple[str, str, str]]:
        """``(model_a, model_b, winner)`` of every vote, oldest first (``created_at``, ``id``)."""
        query = (sa.select(votes.c.model_a, votes.c.model_b, votes.c.winner)
                 .order_by(votes.c.created_at, votes.c.id))
        with self.engine.connect() as conn:
            self._require_table(conn)
            return [tuple(r) for r in conn.execute(query)]

    def iter_rows(self, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every vote as a dict of all the columns the database has (any revision), oldest
        first; datetimes are timezone-aware UTC."""
        with self.engine.connect() as conn:
            self._require_table(conn)
            table = sa.Table("votes", sa.MetaData(), autoload_with=conn)
            query = table.select().order_by(table.c.created_at, table.c.id)
            result = conn.execution_options(yield_per=batch_size).execute(query).mappings()
            for row in result:
                yield {k: _as_utc(v) if isinstance(v, datetime) else v for k, v in row.items()}

    def _require_table(self, conn: sa.Connection) -> None:
        if not sa.inspect(conn).has_table("votes"):
            raise UserError(f"database {self.safe_url}: no votes table (not an arena database?)")

    def close(self) -> None:
        self.engine.dispose()

