"""Alembic environment: migrations run on a connection the caller passes
(kms_server.storage.schema), never from a URL in a file."""

from alembic import context

from kms_server.storage.sql import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
