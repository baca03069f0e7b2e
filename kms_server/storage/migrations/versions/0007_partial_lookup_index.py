"""Locate's lookup index holds only the attributes Locate is asked by
(issue 15; docs/storage-schema.md).

The index on kms_attributes (name, value_digest) had an entry for every
attribute row: 19 for an AES key, each in its own part of the index, most
of the pages a Create wrote (41.6 pages to the write-ahead log per Create
with it, 21.9 with this one: bench/wal_pages.py). It becomes
`ix_kms_attributes_lookup`, partial: every name but the attributes nearly
every object carries whose lookups match most of the store or are not
asked for (`kms_server.storage.sql.NOT_LOOKED_UP`). A Locate by one of
those alone reads every object's row and checks each.

The index's condition below is this migration's own copy: a later change of
the set is a migration of its own. A test checks that Locate's statements
state it as the index does (each database uses a partial index only for a
query that implies its condition).

Time: the new index is built from the table, then the old one dropped
(minutes at a million keys on PostgreSQL; writers wait meanwhile).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_NOT_LOOKED_UP = (
    "Activation Date",
    "Always Sensitive",
    "Archive Date",
    "Compromise Date",
    "Compromise Occurrence Date",
    "Cryptographic Usage Mask",
    "Deactivation Date",
    "Destroy Date",
    "Digest",
    "Extractable",
    "Fresh",
    "Initial Date",
    "Last Change Date",
    "Lease Time",
    "Never Extractable",
    "Original Creation Date",
    "Process Start Date",
    "Protect Stop Date",
    "Random Number Generator",
    "Sensitive",
    "Unique Identifier",
)
_WHERE = "name NOT IN ({})".format(", ".join(f"'{name}'" for name in _NOT_LOOKED_UP))


def upgrade() -> None:
    where = sa.text(_WHERE)
    op.create_index(
        "ix_kms_attributes_lookup",
        "kms_attributes",
        ["name", "value_digest"],
        sqlite_where=where,
        postgresql_where=where,
    )
    op.drop_index("ix_kms_attributes_name_value_digest", "kms_attributes")


def downgrade() -> None:
    op.create_index("ix_kms_attributes_name_value_digest", "kms_attributes", ["name", "value_digest"])
    op.drop_index("ix_kms_attributes_lookup", "kms_attributes")
