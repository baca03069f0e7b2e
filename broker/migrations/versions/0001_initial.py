"""The broker's initial schema: management instances, enrollment tokens and
enrollments, hosts, VMs, API users, CA rows (keys sealed), issued EK
certificates, .nvram generations, the hash-chained audit trail and metadata
(the master-key check value). See broker/db.py and docs/broker-design.md.

A broker database made before migrations existed (by `create_all`) holds
exactly these tables; broker.schema stamps it at this revision.

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
        "broker_instances",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("cert_fingerprint", sa.Text, nullable=True, unique=True),
        sa.Column("cert_pem", sa.Text, nullable=True),
        sa.Column("pinned", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("changed_at", sa.Float, nullable=False),
        sa.Column("last_used_at", sa.Float, nullable=True),
    )
    op.create_table(
        "broker_tokens",
        sa.Column("token_sha256", sa.Text, primary_key=True),
        sa.Column("instance", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float, nullable=True),
    )
    op.create_table(
        "broker_enrollments",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("instance", sa.Text, nullable=False),
        sa.Column("csr_pem", sa.Text, nullable=False),
        sa.Column("poll_secret_sha256", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("certificate_pem", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("decided_at", sa.Float, nullable=True),
    )
    op.create_index("ix_broker_enrollments_instance", "broker_enrollments", ["instance"])
    op.create_table(
        "broker_hosts",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("instance", sa.Text, nullable=False),
        sa.Column("cert_fingerprint", sa.Text, nullable=False, unique=True),
        sa.Column("cert_pem", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_broker_hosts_instance", "broker_hosts", ["instance"])
    op.create_table(
        "broker_vms",
        sa.Column("vm_uuid", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("instance", sa.Text, nullable=False),
        sa.Column("kms_key_id", sa.Text, nullable=False, unique=True),
        sa.Column("key_safe", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("changed_at", sa.Float, nullable=False),
    )
    op.create_index("ix_broker_vms_instance", "broker_vms", ["instance"])
    op.create_table(
        "broker_users",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("cert_fingerprint", sa.Text, nullable=False, unique=True),
        sa.Column("cert_pem", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "broker_cas",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("cert_pem", sa.Text, nullable=False),
        sa.Column("chain_pem", sa.Text, nullable=False),
        sa.Column("sealed_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_broker_cas_purpose", "broker_cas", ["purpose", "state"])
    op.create_table(
        "broker_ek_certificates",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("vm_uuid", sa.Text, nullable=False),
        sa.Column("cert_type", sa.Text, nullable=False),
        sa.Column("cert_der", sa.LargeBinary, nullable=False),
        sa.Column("ca_fingerprint", sa.Text, nullable=False),
        sa.Column("issued_to", sa.Text, nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_broker_ek_certificates_vm", "broker_ek_certificates", ["vm_uuid", "cert_type"])
    op.create_table(
        "broker_nvram_generations",
        sa.Column("vm_uuid", sa.Text, primary_key=True),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("reported_by", sa.Text, nullable=False),
        sa.Column("reported_at", sa.Float, nullable=False),
    )
    op.create_table(
        "broker_audit",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("allowed", sa.Boolean, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.Text, nullable=False),
        sa.Column("hash", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "broker_meta",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("broker_meta")
    op.drop_table("broker_audit")
    op.drop_table("broker_nvram_generations")
    op.drop_index("ix_broker_ek_certificates_vm", "broker_ek_certificates")
    op.drop_table("broker_ek_certificates")
    op.drop_index("ix_broker_cas_purpose", "broker_cas")
    op.drop_table("broker_cas")
    op.drop_table("broker_users")
    op.drop_index("ix_broker_vms_instance", "broker_vms")
    op.drop_table("broker_vms")
    op.drop_index("ix_broker_hosts_instance", "broker_hosts")
    op.drop_table("broker_hosts")
    op.drop_index("ix_broker_enrollments_instance", "broker_enrollments")
    op.drop_table("broker_enrollments")
    op.drop_table("broker_tokens")
    op.drop_table("broker_instances")
