"""Authenticated object rows: a MAC over each object row and its attributes
(keystore/row_auth.py, docs/at-rest-sealing.md). Existing rows get theirs
at the first start of a node that holds the master key.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("kms_objects", sa.Column("row_mac", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("kms_objects") as batch:
        batch.drop_column("row_mac")
