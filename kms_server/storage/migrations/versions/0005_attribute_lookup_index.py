"""Locate checks its further conditions on each candidate object: an index
on (uid, name, value_digest) of kms_attributes makes that check a lookup
(storage/sql.py, locate_statement). It replaces the index on uid alone,
which is its prefix (an object's rows, cascaded deletes).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_kms_attributes_uid_name_value_digest", "kms_attributes", ["uid", "name", "value_digest"]
    )
    op.drop_index("ix_kms_attributes_uid", "kms_attributes")


def downgrade() -> None:
    op.create_index("ix_kms_attributes_uid", "kms_attributes", ["uid"])
    op.drop_index("ix_kms_attributes_uid_name_value_digest", "kms_attributes")
