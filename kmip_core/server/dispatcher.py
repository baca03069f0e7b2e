"""The KMIP server framework: request messages in, response messages out
(KMIP 1.4 section 7 and 2.0 section 8: message structure, batches, errors).

`Dispatcher.handle` is synchronous and runs on a worker thread: it decodes
one request message, authenticates its Credential if the configuration
asks for one, runs each batch item through the service's operation table,
maps every failure through `kmip_core.reasons`, and encodes the response in
the request's protocol version. Nothing here keeps per-request state on
`self`. `Dispatcher.handle_holding_records` does the same, except that the
audit record of a read asked alone in its message is left to the caller,
who must write it before the answer leaves (`HeldResponse`).

What lies beneath is the service's `Backend`: the KMS's keystore, the
broker gateway's context. The dispatcher asks it for what each item's
handler is given, for one transaction around a batch run with Undo, and
retries an item whose backend raised `BackendUnavailable` (a database
failover) before anything was committed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from kmip.core.enums import (
    BatchErrorContinuationOption,
    CredentialType,
    Operation,
    ResultReason,
    ResultStatus,
    Tags,
)

from kmip_core import errors, ttlv
from kmip_core.audit.record import AuditDraft, AuditWriteFailed, client_fields, request_attributes
from kmip_core.logs import log_context
from kmip_core.nonblocking import would_block
from kmip_core.policy import Principal
from kmip_core.reasons import GENERAL_FAILURE_MESSAGE, input_error, result_reason
from kmip_core.server.backend import Backend, BackendUnavailable, Trail
from kmip_core.server.context import BatchState, RequestContext
from kmip_core.ttlv import TAG, Item, ItemType

log = logging.getLogger("kms_server.dispatch")  # the name operators filter on; kept

SUPPORTED_VERSIONS: tuple[tuple[int, int], ...] = ((2, 1), (2, 0), (1, 4), (1, 3), (1, 2), (1, 1), (1, 0))


def retry_schedule(total_seconds: float, first: float = 0.25, cap: float = 4.0) -> tuple[float, ...]:
    """Waits before each new attempt of an item whose database connection
    was lost: doubling from `first`, at most `cap` each, `total_seconds` in
    all (a PostgreSQL failover takes seconds)."""
    delays, spent, delay = [], 0.0, first
    while spent < total_seconds:
        step = min(delay, cap, total_seconds - spent)
        delays.append(step)
        spent += step
        delay *= 2
    return tuple(delays)


STORAGE_RETRY_DELAYS = retry_schedule(15.0)

T = Tags


# An operation's handler: (the request, what the backend gives the item,
# the Request Payload) -> the Response Payload's items.
Handler = Callable[[RequestContext, Any, Item], list[Item]]


@dataclass(frozen=True)
class ConnectionInfo:
    principal: Principal
    peer: str


@dataclass(frozen=True)
class HeldResponse:
    """The answer to a read whose audit record is not written yet
    (`Dispatcher.handle_holding_records`). Send `response` only once
    `record` is durable. If it cannot be written, attempt the record
    `refusal_record()` makes (best effort, as the dispatcher does; made only
    then) and send `withheld(why)` instead:
    General Failure, the key material withheld. Call `settled(written)`
    once, either way: it counts the request in the metrics."""

    response: bytes = field(repr=False)
    record: dict
    refusal_record: Callable[[], dict] = field(repr=False)
    request_id: str
    withheld: Callable[[str], bytes] = field(repr=False)
    settled: Callable[[bool], None] = field(repr=False)


# The counts of request items the caller asked to hold (`holding_counts`):
# a list while a request runs inside it, None otherwise.
_HELD_COUNTS: ContextVar[list[tuple[int | None, str, float | None]] | None] = ContextVar(
    "held_counts", default=None
)


class HeldCounts:
    """The metrics counts of a request's items, withheld by
    `Dispatcher.holding_counts` until the caller knows what the client gets:
    its answer, or General Failure for each item if the change it made
    could not be made durable (kms_server: a write whose batch did not
    commit, or whose log could not be synced). Settled once; its latency
    then includes the wait for the commit."""

    __slots__ = ("_counts", "_dispatcher", "_token")

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._counts: list[tuple[int | None, str, float | None]] = []
        self._token: Token[list[tuple[int | None, str, float | None]] | None] | None = None

    # A class of its own rather than a generator: every request the reactor
    # runs enters one.
    def __enter__(self) -> HeldCounts:
        self._token = _HELD_COUNTS.set(self._counts)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None  # entered
        _HELD_COUNTS.reset(self._token)

    def settle(self, durable: bool) -> None:
        """Count the items: as answered if `durable`, else each as General
        Failure (what the client is sent instead)."""
        counts, self._counts = self._counts, []
        for operation_value, result, started in counts:
            self._dispatcher._count_now(
                operation_value, result if durable else ResultReason.GENERAL_FAILURE.name, started
            )


class Dispatcher:
    def __init__(
        self,
        backend: Backend,
        operations: dict[Operation, Handler],
        node: str = "",
        authenticate: Callable[[str, str, str], bool] | None = None,
        max_depth: int = ttlv.DEFAULT_MAX_DEPTH,
        retry_delays: tuple[float, ...] = STORAGE_RETRY_DELAYS,
        sleep: Callable[[float], None] = time.sleep,
        trail: Trail | None = None,
        metrics: Any = None,
    ):
        self.backend = backend
        # The audit trail (kms_server/audit); None only when an operator
        # turned auditing off ([audit] enabled = false).
        self.trail = trail
        self.operations = operations
        self.node = node
        # When set, every request must carry a username/password Credential
        # that this callable, given (username, password, certificate
        # identity), accepts.
        self.authenticate = authenticate
        self.max_depth = max_depth
        self.retry_delays = retry_delays
        self.sleep = sleep
        # kmip_core.metrics.RequestMetrics, or None: items by operation and
        # result, their latency, database retries.
        self.metrics = metrics

    # Entry points.
    def handle(self, data: bytes, conn: ConnectionInfo, decoded: Item | None = None) -> bytes | None:
        """The encoded response, or None when the bytes are not a TTLV
        message at all (the connection is then closed). `decoded`:
        `decode(data)`, if the caller has it already."""
        answer = self._handle_entry(data, conn, hold=False, decoded=decoded)
        assert not isinstance(answer, HeldResponse)  # only when asked to hold
        return answer

    def decode(self, data: bytes) -> Item | None:
        """The request message, decoded as `handle` would (None if it does
        not decode), for a caller that looks at it first and then passes
        it to `handle_holding_records` (kms_server: which requests run in
        the reactor thread)."""
        try:
            return ttlv.decode(data, self.max_depth)
        except ttlv.TTLVError:
            return None

    def handle_holding_records(
        self, data: bytes, conn: ConnectionInfo, decoded: Item | None = None
    ) -> bytes | HeldResponse | None:
        """As `handle`, except that a message of one batch item whose
        operation wrote no record of its own (a read: Get, Locate,
        GetAttributes...) comes back as a `HeldResponse`: its record is not
        written yet, and the caller must write it before the answer leaves
        (fail closed, as `handle` does). The caller can then batch the
        records of many requests without a thread waiting on each (issue 15).
        `decoded`: `decode(data)`, if the caller has it already."""
        return self._handle_entry(data, conn, hold=True, decoded=decoded)

    def _handle_entry(
        self, data: bytes, conn: ConnectionInfo, hold: bool, decoded: Item | None = None
    ) -> bytes | HeldResponse | None:
        # 16 hex digits, as before (uuid4's first 16), all random.
        request_id = os.urandom(8).hex()
        # Log lines of this request carry its id and client ([logging] format = "json").
        with log_context(request_id, conn.principal.name):
            return self._handle_bytes(data, conn, request_id, hold and self.trail is not None, decoded)

    def _handle_bytes(
        self, data: bytes, conn: ConnectionInfo, request_id: str, hold: bool = False, decoded: Item | None = None
    ) -> bytes | HeldResponse | None:
        try:
            message = decoded if decoded is not None else ttlv.decode(data, self.max_depth)
        except ttlv.TTLVError as exc:
            log.info("request %s from %s: undecodable message: %s", request_id, conn.peer, exc)
            self._record_refusal(conn, request_id, None, "undecodable-message", "INVALID_MESSAGE", str(exc))
            return None
        try:
            version = _protocol_version(message)
        except errors.InvalidMessage as exc:
            # Answered in the lowest version: the client's cannot be read.
            log.info("request %s from %s refused: %s", request_id, conn.peer, exc.message)
            self._record_refusal(conn, request_id, None, "message-refused", "INVALID_MESSAGE", exc.message)
            return ttlv.encode(self._error_response(min(SUPPORTED_VERSIONS), ResultReason.INVALID_MESSAGE, exc.message))
        if version is None:
            log.info("request %s from %s: no protocol version in the header", request_id, conn.peer)
            self._record_refusal(
                conn, request_id, None, "undecodable-message", "INVALID_MESSAGE", "no protocol version"
            )
            return None
        try:
            return self._handle_message(message, version, conn, request_id, hold)
        except Exception as exc:
            refused = exc if isinstance(exc, errors.KmsError) else input_error(exc)
            if refused is not None:
                respond_version = _closest_version(version)
                reason, text = result_reason(refused, *respond_version)
                log.info("request %s from %s refused: %s", request_id, conn.peer, text)
                principal = getattr(exc, "principal", None) or conn.principal
                self._record_refusal(conn, request_id, version, "message-refused", reason.name, text, principal)
                return ttlv.encode(self._error_response(respond_version, reason, text))
            log.exception("request %s from %s: internal error", request_id, conn.peer)
            respond_version = _closest_version(version)
            return ttlv.encode(
                self._error_response(
                    respond_version, ResultReason.GENERAL_FAILURE, GENERAL_FAILURE_MESSAGE.format(request_id=request_id)
                )
            )

    def _handle_message(
        self, message: Item, version: tuple[int, int], conn: ConnectionInfo, request_id: str, hold: bool = False
    ) -> bytes | HeldResponse:
        if message.tag != TAG.REQUEST_MESSAGE or message.type != ItemType.STRUCTURE:
            raise errors.InvalidMessage("not a Request Message")
        header = message.find(TAG.REQUEST_HEADER)
        if header is None or header.type != ItemType.STRUCTURE:
            raise errors.InvalidMessage("Request Header is missing")
        if version not in SUPPORTED_VERSIONS:
            raise errors.InvalidMessage(f"protocol version {version[0]}.{version[1]} is not supported")
        items = message.find_all(TAG.BATCH_ITEM)
        checked: set[int] = set()
        for child in header.children():
            # The first of each field is the one read (Item.find).
            expected = _HEADER_FIELD_TYPES.get(child.tag)
            if expected is not None and child.tag not in checked:
                checked.add(child.tag)
                if child.type != expected:
                    raise errors.InvalidMessage(
                        f"{_field_name(Tags(child.tag))} in the Request Header must be {_type_name(expected)}"
                    )
        count = header.get(TAG.BATCH_COUNT)
        if not isinstance(count, int) or count != len(items) or count < 1:
            raise errors.InvalidMessage("Batch Count does not match the number of Batch Items")
        for child in message.children():
            if child.tag not in (TAG.REQUEST_HEADER, TAG.BATCH_ITEM):
                raise errors.InvalidMessage(f"unexpected {ttlv.tag_name(child.tag)} in the Request Message")

        principal = self._principal(header, conn.principal)
        continuation = header.get(TAG.BATCH_ERROR_CONTINUATION_OPTION, BatchErrorContinuationOption.STOP.value)
        max_response = header.get(TAG.MAXIMUM_RESPONSE_SIZE)
        # KMIP 1.4, 6.20 / 2.0, 7.17: defined from 1.4 on (its type was checked above).
        correlation = header.get(TAG.CLIENT_CORRELATION_VALUE) if version >= (1, 4) else None
        ctx = RequestContext(
            principal=principal,
            version=version,
            request_id=request_id,
            now=int(time.time()),
            peer=conn.peer,
            node=self.node,
            correlation=correlation if isinstance(correlation, str) else None,
            ticket=_ticket(header),
            batch=BatchState(),
            # One item only: a record withheld from a batch would leave its
            # siblings' records, and their order, to the caller.
            held=[] if hold and len(items) == 1 else None,
        )

        responses: list[Item] = []
        if continuation == BatchErrorContinuationOption.UNDO.value and len(items) > 1:
            responses = self._handle_undo_batch(ctx, items)
        else:
            for index, item in enumerate(items):
                response, failed, _ = self._handle_item(ctx, item, index)
                responses.append(response)
                if failed and continuation != BatchErrorContinuationOption.CONTINUE.value:
                    # STOP: later items are not processed.
                    break

        header_items = [
            _version_item(version),
            ttlv.date_time(TAG.TIME_STAMP, ctx.now),
        ]
        if version >= (2, 0):
            correlation = header.get(TAG.CLIENT_CORRELATION_VALUE)
            if isinstance(correlation, str):
                header_items.append(ttlv.text(TAG.CLIENT_CORRELATION_VALUE, correlation))
            # KMIP 2.0, 8.2: the server's own correlation value; the request
            # id, which names this request in the server log and audit trail.
            header_items.append(ttlv.text(TAG.SERVER_CORRELATION_VALUE, request_id))
        encoded = self._encode_response(ctx, header_items, responses)
        if isinstance(max_response, int) and len(encoded) > max_response:
            too_large = [
                _failure_item(
                    r, ResultReason.RESPONSE_TOO_LARGE, f"response exceeds Maximum Response Size {max_response}"
                )
                for r in responses
            ]
            encoded = self._encode_response(ctx, header_items, too_large)
        if ctx.held:
            return self._held_response(ctx, header_items, responses, encoded)
        return encoded

    def _held_response(
        self, ctx: RequestContext, header_items: list[Item], responses: list[Item], encoded: bytes
    ) -> HeldResponse:
        assert ctx.held is not None  # one item's record (handle_holding_records)
        ((entry, draft, operation_value, started),) = ctx.held
        text = GENERAL_FAILURE_MESSAGE.format(request_id=ctx.request_id)

        def withheld(why: str) -> bytes:
            # As _handle_item answers when its own write of the record fails.
            log.error(
                "request %s %s: audit record not written, answer withheld: %s",
                ctx.request_id,
                _op_name(operation_value),
                why,
            )
            failed = [_failure_item(r, ResultReason.GENERAL_FAILURE, text) for r in responses]
            return self._encode_response(ctx, header_items, failed)

        def settled(written: bool) -> None:
            self._count_now(operation_value, "SUCCESS" if written else ResultReason.GENERAL_FAILURE.name, started)

        return HeldResponse(
            response=encoded,
            record=entry,
            refusal_record=lambda: draft.entry("OPERATION_FAILED", ResultReason.GENERAL_FAILURE.name, text),
            request_id=ctx.request_id,
            withheld=withheld,
            settled=settled,
        )

    def failed_instead(self, response: bytes, text: str) -> bytes:
        """`response` (an answer this dispatcher encoded) with each batch
        item answered General Failure: for a caller whose commit of the
        request's change failed after the answer was made (the KMS's writes
        in its reactor thread, committed at the end of the turn)."""
        message = ttlv.decode(response, self.max_depth)
        header = message.find(TAG.RESPONSE_HEADER)
        assert header is not None  # an answer this dispatcher encoded
        failed = [
            _failure_item(item, ResultReason.GENERAL_FAILURE, text) for item in message.find_all(TAG.BATCH_ITEM)
        ]
        return ttlv.encode(ttlv.structure(TAG.RESPONSE_MESSAGE, [header] + failed))

    def _encode_response(self, ctx: RequestContext, header_items: list[Item], responses: list[Item]) -> bytes:
        """The Response Message, each batch item encoded on its own: an item
        whose answer cannot be encoded (a server bug) is answered General
        Failure alone, and the others keep theirs (a key an earlier item
        created keeps its identifier)."""
        parts = []
        for response in responses:
            try:
                parts.append(ttlv.encode(response))
            except ttlv.TTLVError:
                log.exception("request %s: a batch item's answer cannot be encoded", ctx.request_id)
                failure = _failure_item(
                    response, ResultReason.GENERAL_FAILURE, GENERAL_FAILURE_MESSAGE.format(request_id=ctx.request_id)
                )
                parts.append(ttlv.encode(failure))
        header = ttlv.structure(
            TAG.RESPONSE_HEADER, header_items + [ttlv.integer(TAG.BATCH_COUNT, len(responses))]
        )
        body = ttlv.encode(header) + b"".join(parts)
        # A structure's items are padded to 8 bytes, so its body needs none.
        return (
            TAG.RESPONSE_MESSAGE.to_bytes(3, "big")
            + bytes([ItemType.STRUCTURE])
            + len(body).to_bytes(4, "big")
            + body
        )

    def _handle_undo_batch(self, ctx: RequestContext, items: list[Item]) -> list[Item]:
        """Batch Error Continuation Option Undo (KMIP 1.4, 6.7; 2.0, 7.7):
        the items run in one storage transaction. If one fails, later items
        are not run, the transaction is rolled back, the earlier items are
        answered Operation Undone (with the payload they had) and recorded
        so in the audit trail. If all succeed, their records commit with
        their changes. A lost database connection runs the whole batch
        again, as `_run` does for one item."""
        for delay in (*self.retry_delays, None):
            ctx.batch.id_placeholder = None
            done: list[tuple[Item, bool, AuditDraft | None]] = []
            records = []
            try:
                with self.backend.batch_transaction() as txn:
                    for index, item in enumerate(items):
                        done.append(self._handle_item(ctx, item, index, batch_txn=txn))
                        if done[-1][1]:
                            raise _UndoBatch
                    if self.trail is not None:
                        records = [
                            self.trail.append(txn, d.entry("SUCCESS", None)) for _, _, d in done if d is not None
                        ]
            except _UndoBatch:
                return self._undone(ctx, done)
            except BackendUnavailable as exc:
                self._database_event(
                    "commit_unknown" if exc.commit_unknown else "gave_up" if delay is None else "retry"
                )
                if exc.commit_unknown:
                    raise errors.OutcomeUnknown(
                        f"the database connection was lost while committing (request {ctx.request_id}); "
                        "the batch may or may not be stored: check before retrying"
                    ) from None
                if delay is None:
                    raise errors.GeneralFailure(f"the database is unavailable (request {ctx.request_id})") from None
                log.warning(
                    "request %s: database unavailable (%s); retrying the batch in %.2f s", ctx.request_id, exc, delay
                )
                would_block("a retry's wait")
                self.sleep(delay)
                continue
            if self.trail is not None:  # records are made only with a trail
                for record in records:
                    self.trail.publish(record)
            return [response for response, _, _ in done]
        raise AssertionError("unreachable")

    def _undone(self, ctx: RequestContext, done: list[tuple[Item, bool, AuditDraft | None]]) -> list[Item]:
        """The answers and audit records of a batch that was rolled back."""
        responses = []
        for response, failed, draft in done:
            if draft is not None:
                assert self.trail is not None  # a draft is made only with a trail (_draft)
                reason = response.get(TAG.RESULT_REASON)
                try:
                    if failed:
                        self.trail.write(
                            draft.entry(
                                "OPERATION_FAILED", ResultReason(reason).name, response.get(TAG.RESULT_MESSAGE)
                            )
                        )
                    else:
                        self.trail.write(draft.entry("OPERATION_UNDONE", None))
                except AuditWriteFailed as exc:
                    # Nothing of the batch took effect; only the answer to
                    # the failed item changes, as for any unrecorded refusal.
                    log.error("request %s: audit record of an undone batch not written: %s", ctx.request_id, exc)
                    if failed:
                        response = _failure_item(
                            response,
                            ResultReason.GENERAL_FAILURE,
                            GENERAL_FAILURE_MESSAGE.format(request_id=ctx.request_id),
                        )
            responses.append(response if failed else _undone_item(response))
        return responses

    def _handle_item(
        self, ctx: RequestContext, item: Item, index: int = 0, batch_txn: Any = None
    ) -> tuple[Item, bool, AuditDraft | None]:
        """Run one item: its answer, whether it failed, and its audit draft.
        With `batch_txn` (a batch run with Undo) the item runs in that
        transaction and writes no audit record: `_handle_undo_batch` does."""
        started = time.monotonic()
        operation_item = item.find(TAG.OPERATION)
        # Only an Enumeration is read (and echoed): an Integer -1 or a
        # 2,048-byte Big Integer in its place is refused, never copied into
        # the answer, whose encoding would then fail.
        well_typed = operation_item is not None and operation_item.type == ItemType.ENUMERATION
        operation_value: int | None = operation_item.value if operation_item is not None and well_typed else None
        batch_id = item.find(TAG.UNIQUE_BATCH_ITEM_ID)
        payload = item.find(TAG.REQUEST_PAYLOAD)
        head: list[Item | None] = [
            ttlv.enumeration(TAG.OPERATION, operation_value) if operation_value is not None else None,
            batch_id,
        ]
        draft = self._draft(ctx, operation_value, payload, index)
        try:
            if operation_item is not None and not well_typed:
                raise errors.InvalidMessage("Operation must be an Enumeration")
            operation = _OPERATIONS.get(operation_value)
            if operation is None:
                raise errors.OperationNotSupported(f"operation {operation_value!r} is not defined")
            handler = self.operations.get(operation)
            if handler is None:
                raise errors.OperationNotSupported(f"{operation.name} is not supported by this server")
            if payload is None or payload.type != ItemType.STRUCTURE:
                raise errors.InvalidMessage("Request Payload is missing")
            held = False
            if batch_txn is not None:
                result = handler(ctx, self.backend.in_batch(batch_txn, self.trail, draft), payload)
            else:
                result = self._run(handler, ctx, payload, draft)
                if draft is not None and draft.written is None:
                    # Reads, and writes that changed nothing: the record is
                    # stored before the answer leaves (fail closed), here
                    # or by the caller of handle_holding_records.
                    assert self.trail is not None  # a draft is made only with a trail (_draft)
                    entry = draft.entry("SUCCESS", None)
                    if ctx.held is not None:
                        ctx.held.append((entry, draft, operation_value, started))  # counted once settled
                        held = True
                    else:
                        self.trail.write(entry)
            body = head + [
                ttlv.enumeration(TAG.RESULT_STATUS, _SUCCESS),
                ttlv.structure(TAG.RESPONSE_PAYLOAD, result),
            ]
            if not held:
                self._count(operation_value, "SUCCESS", started)
            return ttlv.structure(TAG.BATCH_ITEM, body), False, draft
        except errors.KmsError as exc:
            reason, text = result_reason(exc, *ctx.version)
            _log_refusal(ctx, operation_value, reason, text)
        except AuditWriteFailed as exc:
            log.error(
                "request %s %s: audit record not written, answer withheld: %s",
                ctx.request_id,
                _op_name(operation_value),
                exc,
            )
            reason, text = ResultReason.GENERAL_FAILURE, GENERAL_FAILURE_MESSAGE.format(request_id=ctx.request_id)
        except Exception as exc:
            if batch_txn is not None and isinstance(exc, BackendUnavailable):
                raise  # The batch is run again (or refused) as a whole.
            refused = input_error(exc)
            if refused is None:
                log.exception("request %s %s: internal error", ctx.request_id, _op_name(operation_value))
                reason, text = ResultReason.GENERAL_FAILURE, GENERAL_FAILURE_MESSAGE.format(request_id=ctx.request_id)
            else:
                reason, text = result_reason(refused, *ctx.version)
                _log_refusal(ctx, operation_value, reason, text)
        if draft is not None and batch_txn is None:
            assert self.trail is not None  # a draft is made only with a trail (_draft)
            try:
                self.trail.write(draft.entry("OPERATION_FAILED", reason.name, text))
            except AuditWriteFailed as exc:
                log.error("request %s: audit record of a refusal not written: %s", ctx.request_id, exc)
                reason, text = ResultReason.GENERAL_FAILURE, GENERAL_FAILURE_MESSAGE.format(request_id=ctx.request_id)
        body = head + _failure_fields(reason, text)
        self._count(operation_value, reason.name, started)
        return ttlv.structure(TAG.BATCH_ITEM, body), True, draft

    def holding_counts(self) -> HeldCounts:
        """A context manager: requests handled inside are counted in the
        metrics only when the caller settles it (`HeldCounts.settle`). A
        held read's count (`HeldResponse.settled`) is its own, as always."""
        return HeldCounts(self)

    def _count(self, operation_value: int | None, result: str, started: float | None) -> None:
        if self.metrics is None:
            return
        held = _HELD_COUNTS.get()
        if held is not None:
            held.append((operation_value, result, started))
            return
        self._count_now(operation_value, result, started)

    def _count_now(self, operation_value: int | None, result: str, started: float | None) -> None:
        if self.metrics is not None:
            self.metrics.request(
                _op_name(operation_value), result, None if started is None else time.monotonic() - started
            )

    def _database_event(self, event: str) -> None:
        if self.metrics is not None:
            self.metrics.database_event(event)

    def _draft(
        self, ctx: RequestContext, operation_value: int | None, payload: Item | None, index: int
    ) -> AuditDraft | None:
        if self.trail is None:
            return None
        requested = (
            payload.get(TAG.UNIQUE_IDENTIFIER)
            if payload is not None and payload.type == ItemType.STRUCTURE
            else None
        )
        return AuditDraft(
            event="request",
            request_id=ctx.request_id,
            item=index,
            client=client_fields(ctx.principal),
            peer=ctx.peer,
            protocol=f"{ctx.version[0]}.{ctx.version[1]}",
            operation=_op_name(operation_value),
            attributes=request_attributes(payload),
            requested=requested if isinstance(requested, str) else None,
            correlation=ctx.correlation,
        )

    def _record_refusal(
        self,
        conn: ConnectionInfo,
        request_id: str,
        version: tuple[int, int] | None,
        event: str,
        reason: str,
        text: str,
        principal: Principal | None = None,
    ) -> None:
        """A message refused as a whole (undecodable, bad header, failed
        authentication): recorded with what is known."""
        self._count(None, reason, None)
        if self.trail is None:
            return
        draft = AuditDraft(
            event=event,
            request_id=request_id,
            item=None,
            client=client_fields(principal or conn.principal),
            peer=conn.peer,
            protocol=f"{version[0]}.{version[1]}" if version else None,
            operation="-",
        )
        try:
            self.trail.write(draft.entry("OPERATION_FAILED", reason, text))
        except AuditWriteFailed as exc:
            log.error("request %s: audit record of a refused message not written: %s", request_id, exc)

    def _run(self, handler: Handler, ctx: RequestContext, payload: Item, draft: AuditDraft | None = None) -> list[Item]:
        """Run one item. When the database connection is lost before a
        commit, nothing was stored, so the item is run again (this is how
        reads and writes ride out a failover); when it is lost during the
        commit, the outcome is unknown and the client is told so."""
        item_backend = self.backend if draft is None else self.backend.for_item(self.trail, draft)
        for delay in (*self.retry_delays, None):
            if draft is not None:
                draft.reset()
            try:
                return handler(ctx, item_backend, payload)
            except BackendUnavailable as exc:
                self._database_event(
                    "commit_unknown" if exc.commit_unknown else "gave_up" if delay is None else "retry"
                )
                if exc.commit_unknown:
                    log.error("request %s: database connection lost while committing: %s", ctx.request_id, exc)
                    raise errors.OutcomeUnknown(
                        f"the database connection was lost while committing (request {ctx.request_id}); "
                        "the change may or may not be stored: check before retrying"
                    ) from None
                if delay is None:
                    raise
                log.warning("request %s: database unavailable (%s); retrying in %.2f s", ctx.request_id, exc, delay)
                would_block("a retry's wait")
                self.sleep(delay)
        raise AssertionError("unreachable")

    def _principal(self, header: Item, principal: Principal) -> Principal:
        authentication = header.find(TAG.AUTHENTICATION)
        username = None
        if authentication is not None:
            credential = authentication.find(TAG.CREDENTIAL)
            if (
                credential is not None
                and credential.get(TAG.CREDENTIAL_TYPE) == CredentialType.USERNAME_AND_PASSWORD.value
            ):
                value = credential.find(TAG.CREDENTIAL_VALUE)
                username = value.get(TAG.USERNAME) if value is not None else None
                password = value.get(TAG.PASSWORD) if value is not None else None
                if self.authenticate is not None:
                    # The credential must be one the certificate's identity
                    # may present (kms_server/credentials.py).
                    if (
                        not isinstance(username, str)
                        or not isinstance(password, str)
                        or not self.authenticate(username, password, principal.name)
                    ):
                        refused = errors.AuthenticationNotSuccessful("username or password not accepted")
                        # The audit record names who tried (never the password).
                        refused.principal = Principal(
                            name=principal.name,
                            role=principal.role,
                            subject=principal.subject,
                            fingerprint=principal.fingerprint,
                            username=username if isinstance(username, str) else None,
                        )
                        raise refused
        if self.authenticate is not None and username is None:
            raise errors.AuthenticationNotSuccessful("a username/password Credential is required")
        if username is None:
            return principal
        return Principal(
            name=principal.name,
            role=principal.role,
            subject=principal.subject,
            fingerprint=principal.fingerprint,
            username=username,
        )

    @staticmethod
    def _response(header_items: list[Item], batch_items: list[Item]) -> Item:
        header = ttlv.structure(
            TAG.RESPONSE_HEADER, header_items + [ttlv.integer(TAG.BATCH_COUNT, len(batch_items))]
        )
        return ttlv.structure(TAG.RESPONSE_MESSAGE, [header] + batch_items)

    def _error_response(self, version: tuple[int, int], reason: ResultReason, text: str) -> Item:
        item = ttlv.structure(TAG.BATCH_ITEM, _failure_fields(reason, text))
        return self._response([_version_item(version), ttlv.date_time(TAG.TIME_STAMP, int(time.time()))], [item])


