"""A leaner audit table: fewer pages written per record (issue 15).

Every read writes an audit record, and every index of kms_audit is one more
page of the write-ahead log for each batch of records, copied again into
the database file by the next checkpoint. Two of those pages held nothing
a query reads:

- On SQLite, `seq BIGINT PRIMARY KEY` is not the table's rowid, so SQLite
  kept a second B-tree of it (sqlite_autoindex_kms_audit_1). `seq INTEGER
  PRIMARY KEY` is the rowid itself: the table is ordered by seq, the head
  is its last row, and the extra index is gone. The table is rebuilt, its
  records copied in seq order, unchanged.
- The indexes on uid, x_name and x_identifier held an entry for every
  record, most of them NULL (a refused message has no uid; only vCenter's
  keys carry x- attributes). They become partial, `WHERE <column> IS NOT
  NULL`: the queries that use them (`= value`, `IN (...)`) imply it, on
  SQLite and on PostgreSQL alike.

On PostgreSQL only the indexes change (seq stays BIGINT, already the table's
primary key). Time on SQLite: the copy and the index builds, 7-9 s for a
million records (bench/audit_migration.py), with disk space for the copy
meanwhile.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_PARTIAL = ("uid", "x_name", "x_identifier")
_COLUMNS = "seq, time, node, operation, uid, client, result, x_component, x_name, x_identifier, body, hash"


def _create_table(name: str, seq_type: sa.types.TypeEngine) -> None:
    op.create_table(
        name,
        sa.Column("seq", seq_type, primary_key=True, autoincrement=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("node", sa.Text, nullable=False),
        sa.Column("operation", sa.Text, nullable=False),
        sa.Column("uid", sa.Text, nullable=True),
        sa.Column("client", sa.Text, nullable=False),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("x_component", sa.Text, nullable=True),
        sa.Column("x_name", sa.Text, nullable=True),
        sa.Column("x_identifier", sa.Text, nullable=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("hash", sa.Text, nullable=False),
    )


def _rebuild_sqlite_table(seq_type: sa.types.TypeEngine) -> None:
    """Copy kms_audit into a table whose seq column is `seq_type`, in seq
    order; the old table and its indexes are dropped."""
    _create_table("kms_audit_rebuilt", seq_type)
    op.execute(f"INSERT INTO kms_audit_rebuilt ({_COLUMNS}) SELECT {_COLUMNS} FROM kms_audit ORDER BY seq")
    op.drop_table("kms_audit")
    op.rename_table("kms_audit_rebuilt", "kms_audit")


def _indexes(partial: bool) -> None:
    for column in ("uid", "time", "x_name", "x_identifier"):
        where = sa.text(f"{column} IS NOT NULL") if partial and column in _PARTIAL else None
        op.create_index(
            f"ix_kms_audit_{column}", "kms_audit", [column], sqlite_where=where, postgresql_where=where
        )


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite_table(sa.Integer())  # drops the old indexes with the old table
        _indexes(partial=True)
        return
    for column in _PARTIAL:
        op.drop_index(f"ix_kms_audit_{column}", "kms_audit")
        where = sa.text(f"{column} IS NOT NULL")
        op.create_index(f"ix_kms_audit_{column}", "kms_audit", [column], postgresql_where=where)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite_table(sa.BigInteger())
        _indexes(partial=False)
        return
    for column in _PARTIAL:
        op.drop_index(f"ix_kms_audit_{column}", "kms_audit")
        op.create_index(f"ix_kms_audit_{column}", "kms_audit", [column])
