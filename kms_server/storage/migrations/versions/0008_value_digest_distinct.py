"""PostgreSQL: attribute value digests are told mostly distinct, so that a
prepared Locate keeps its generic plan (issue 15; docs/storage-schema.md).

psycopg prepares a statement from its fifth run, and PostgreSQL then keeps
the generic plan only if it costs no more than the custom plans it made for
the first runs' values. ANALYZE samples kms_attributes and, since most rows
hold a shared value (State Active, the algorithm, the usage mask...),
estimates a few thousand distinct digests in millions of rows: the generic
plan of a Locate (`value_digest = $n`) then expects hundreds of rows per
lookup, the custom plan one, and PostgreSQL planned the Locate again at
every run (0.3-0.6 ms, more than the Locate itself at 100,000 keys). Told
that a fifth of the rows hold distinct digests (an AES key with a Name has
its Name, Digest, Unique Identifier and often an x-Identifier of its own
among its 18 rows), both plans expect one row and the generic one is kept.
The shared values stay in ANALYZE's most common values, which custom plans
still use. The table is analysed again so that it applies now.

SQLite has no such setting (nor generic plans): nothing to do there.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# A negative n_distinct is a fraction of the rows (PostgreSQL, ALTER TABLE).
DISTINCT_FRACTION = -0.2


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE kms_attributes ALTER COLUMN value_digest SET (n_distinct = {DISTINCT_FRACTION})")
    op.execute("ANALYZE kms_attributes")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE kms_attributes ALTER COLUMN value_digest RESET (n_distinct)")
    op.execute("ANALYZE kms_attributes")
