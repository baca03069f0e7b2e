"""What a KMIP service gives the dispatcher beneath it: the Backend
protocol (the KMS keystore and the broker gateway each implement it), the
audit Trail protocol, and the one exception that makes the dispatcher run an
item again."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

from kmip_core.audit.record import AuditDraft

__all__ = ["Backend", "BackendUnavailable", "Trail"]


class BackendUnavailable(Exception):
    """The backend's database could not be reached or the connection
    dropped. Nothing was committed, unless `commit_unknown` is set: then the
    connection was lost while committing and the change may or may not be
    stored. The dispatcher runs an item again only when nothing was."""

    def __init__(self, message: str, commit_unknown: bool = False):
        super().__init__(message)
        self.commit_unknown = commit_unknown


class Trail(Protocol):
    """Where the dispatcher records each item (fail closed): `write` stores
    a record on its own, `append` inside a batch's transaction, `publish`
    hands a committed record to the sinks. Raises AuditWriteFailed."""

    def write(self, entry: dict) -> Any: ...

    def append(self, txn: Any, entry: dict) -> Any: ...

    def publish(self, record: Any) -> None: ...


class Backend(Protocol):
    """The service beneath a Dispatcher (the KMS keystore, the broker gateway).

    - `for_item(trail, draft)`: what one item's handler is given, its writes
      recording `draft` with the change they make;
    - `batch_transaction()`: one transaction for every item of a batch run
      with Batch Error Continuation Option Undo;
    - `in_batch(txn, trail, draft)`: what a handler of such an item is
      given: every change it makes is in `txn`.
    Any of these may raise BackendUnavailable.
    """

    def for_item(self, trail: Trail | None, draft: AuditDraft) -> Any: ...

    def batch_transaction(self) -> AbstractContextManager[Any]: ...

    def in_batch(self, txn: Any, trail: Trail | None, draft: AuditDraft | None) -> Any: ...
