"""Host attestation (docs/attestation.md): host TPMs, PCR policies, the
challenges' nonces and the attestation tokens. A database adopted from
before migrations (create_all) may already have the tables; they are then
left as they are.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "broker_host_tpms" in existing:
        return
    op.create_table(
        "broker_host_tpms",
        sa.Column("host", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("ek_fingerprint", sa.Text, nullable=False),
        sa.Column("ek_public_pem", sa.Text, nullable=False),
        sa.Column("ak_public", sa.LargeBinary, nullable=True),
        sa.Column("ak_name", sa.Text, nullable=True),
        sa.Column("pending_ak_public", sa.LargeBinary, nullable=True),
        sa.Column("pending_ak_name", sa.Text, nullable=True),
        sa.Column("pending_secret_sha256", sa.Text, nullable=True),
        sa.Column("pending_expires_at", sa.Float, nullable=True),
        sa.Column("pinned_by", sa.Text, nullable=False),
        sa.Column("pinned_at", sa.Float, nullable=False),
        sa.Column("enrolled_at", sa.Float, nullable=True),
        sa.Column("reset_count", sa.BigInteger, nullable=True),
        sa.Column("restart_count", sa.BigInteger, nullable=True),
        sa.Column("clock", sa.BigInteger, nullable=True),
        sa.Column("last_result", sa.Text, nullable=True),
        sa.Column("last_reason", sa.Text, nullable=True),
        sa.Column("last_quote_at", sa.Float, nullable=True),
        sa.Column("last_pcr_bank", sa.Text, nullable=True),
        sa.Column("last_pcrs", sa.Text, nullable=True),
        sa.Column("changed_at", sa.Float, nullable=False),
    )
    op.create_table(
        "broker_attest_policies",
        sa.Column("scope", sa.Text, primary_key=True),
        sa.Column("pcr_bank", sa.Text, nullable=False),
        sa.Column("pcrs", sa.Text, nullable=False),
        sa.Column("digest", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "broker_attest_nonces",
        sa.Column("nonce_sha256", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_table(
        "broker_attest_tokens",
        sa.Column("token_sha256", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("ak_name", sa.Text, nullable=False),
        sa.Column("reset_count", sa.BigInteger, nullable=False),
        sa.Column("restart_count", sa.BigInteger, nullable=False),
        sa.Column("policy_scope", sa.Text, nullable=False),
        sa.Column("policy_digest", sa.Text, nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_broker_attest_tokens_host", "broker_attest_tokens", ["host"])


def downgrade() -> None:
    op.drop_index("ix_broker_attest_tokens_host", table_name="broker_attest_tokens")
    for table in ("broker_attest_tokens", "broker_attest_nonces", "broker_attest_policies", "broker_host_tpms"):
        op.drop_table(table)
