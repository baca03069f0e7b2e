"""Cold migration between trusted instances: a VM's owner releases it to a
named instance (or an administrator transfers it), and only that instance
may then register it (docs/broker-design.md, "Cold migration").

broker_vms gets `released_to`, `released_by` and `released_at`: NULL while
the VM is not being handed over. A database adopted from before migrations
(create_all of a newer broker.db) may already have the columns; they are
then left as they are.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("released_to", sa.Text),
    ("released_by", sa.Text),
    ("released_at", sa.Float),
)


def upgrade() -> None:
    existing = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("broker_vms")}
    for name, kind in _COLUMNS:
        if name not in existing:
            op.add_column("broker_vms", sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("broker_vms") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
