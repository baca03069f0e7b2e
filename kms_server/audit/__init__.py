"""The audit trail: one hash-chained record for every request item and
every refusal, written in the same transaction as the change it describes,
with Ed25519-signed checkpoints (docs/audit-trail.md)."""
