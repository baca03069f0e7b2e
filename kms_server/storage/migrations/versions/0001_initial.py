"""The initial schema: objects, attributes (indexed by name and value
digest), server-wide metadata. See docs/storage-schema.md.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kms_objects",
        sa.Column("sequence", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("uid", sa.Text, nullable=False, unique=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("sealed_material", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.Float),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "kms_attributes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("uid", sa.Text, sa.ForeignKey("kms_objects.uid", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("value_digest", sa.LargeBinary(32), nullable=False),
    )
    op.create_index("ix_kms_attributes_name_value_digest", "kms_attributes", ["name", "value_digest"])
    op.create_index("ix_kms_attributes_uid", "kms_attributes", ["uid"])
    op.create_table(
        "kms_meta",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("kms_meta")
    op.drop_index("ix_kms_attributes_uid", "kms_attributes")
    op.drop_index("ix_kms_attributes_name_value_digest", "kms_attributes")
    op.drop_table("kms_attributes")
    op.drop_table("kms_objects")
