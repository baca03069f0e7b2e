"""The audit trail: hash-chained records and signed checkpoints
(docs/audit-trail.md).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kms_audit",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
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
    op.create_index("ix_kms_audit_uid", "kms_audit", ["uid"])
    op.create_index("ix_kms_audit_time", "kms_audit", ["time"])
    op.create_index("ix_kms_audit_x_name", "kms_audit", ["x_name"])
    op.create_index("ix_kms_audit_x_identifier", "kms_audit", ["x_identifier"])
    op.create_table(
        "kms_audit_checkpoints",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("node", sa.Text, nullable=False),
        sa.Column("head_hash", sa.Text, nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("kms_audit_checkpoints")
    op.drop_table("kms_audit")
