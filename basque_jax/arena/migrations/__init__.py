"""Alembic migrations of the vote database (run programmatically by ``basque_jax.arena.migrate``).

To add a revision: write ``versions/NNNN_what.py`` (``revision = "NNNN"``, ``down_revision`` the
previous one; ``script.py.mako`` is the template), update ``basque_jax/arena/schema.py`` to match
and run ``tests/test_arena_store.py``, which checks that both describe the same schema.
"""
