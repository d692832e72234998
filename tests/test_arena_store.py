"""The vote store: concurrent writers (threads and processes) store every vote exactly once,
retried ids are not duplicated, a committed vote survives kill -9, old databases upgrade."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from basque_jax.arena import migrate
from basque_jax.arena.schema import METADATA
from basque_jax.arena.store import VoteStore, database_url, make_engine
from basque_jax.arena.votes import Vote
from basque_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def make_vote(vote_id: str, winner: str = "a", session: str = "s") -> Vote:
    return Vote(id=vote_id, session_id=session, model_a="alpha", model_b="beta", winner=winner,
                prompt=f"galdera {vote_id}", answer_a="A", answer_b="B", system_prompt="sys")


def ids_in(store: VoteStore) -> list[str]:
    return [row["id"] for row in store.iter_rows()]


def test_record_is_idempotent_and_round_trips(tmp_path):
    store = VoteStore(database_url("votes.db", tmp_path))
    vote = make_vote("v1", winner="both_bad")
    assert store.record(vote) is True
    assert store.record(vote) is False  # a retried submit
    assert store.record(make_vote("v1", winner="b")) is False  # first vote kept
    assert store.get("v1") == vote
    assert store.count() == 1 and store.outcomes() == [("alpha", "beta", "both_bad")]
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    with pytest.raises(ValueError, match="winner"):
        make_vote("v2", winner="c")


def test_threads_store_every_vote_once(tmp_path):
    store = VoteStore(database_url("votes.db", tmp_path))
    n_threads, per_thread = 12, 25
    results: dict[str, list[bool]] = {}
    lock = threading.Lock()

    def writer(t: int) -> None:
        for k in range(per_thread):
            vote_id = f"t{t}-{k}"
            outcomes = [store.record(make_vote(vote_id, session=f"s{t}")) for _ in range(2)]
            # a third thread retries a neighbour's vote (same id) concurrently
            outcomes.append(store.record(make_vote(f"t{(t + 1) % n_threads}-{k}")))
            with lock:
                results.setdefault(vote_id, []).extend(outcomes[:2])

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ids = ids_in(store)
    assert len(ids) == len(set(ids)) == n_threads * per_thread
    assert set(ids) == set(results)
    assert all(r == [True, False] or r == [False, False] for r in results.values())


WRITER = textwrap.dedent("""
    import sys
    from basque_jax.arena.store import VoteStore
    from basque_jax.arena.votes import Vote
    url, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = VoteStore(url)
    new = 0
    for i in range(first, first + count):
        new += store.record(Vote(id=f"p{i}", session_id="proc", model_a="alpha",
                                 model_b="beta", winner="tie", prompt="q", answer_a="A",
                                 answer_b="B"))
    print(new, flush=True)
""")


def test_processes_store_every_vote_once(tmp_path):
    url = database_url("votes.db", tmp_path)  # each process also runs the migrations
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(30 * k), "60"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True) for k in range(3)]
    new = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    store = VoteStore(url)
    ids = ids_in(store)
    assert len(ids) == len(set(ids)) == 120  # ids 0..119, ranges overlapping by 30
    assert sum(new) == 120
    assert migrate.current_revision(store.engine) == migrate.head_revision()


KILLED = textwrap.dedent("""
    import os, signal, sys
    from basque_jax.arena.store import VoteStore
    from basque_jax.arena.votes import Vote
    store = VoteStore(sys.argv[1])
    store.record(Vote(id="acked", session_id="s", model_a="alpha", model_b="beta",
                      winner="b", prompt="q", answer_a="A", answer_b="B"))
    print("acked", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_recorded_vote_survives_kill_9(tmp_path):
    url = database_url("votes.db", tmp_path)
    proc = subprocess.run([sys.executable, "-c", KILLED, url], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL and proc.stdout.strip() == "acked"
    assert (tmp_path / "votes.db-wal").exists()  # the vote is in the WAL, not checkpointed
    assert VoteStore(url).get("acked").winner == "b"


def test_old_database_is_upgraded(tmp_path):
    url = database_url("old.db", tmp_path)
    engine = make_engine(url)
    migrate.upgrade(engine, "0001")
    assert migrate.current_revision(engine) == "0001"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO votes (id, session_id, model_a, model_b, winner, prompt, answer_a, "
            "answer_b, system_prompt, created_at) VALUES ('old', 's', 'alpha', 'beta', 'a', "
            "'q', 'A', 'B', '', '2025-03-19 07:07:35.974527')")
        columns = {c["name"] for c in sa.inspect(conn).get_columns("votes")}
    assert "latency_a_ms" not in columns
    engine.dispose()
    old_rows = list(VoteStore(url, migrate=False).iter_rows())  # readable before upgrading
    assert [r["id"] for r in old_rows] == ["old"] and "pairing" not in old_rows[0]

    store = VoteStore(url)  # opening for writing upgrades
    assert migrate.current_revision(store.engine) == migrate.head_revision() == "0002"
    store.record(make_vote("new"))
    rows = {r["id"]: r for r in store.iter_rows()}
    assert rows["old"]["pairing"] is None and rows["old"]["created_at"].tzinfo is not None
    assert store.outcomes() == [("alpha", "beta", "a"), ("alpha", "beta", "a")]
    with store.engine.begin() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.exec_driver_sql("UPDATE votes SET winner = 'z' WHERE id = 'old'")  # CHECK kept


def test_migrations_and_schema_module_agree(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    store = VoteStore(database_url("votes.db", tmp_path))
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "include_name": lambda name, kind, _parent: name != migrate.VERSION_TABLE})
        assert compare_metadata(context, METADATA) == []


def test_read_only_open_of_a_foreign_database_is_a_user_error(tmp_path):
    path = tmp_path / "other.db"
    with sa.create_engine(f"sqlite:///{path}").begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x)")
    with pytest.raises(UserError, match="no votes table"):
        VoteStore(f"sqlite:///{path}", migrate=False).outcomes()
    assert os.path.getsize(path) > 0