def single_operation(message: Item) -> int | None:
    """The Operation of a request message of exactly one batch item; None
    for anything else (the dispatcher then checks it as usual)."""
    if message.type != ItemType.STRUCTURE:
        return None
    items = message.find_all(TAG.BATCH_ITEM)
    if len(items) != 1 or items[0].type != ItemType.STRUCTURE:
        return None
    operation = items[0].find(TAG.OPERATION)
    if operation is None or operation.type != ItemType.ENUMERATION:
        return None
    return operation.value


def _failure_fields(reason: ResultReason, text: str) -> list[Item | None]:
    return [
        ttlv.enumeration(TAG.RESULT_STATUS, ResultStatus.OPERATION_FAILED.value),
        ttlv.enumeration(TAG.RESULT_REASON, reason.value),
        ttlv.text(TAG.RESULT_MESSAGE, text) if text else None,
    ]


class _UndoBatch(Exception):
    """An item of a batch run with Undo failed: roll the batch back."""


def _undone_item(response: Item) -> Item:
    """A succeeded item's answer, its Result Status now Operation Undone."""
    return ttlv.structure(
        TAG.BATCH_ITEM,
        [
            ttlv.enumeration(TAG.RESULT_STATUS, ResultStatus.OPERATION_UNDONE.value)
            if child.tag == TAG.RESULT_STATUS
            else child
            for child in response.children()
        ],
    )


