"""One request id for one piece of broker work, in both audit trails.

The API and the gateway run each request inside `request_scope(request_id,
on_behalf_of)`. While it lasts:

- every record the broker appends to its own trail carries `request_id`
  (an optional field of the record body, docs/audit-trail.md);
- every KMIP request the broker sends to the KMS carries, as its Client
  Correlation Value (KMIP 1.4, 6.20; 2.0, 7.17), the text
  ``broker-req=<request id>;<kind>=<name>``, where kind is ``host``,
  ``instance`` or ``user`` (whom the broker acts for). The KMS records it
  with its own record, so `kms-admin audit show --request-id ID` and
  `vtpm-broker admin audit --request-id ID` find the two halves of one
  story.

Names the broker accepts (hosts, instances, users) hold no ';' or '=', so
the value splits back into its parts. Scopes are per thread (contextvars):
the API's and the gateway's worker threads each carry their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from collections.abc import Iterator

from kmip_core.client import correlation

__all__ = [
    "correlation_value",
    "current_request_id",
    "new_request_id",
    "record_made",
    "refusal_recorded",
    "request_scope",
]

PREFIX = "broker-req"
_KINDS = ("host", "instance", "user")
_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("broker_request_id", default=None)
# Refusals recorded in the current scope (a one-element list: the scope's own).
_REFUSALS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("broker_refusals", default=None)


def new_request_id() -> str:
    """16 hex digits, as the KMS's own request ids."""
    return uuid.uuid4().hex[:16]


def correlation_value(request_id: str, on_behalf_of: str | None = None) -> str:
    """``broker-req=<id>`` and, for an actor such as ``host:esx-01``,
    ``;host=esx-01``."""
    value = f"{PREFIX}={request_id}"
    if on_behalf_of:
        kind, _, name = on_behalf_of.partition(":")
        if kind in _KINDS and name and ";" not in name and "=" not in name:
            value += f";{kind}={name}"
    return value


def current_request_id() -> str | None:
    """The id of the request this thread works for (None: outside one, e.g. a CLI command)."""
    return _REQUEST_ID.get()


@contextlib.contextmanager
def request_scope(request_id: str, on_behalf_of: str | None = None) -> Iterator[str]:
    """Run the block as request `request_id` for `on_behalf_of` (an audit
    actor such as ``host:esx-01``); yields the request id."""
    token = _REQUEST_ID.set(request_id)
    counted = _REFUSALS.set(_REFUSALS.get() or [0])
    try:
        with correlation(correlation_value(request_id, on_behalf_of)):
            yield request_id
    finally:
        _REFUSALS.reset(counted)
        _REQUEST_ID.reset(token)


def record_made(allowed: bool) -> str | None:
    """Called for each audit record the broker writes: notes a refusal in
    the current scope and returns the request id the record carries."""
    refusals = _REFUSALS.get()
    if refusals is not None and not allowed:
        refusals[0] += 1
    return _REQUEST_ID.get()


def refusal_recorded() -> bool:
    """Whether a refusal was recorded in the current request already (the
    API then records none of its own for the same refusal)."""
    refusals = _REFUSALS.get()
    return bool(refusals and refusals[0])
