"""Key rotation: a VM's rekey in progress (docs/broker-design.md, "Key
rotation").

broker_vms gets `rekey_kind` ("shallow": the same DEK under a new KEK;
"deep": a new DEK under a new KEK), `rekey_state` ("pending": the new key
safe exists and its KEK may unwrap for the VM's host, the record still
names the old one; "retiring": the record names the new KEK, the old one
is still to be deactivated), `rekey_kms_key_id` and `rekey_key_safe` (the
new KEK and key safe while pending, the old ones while retiring) and
`rekey_at`. All NULL when no rotation is under way. A database adopted from
before migrations may already have the columns; they are then left as
they are.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("rekey_kind", sa.Text),
    ("rekey_state", sa.Text),
    ("rekey_kms_key_id", sa.Text),
    ("rekey_key_safe", sa.Text),
    ("rekey_at", sa.Float),
)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    existing = {column["name"] for column in inspector.get_columns("broker_vms")}
    for name, kind in _COLUMNS:
        if name not in existing:
            op.add_column("broker_vms", sa.Column(name, kind, nullable=True))
    indexes = {index["name"] for index in inspector.get_indexes("broker_vms")}
    if "ix_broker_vms_rekey_kms_key_id" not in indexes:
        op.create_index("ix_broker_vms_rekey_kms_key_id", "broker_vms", ["rekey_kms_key_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_broker_vms_rekey_kms_key_id", table_name="broker_vms")
    with op.batch_alter_table("broker_vms") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
