"""The trust registry's parts, one module per concern; `broker.trust.Registry`
puts them together and is what callers use (docs/broker-design.md).

    model       errors, values and the checks of names and UUIDs
    audit       the state every part shares and the hash-chained audit trail
    enrollment  tokens, enrollment, instances, users, identification
    hosts       hosts of an instance
    vms         VMs: create, register, place, release, remove
    rekey       the state of a VM's key rotation
    nvram       .nvram generations (rollback protection)
    policy      the unwrap policy

Each part is a class on `audit.AuditTrail` (the database, the clock, the
trust CA, the audit lock); what one part needs of another is a function
taking the open connection (`enrollment.require_trusted`,
`hosts.own_host`, `nvram.check_no_history`, `vms.vm_in`)."""
