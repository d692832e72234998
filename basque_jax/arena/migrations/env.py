"""Alembic environment: migrates the connection handed over by ``basque_jax.arena.migrate``."""

from alembic import context

from basque_jax.arena.migrate import VERSION_TABLE
from basque_jax.arena.schema import METADATA

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run these migrations through basque_jax.arena.migrate.upgrade(engine)")
context.configure(connection=connection, target_metadata=METADATA, version_table=VERSION_TABLE,
                  render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
