"""`vtpm-mgmt`: the management client, playing vCenter.

It talks to the broker only over the broker's HTTPS management API, as a
real management instance would: its own state directory holds its identity
(key, CSR, certificate, the broker's CA) and an inventory; the datastore's
`.vmx` files hold everything else (docs/broker-design.md).

- `client`: the HTTPS + JSON client (standard library, mutual TLS).
- `state`: the state directory.
- `check`: `vm check`, the datastore audit that needs no broker.
- `cli`: the `vtpm-mgmt` command.
"""
