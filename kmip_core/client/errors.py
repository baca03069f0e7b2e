"""What a caller of `KmipClient` can catch.

Every failure is a `KmipError`. Its `reason` is the Result Reason the server
sent, or None when no server answered (a dropped connection, a timeout, no
node reachable). Messages name the operation and node, never a payload: no
key bytes, plaintext or ciphertext ever reach an exception or its repr.
"""

from __future__ import annotations

from kmip.core.enums import ResultReason


class KmipError(Exception):
    """A KMIP request failed. `reason` is the server's Result Reason (None
    when the failure is the client's or the network's), `message` the
    server's Result Message or the client's description, `node` the
    "host:port" that answered or failed."""

    def __init__(self, reason: ResultReason | None, message: str, node: str = ""):
        self.reason = reason
        self.message = message
        self.node = node
        super().__init__(self._text())

    def _text(self) -> str:
        where = f" from {self.node}" if self.node else ""
        if self.reason is None:
            return f"{self.message}{where}"
        return f"{self.reason.name}{where}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, message={self.message!r}, node={self.node!r})"


class OutcomeUnknown(KmipError):
    """A state-changing request reached a node and no answer came back (the
    connection dropped or timed out), or the node answered General Failure.
    The change may or may not have happened, so it was not sent again. The
    caller decides: look for the result (Locate by the unique Name or `x-`
    attribute it set) before repeating the request."""

    def __init__(self, operation: str, node: str, cause: str, reason: ResultReason | None = None):
        self.operation = operation
        self.cause = cause
        super().__init__(reason, f"outcome of {operation} unknown: {cause}", node)


class NoNodeAvailable(KmipError):
    """Every node was tried and none answered. `errors` lists each node with
    what went wrong there, in the order they were tried."""

    def __init__(self, operation: str, errors: list[tuple[str, str]]):
        self.operation = operation
        self.errors = list(errors)
        detail = "; ".join(f"{node}: {error}" for node, error in self.errors) or "no nodes configured"
        super().__init__(None, f"no KMIP node available for {operation} ({detail})", ", ".join(n for n, _ in errors))