def _failure_item(response: Item, reason: ResultReason, text: str) -> Item:
    head = [c for c in response.children() if c.tag in (TAG.OPERATION, TAG.UNIQUE_BATCH_ITEM_ID)]
    return ttlv.structure(TAG.BATCH_ITEM, head + _failure_fields(reason, text))


def _protocol_version(message: Item) -> tuple[int, int] | None:
    """The request's version; None without one. A version whose numbers are
    not Integers (a 2,048-byte Big Integer, say) raises InvalidMessage: it
    must never reach a log line or the answer."""
    # Any message header with a version lets us answer INVALID_MESSAGE in it
    # (a Response Message sent as a request, for instance).
    header = message.find(TAG.REQUEST_HEADER) or message.find(TAG.RESPONSE_HEADER)
    if header is None or header.type != ItemType.STRUCTURE:
        return None
    pv = header.find(TAG.PROTOCOL_VERSION)
    if pv is None:
        return None
    major, minor = pv.find(TAG.PROTOCOL_VERSION_MAJOR), pv.find(TAG.PROTOCOL_VERSION_MINOR)
    if major is None or minor is None:
        return None
    if major.type != ItemType.INTEGER or minor.type != ItemType.INTEGER:
        raise errors.InvalidMessage("Protocol Version Major and Minor must be Integers")
    return major.value, minor.value


