"""The broker's audit trail on the KMS's chain format (broker/audit_trail.py,
docs/audit-trail.md): broker_audit gets `body`, the canonical JSON each new
record's hash covers (with the broker's domain tag), and
broker_audit_checkpoints holds the Ed25519-signed checkpoints.

The records already there are carried over verifiably: they are checked by
the rule they were written with, and one new record (action
"audit.carry-over") commits to their count and last hash, and to any
problem that check found, so `vtpm-broker admin audit verify` checks them
under the old rule up to there and everything after under the new one.

A database adopted from before migrations (create_all of a newer broker.db)
may already have the column and the table; they are then left as they are.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from broker.audit_trail import carry_over

    conn = op.get_bind()
    inspector = sa.inspect(conn)
    if "body" not in {column["name"] for column in inspector.get_columns("broker_audit")}:
        op.add_column("broker_audit", sa.Column("body", sa.Text, nullable=True))
    if not inspector.has_table("broker_audit_checkpoints"):
        op.create_table(
            "broker_audit_checkpoints",
            sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("time", sa.Float, nullable=False),
            sa.Column("node", sa.Text, nullable=False),
            sa.Column("head_hash", sa.Text, nullable=False),
            sa.Column("key_id", sa.Text, nullable=False),
            sa.Column("signature", sa.Text, nullable=False),
        )
    carry_over(conn)


def downgrade() -> None:
    # Records in the new format cannot be rewritten in the old one without
    # forging them: going back would leave a trail that no longer verifies.
    raise NotImplementedError("the broker's audit trail cannot go back to the format of revision 0001")
