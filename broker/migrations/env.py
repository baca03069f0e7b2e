"""Alembic environment of the broker: migrations run on a connection the
caller passes (broker.schema through kmip_core.db.migrations), never from
a URL in a file. The broker keeps its revision in its own version table,
broker_alembic_version, apart from the KMS's alembic_version."""

from alembic import context

from broker.db import metadata

attributes = context.config.attributes
context.configure(
    connection=attributes["connection"],
    target_metadata=metadata,
    version_table=attributes.get("version_table", "broker_alembic_version"),
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
