"""Per-request state, passed down to operations and never kept on a shared
object. One `RequestContext` is made per request message; it is frozen.
`BatchState` carries the ID Placeholder (KMIP 1.4, 6.12 / 2.0, 6.1.21)
from one batch item to the next within that one message."""

from __future__ import annotations

from dataclasses import dataclass, field

from kmip_core.policy import Principal


@dataclass
class BatchState:
    id_placeholder: str | None = None


@dataclass(frozen=True)
class RequestContext:
    principal: Principal
    version: tuple[int, int]
    request_id: str
    now: int
    peer: str = ""
    node: str = ""
    # The request header's Client Correlation Value (KMIP 1.4 and later),
    # for the audit trail: e.g. the broker's own request id and host.
    correlation: str | None = None
    # The Ticket Value of a Ticket Credential in the request header, if any
    # (the vTPM broker's attestation token; never logged or audited).
    ticket: bytes | None = field(default=None, repr=False)
    batch: BatchState = field(default_factory=BatchState, compare=False)
    # Set by Dispatcher.handle_holding_records: the audit records of reads
    # that the caller writes before the answer leaves, instead of the
    # dispatcher writing them (the dispatcher's own bookkeeping).
    held: list | None = field(default=None, compare=False, repr=False)

    @property
    def v2(self) -> bool:
        return self.version[0] >= 2

    def at_least(self, major: int, minor: int) -> bool:
        return self.version >= (major, minor)