# Request Header fields this server reads, and the type KMIP gives each
# (1.4, 6; 2.0, 7): any other type is refused before its value is used.
_HEADER_FIELD_TYPES = {
    TAG.BATCH_COUNT: ItemType.INTEGER,
    TAG.MAXIMUM_RESPONSE_SIZE: ItemType.INTEGER,
    TAG.BATCH_ERROR_CONTINUATION_OPTION: ItemType.ENUMERATION,
    TAG.CLIENT_CORRELATION_VALUE: ItemType.TEXT_STRING,
    TAG.AUTHENTICATION: ItemType.STRUCTURE,
}
# Operations by their number: a dict lookup, where Operation(value) costs
# the enum's call path on every request.
_OPERATIONS = {operation.value: operation for operation in Operation}
_SUCCESS = ResultStatus.SUCCESS.value


def _field_name(tag: Tags) -> str:
    return tag.name.replace("_", " ").title()


def _type_name(type_: ItemType) -> str:
    name = type_.name.replace("_", " ").title()
    return ("an " if name[0] in "AEIOU" else "a ") + name


def _closest_version(version: tuple[int, int]) -> tuple[int, int]:
    """The version to answer in: the request's if supported, else the
    highest supported version not above it, else the lowest we have."""
    if version in SUPPORTED_VERSIONS:
        return version
    lower = [v for v in SUPPORTED_VERSIONS if v <= version]
    return max(lower) if lower else min(SUPPORTED_VERSIONS)


def _version_item(version: tuple[int, int]) -> Item:
    return ttlv.structure(
        TAG.PROTOCOL_VERSION,
        [
            ttlv.integer(TAG.PROTOCOL_VERSION_MAJOR, version[0]),
            ttlv.integer(TAG.PROTOCOL_VERSION_MINOR, version[1]),
        ],
    )


def _log_refusal(ctx: RequestContext, operation_value: int | None, reason: ResultReason, text: str) -> None:
    """One line for a request refused with a KMIP Result Reason."""
    log.info(
        "request %s %s by %s: %s (%s)", ctx.request_id, _op_name(operation_value), ctx.principal.name, reason.name, text
    )


def _op_name(value: object) -> str:
    """An Operation for the log and the trail; `value` is an Enumeration's
    (32 bits) or None."""
    if value is None:
        return "-"
    operation = _OPERATIONS.get(value) if isinstance(value, int) else None
    if operation is not None:
        return operation.name
    return f"0x{value:08X}" if isinstance(value, int) else "-"


def _ticket(header: Item) -> bytes | None:
    """The Ticket Value of a Ticket Credential (KMIP 2.0, 2.1.2) in the
    request header's Authentication, whatever the protocol version: the
    vTPM broker's gateway reads a host's attestation token from it. None
    when there is none. Other credential types are `_principal`'s."""
    authentication = header.find(TAG.AUTHENTICATION)
    if authentication is None:
        return None
    for credential in authentication.find_all(TAG.CREDENTIAL):
        if credential.get(TAG.CREDENTIAL_TYPE) != CredentialType.TICKET.value:
            continue
        value = credential.find(TAG.CREDENTIAL_VALUE)
        ticket = value.find(TAG.TICKET_VALUE) if value is not None else None
        if ticket is None and value is not None:
            # Also accepted: the Ticket structure inside the Credential Value.
            inner = value.find(TAG.TICKET)
            ticket = inner.find(TAG.TICKET_VALUE) if inner is not None else None
        if ticket is not None and isinstance(ticket.value, bytes):
            return ticket.value
    return None
