"""A KMIP client for one key provider: a list of nodes that serve the same
keys, used in turn when one fails.

Failover rules
--------------

Persistent TLS connections are kept to the *current* node (the first in
the list at start, afterwards the last node that answered): up to
`connections` of them (1 by default), each carrying one request at a time.
Requests from several threads run side by side on separate connections, up
to that number; more wait for a connection to come free. A connection left
open to a node that is no longer the current one is closed when next taken.

For each request the nodes are tried in list order, starting from the
current one and wrapping around. A node that failed less than `backoff`
seconds ago (5 s by default) goes to the end of that order: it is tried only
when every other node has failed too, so a request is never refused while
any node might answer. Each node is tried at most once per request.

What happens when a node fails depends on whether it can have received the
request:

1. Before the request was sent in full (connection refused, DNS, TLS
   handshake or certificate failure, timeout while connecting, our
   certificate rejected, a write that failed): the node did not run it, so
   the request moves on to the next node, whatever the operation. An idle
   connection found closed by the node (its idle timeout) is reopened to
   the same node once before that node counts as failed.
2. After the request was sent (the connection dropped or was reset, or no
   complete, well-formed response came within `request_timeout`):
   - operations that change nothing (DiscoverVersions, Query, Get,
     GetAttributes, GetAttributeList, Locate, Encrypt, Decrypt, MAC,
     MACVerify, Sign, SignatureVerify, Hash, RNGRetrieve) move on to the
     next node;
   - every other operation (Create, CreateKeyPair, Register, ReKey, Add/
     Modify/Delete/SetAttribute, Activate, Revoke, Destroy, and any
     operation not listed above) is NOT sent again: `OutcomeUnknown` is
     raised, naming the operation and the node. The change may have been
     made. The caller decides, typically by Locating the unique Name or
     `x-` attribute it gave the object.
3. A KMIP error response (any Result Status other than Success, e.g.
   Item Not Found, Permission Denied) is the node's answer and is raised
   as `KmipError` without trying another node. A General Failure answer to
   a state-changing operation is raised as `OutcomeUnknown` (reason
   GENERAL_FAILURE): the server uses it when a commit's outcome is unknown.
4. When every node has failed, `NoNodeAvailable` lists each node and its
   error.

A node that failed starts its back-off; one that answers is cleared. Every
retry on another node, and every reconnection, is logged at INFO on the
`kmip_core.client` logger, with the operation and node names only: no
payload, key, plaintext or ciphertext ever reaches a log line or an
exception.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmip.core import enums
from kmip.core.enums import (
    BlockCipherMode,
    CryptographicAlgorithm,
    CryptographicUsageMask,
    KeyFormatType,
    ObjectType,
    Operation,
    PaddingMethod,
    QueryFunction,
    ResultReason,
    ResultStatus,
    RevocationReasonCode,
    Tags,
)

from kmip_core import ttlv
from kmip_core.client import messages
from kmip_core.client.connection import (
    DEFAULT_MAX_RESPONSE_SIZE,
    ConnectFailed,
    Connection,
    Node,
    ResponseFailed,
    client_context,
    parse_node,
)
from kmip_core.client.errors import KmipError, NoNodeAvailable, OutcomeUnknown
from kmip_core.ttlv import Item, ItemType

log = logging.getLogger("kmip_core.client")

T = Tags

# Operations that change nothing on the server: repeating one on another
# node after a lost response cannot do harm.
SAFE_TO_RETRY = frozenset(
    {
        Operation.DISCOVER_VERSIONS,
        Operation.QUERY,
        Operation.GET,
        Operation.GET_ATTRIBUTES,
        Operation.GET_ATTRIBUTE_LIST,
        Operation.LOCATE,
        Operation.ENCRYPT,
        Operation.DECRYPT,
        Operation.MAC,
        Operation.MAC_VERIFY,
        Operation.SIGN,
        Operation.SIGNATURE_VERIFY,
        Operation.HASH,
        Operation.RNG_RETRIEVE,
    }
)

DEFAULT_USAGE_MASK = CryptographicUsageMask.ENCRYPT.value | CryptographicUsageMask.DECRYPT.value

# The Client Correlation Value of the requests this thread (or task) sends
# now: set for the length of one piece of work with `correlation`, so a
# client shared by many threads needs no per-call argument.
_CORRELATION: contextvars.ContextVar[str | None] = contextvars.ContextVar("kmip_client_correlation", default=None)
MAX_CORRELATION_CHARS = 256


@contextlib.contextmanager
def correlation(value: str | None) -> Iterator[None]:
    """Every KMIP request sent inside the block, by any KmipClient, carries
    `value` as its Client Correlation Value (KMIP 1.4 and later; the server
    records it in its audit trail). The broker passes its own request id and
    the host or instance it acts for, e.g. "broker-req=<id>;host=<name>"."""
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_CORRELATION_CHARS):
        raise ValueError(f"a correlation value is a text of 1 to {MAX_CORRELATION_CHARS} characters")
    token = _CORRELATION.set(value)
    try:
        yield
    finally:
        _CORRELATION.reset(token)


def current_correlation() -> str | None:
    """The Client Correlation Value requests sent now carry (None: none)."""
    return _CORRELATION.get()


@dataclass(frozen=True)
class EncryptResult:
    """Ciphertext, the IV used (the one given, or the one the server made),
    and the authentication tag for AEAD modes."""

    data: bytes
    iv: bytes | None
    tag: bytes | None

    def __repr__(self) -> str:  # Lengths only: never payload bytes.
        def size(b: bytes | None) -> str | None:
            return None if b is None else f"bytes[{len(b)}]"

        return f"EncryptResult(data={size(self.data)}, iv={size(self.iv)}, tag={size(self.tag)})"


def _enum(cls: Any, value: object, what: str) -> Any:
    """The member of PyKMIP enum `cls` that `value` is or names."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls[value.upper().replace("-", "_").replace(" ", "_")]
        except KeyError:
            raise ValueError(f"unknown {what} {value!r}") from None
    raise TypeError(f"{what} must be a {cls.__name__} or its name")


def _usage_mask(mask: int | CryptographicUsageMask | Iterable[CryptographicUsageMask]) -> int:
    if isinstance(mask, CryptographicUsageMask):
        return mask.value
    if isinstance(mask, int):
        return mask
    total = 0
    for bit in mask:
        total |= bit.value if isinstance(bit, CryptographicUsageMask) else int(bit)
    return total


class KmipClient:
    """A KMIP client with failover across the nodes of one key provider
    (see the module docstring for the rules).

    `nodes`: "host:port" strings or (host, port) tuples, in order of
    preference. `cert`/`key`: the client certificate and key (PEM); `ca`:
    the CA file the servers' certificates must chain to. The server's
    name is checked against `server_name`, else against each node's host.
    `username`/`password_file` add a KMIP username/password Credential to
    every request (the password is read from the file once, here).
    `connections`: how many requests may be in flight at once, each on its
    own TLS connection (opened when first needed, kept while usable).
    `ticket`: a KMIP Ticket credential (Ticket Type Login) that every request
    carries beside any username/password (the broker gateway's attestation
    token); the `ticket` attribute may be changed between requests and
    applies to the requests sent after the change, from every thread.
    """

    def __init__(
        self,
        nodes: Sequence[str | tuple[str, int]],
        cert: str | Path,
        key: str | Path,
        ca: str | Path,
        *,
        version: tuple[int, int] = (1, 4),
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        server_name: str | None = None,
        username: str | None = None,
        password_file: str | Path | None = None,
        backoff: float = 5.0,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        connections: int = 1,
        ticket: bytes | None = None,
    ):
        if isinstance(nodes, str):
            nodes = [nodes]
        self.nodes: tuple[Node, ...] = tuple(parse_node(n) for n in nodes)
        if not self.nodes:
            raise ValueError("at least one KMIP node is required")
        self.version = (int(version[0]), int(version[1]))
        self.connect_timeout = float(connect_timeout)
        self.request_timeout = float(request_timeout)
        self.server_name = server_name
        self.backoff = float(backoff)
        self.max_response_size = max_response_size
        self._context = client_context(str(cert), str(key), str(ca))
        if (username is None) != (password_file is None):
            raise ValueError("username and password_file go together")
        self._credential: tuple[str, str] | None = None
        if username is not None and password_file is not None:  # both or neither (above)
            password = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
            self._credential = (username, password)
        if int(connections) < 1:
            raise ValueError("connections must be at least 1")
        self.connections = int(connections)
        self.ticket: bytes | None = ticket
        # _lock guards the pool and the failover state; _slots bounds the
        # requests in flight (one per connection).
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.connections)
        self._current = 0
        self._failed_until: dict[int, float] = {}
        self._idle: list[Connection] = []
        self._closed = False

    def __repr__(self) -> str:
        nodes = ", ".join(str(n) for n in self.nodes)
        return f"KmipClient([{nodes}], version={self.version[0]}.{self.version[1]})"

    # Life cycle.
    def __enter__(self) -> KmipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections; a request in flight closes its own
        when it ends. The client cannot be used afterwards."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    @property
    def current_node(self) -> str:
        """The node the next request goes to first."""
        return str(self.nodes[self._current])

    # The failover policy.
    def request(self, operation: Operation, payload_items: Iterable[Item | None] = ()) -> Item:
        """Send one operation with the given Request Payload items and return
        the Response Payload (None items are left out); for any operation
        this client has no method for. Raises `KmipError` (or `OutcomeUnknown`, `NoNodeAvailable`)."""
        operation = Operation(operation)
        message = messages.request_message(
            self.version,
            operation,
            payload_items,
            self._credential,
            correlation=_CORRELATION.get(),
            ticket=self.ticket,
        )
        with self._slots:
            if self._closed:
                raise RuntimeError("the KMIP client is closed")
            return self._send(operation, message)

    def _order(self) -> list[int]:
        """Node indexes to try: from the current node on, wrapping around,
        nodes in their back-off last."""
        count = len(self.nodes)
        now = time.monotonic()
        with self._lock:
            current, failed_until = self._current, dict(self._failed_until)
        rotation = [(current + i) % count for i in range(count)]
        ready = [i for i in rotation if failed_until.get(i, 0.0) <= now]
        waiting = [i for i in rotation if i not in ready]
        for i in waiting:
            if ready:
                log.debug("skipping KMIP node %s for %.1f s after a failure", self.nodes[i], failed_until[i] - now)
        return ready + waiting

    def _send(self, operation: Operation, message: bytes) -> Item:
        name = operation.name
        safe = operation in SAFE_TO_RETRY
        failures: list[tuple[str, str]] = []
        for index in self._order():
            node = self.nodes[index]
            if failures:
                last_node, last_error = failures[-1]
                log.info("KMIP %s failed on %s (%s); retrying on %s", name, last_node, last_error, node)
            try:
                response = self._exchange(index, message, operation)
            except ConnectFailed as exc:
                self._failed(index)
                failures.append((str(node), str(exc)))
                continue
            except (ResponseFailed, messages.MalformedResponse) as exc:
                self._failed(index)
                if not safe:
                    log.warning("KMIP %s sent to %s, no response (%s): outcome unknown, not retried", name, node, exc)
                    raise OutcomeUnknown(name, str(node), f"no response after the request was sent: {exc}") from None
                failures.append((str(node), f"no response: {exc}"))
                continue
            with self._lock:
                self._current = index
                self._failed_until.pop(index, None)
            return self._result(response, operation, node, safe)
        raise NoNodeAvailable(name, failures)

    def _exchange(self, index: int, message: bytes, operation: Operation) -> messages.Response:
        """One exchange with node `index` on a pooled connection. The
        connection goes back to the pool only after a complete, well-formed
        response; any failure closes it."""
        node = self.nodes[index]
        connection = self._take(node)
        reused = connection is not None
        if connection is None:
            connection = self._connect(node)
        try:
            response = messages.parse_response(connection.exchange(message, self.request_timeout), operation)
        except ConnectFailed as exc:
            connection.close()
            if not reused:
                raise
            # Nothing was delivered on a connection the node had already
            # given up on; a fresh one decides whether the node is down.
            log.info("KMIP connection to %s failed before sending (%s); reconnecting", node, exc)
        except BaseException:
            connection.close()
            raise
        else:
            self._give_back(connection)
            return response
        connection = self._connect(node)
        try:
            response = messages.parse_response(connection.exchange(message, self.request_timeout), operation)
        except BaseException:
            connection.close()
            raise
        self._give_back(connection)
        return response

    def _take(self, node: Node) -> Connection | None:
        """An idle connection to `node` that is still usable, or None.
        Idle connections to other nodes (left from before a failover) and
        ones the node closed are closed on the way."""
        stale: list[Connection] = []
        found = None
        with self._lock:
            while self._idle:
                connection = self._idle.pop()
                if connection.node == node:
                    found = connection
                    break
                stale.append(connection)
        for connection in stale:
            connection.close()
        if found is not None and not found.usable():
            log.info("KMIP connection to %s was closed while idle; reconnecting", node)
            found.close()
            found = None
        return found

    def _give_back(self, connection: Connection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(connection)
                return
        connection.close()

    def _connect(self, node: Node) -> Connection:
        return Connection.open(node, self._context, self.server_name, self.connect_timeout, self.max_response_size)

    def _failed(self, index: int) -> None:
        with self._lock:
            self._failed_until[index] = time.monotonic() + self.backoff

    @staticmethod
    def _result(response: messages.Response, operation: Operation, node: Node, safe: bool) -> Item:
        if response.status == ResultStatus.SUCCESS:
            return response.payload
        if response.status != ResultStatus.OPERATION_FAILED:
            raise KmipError(
                response.reason, f"{operation.name}: result status {response.status.name} is not supported", str(node)
            )
        reason = response.reason or ResultReason.GENERAL_FAILURE
        if reason == ResultReason.GENERAL_FAILURE and not safe:
            raise OutcomeUnknown(
                operation.name, str(node), f"the node answered General Failure: {response.message}", reason
            )
        raise KmipError(reason, response.message, str(node))

    def _unexpected(self, operation: Operation, what: str) -> KmipError:
        return KmipError(None, f"{operation.name} response {what}", self.current_node)

    def _v2(self) -> bool:
        return self.version >= (2, 0)

    # Operations.
    def discover_versions(self, versions: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int]]:
        """The protocol versions the server supports (among `versions` if
        given), in its order of preference. KMIP 1.4, 4.26."""
        payload = self.request(Operation.DISCOVER_VERSIONS, [messages.protocol_version(v) for v in versions])
        return [
            (pv.get(T.PROTOCOL_VERSION_MAJOR.value), pv.get(T.PROTOCOL_VERSION_MINOR.value))
            for pv in payload.find_all(T.PROTOCOL_VERSION.value)
        ]

    def query_server_information(self) -> dict[str, Any]:
        """Query Server Information: {"vendor_identification": ...} and any
        Server Information fields, keyed by snake_case tag name."""
        payload = self.request(
            Operation.QUERY, [ttlv.enumeration(T.QUERY_FUNCTION.value, QueryFunction.QUERY_SERVER_INFORMATION.value)]
        )
        info: dict[str, Any] = {}
        for item in payload.children():
            if item.tag == T.SERVER_INFORMATION.value:
                info.update(messages.python_value(item))
            elif item.tag in (T.VENDOR_IDENTIFICATION.value,):
                info["vendor_identification"] = item.value
        return info

    def query_operations(self) -> list[Operation]:
        """The operations the server supports (Query Operations)."""
        payload = self.request(
            Operation.QUERY, [ttlv.enumeration(T.QUERY_FUNCTION.value, QueryFunction.QUERY_OPERATIONS.value)]
        )
        result = []
        for item in payload.find_all(T.OPERATION.value):
            try:
                result.append(Operation(item.value))
            except ValueError:
                pass
        return result

    def create_symmetric_key(
        self,
        algorithm: CryptographicAlgorithm | str = "AES",
        length: int = 256,
        usage_mask: int | CryptographicUsageMask | Iterable[CryptographicUsageMask] = DEFAULT_USAGE_MASK,
        name: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> str:
        """Create a symmetric key and return its Unique Identifier. `name`
        becomes its Name; `attributes` are custom `x-` attributes (str, int,
        bytes, bool or aware datetime values). KMIP 1.4, 4.1."""
        pairs: list[tuple[str, Any]] = [
            ("Cryptographic Algorithm", _enum(CryptographicAlgorithm, algorithm, "algorithm")),
            ("Cryptographic Length", int(length)),
            ("Cryptographic Usage Mask", _usage_mask(usage_mask)),
        ]
        if name is not None:
            pairs.append(("Name", name))
        for attribute, value in (attributes or {}).items():
            if not attribute.startswith("x-"):
                raise ValueError(f"custom attribute {attribute!r} must start with 'x-'")
            pairs.append((attribute, value))
        items = messages.attribute_items(self.version, pairs)
        template = (
            ttlv.structure(T.ATTRIBUTES.value, items)
            if self._v2()
            else ttlv.structure(T.TEMPLATE_ATTRIBUTE.value, items)
        )
        payload = self.request(
            Operation.CREATE, [ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value), template]
        )
        return self._uid(payload, Operation.CREATE)

    def get_key(self, uid: str) -> bytes:
        """The raw bytes of a symmetric key. KMIP 1.4, 4.10."""
        payload = self.request(
            Operation.GET,
            [
                ttlv.text(T.UNIQUE_IDENTIFIER.value, uid),
                ttlv.enumeration(T.KEY_FORMAT_TYPE.value, KeyFormatType.RAW.value),
            ],
        )
        key = payload.find(T.SYMMETRIC_KEY.value)
        block = key.find(T.KEY_BLOCK.value) if key is not None else None
        value = block.find(T.KEY_VALUE.value) if block is not None else None
        material = value.find(T.KEY_MATERIAL.value) if value is not None and value.type == ItemType.STRUCTURE else None
        if material is None or material.type != ItemType.BYTE_STRING:
            raise self._unexpected(Operation.GET, f"for {uid} holds no raw symmetric key")
        return material.value

    def get_attributes(self, uid: str, names: Iterable[str] | None = None) -> dict[str, list[Any]]:
        """The object's attributes (those named, or all), as {name: [values]}.
        Enumerations are PyKMIP enums, dates aware datetimes, a Name its text.
        KMIP 1.4, 4.11."""
        items = [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)]
        items += [messages.attribute_reference(self.version, n) for n in (names or ())]
        payload = self.request(Operation.GET_ATTRIBUTES, items)
        try:
            return messages.read_attributes(payload)
        except messages.MalformedResponse as exc:
            raise self._unexpected(Operation.GET_ATTRIBUTES, str(exc)) from None

    def get_attribute_list(self, uid: str) -> list[str]:
        """The names of the object's attributes. KMIP 1.4, 4.12."""
        payload = self.request(Operation.GET_ATTRIBUTE_LIST, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])
        names = [i.value for i in payload.find_all(T.ATTRIBUTE_NAME.value)]
        for reference in payload.find_all(T.ATTRIBUTE_REFERENCE.value):
            if reference.type == ItemType.STRUCTURE:
                names.append(f"{reference.get(T.VENDOR_IDENTIFICATION.value)}-{reference.get(T.ATTRIBUTE_NAME.value)}")
            else:
                try:
                    names.append(enums.convert_attribute_tag_to_name(Tags(reference.value)))
                except ValueError:
                    names.append(ttlv.tag_name(reference.value))
        return names

    def add_attribute(self, uid: str, name: str, value: Any) -> None:
        """Add a value to an attribute (custom `x-` ones included; a value may
        be an `Item` for structured standard attributes). KMIP 1.4, 4.13."""
        if self._v2():
            attribute = ttlv.structure(T.NEW_ATTRIBUTE.value, [messages.attribute_v2(name, value)])
        else:
            attribute = messages.attribute_v1(name, value)
        self.request(Operation.ADD_ATTRIBUTE, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid), attribute])

    def locate(
        self,
        attributes: Mapping[str, Any],
        maximum_items: int | None = None,
        offset_items: int | None = None,
    ) -> list[str]:
        """Unique Identifiers of the objects matching every attribute. A
        list value gives the attribute several times (a date range).
        KMIP 1.4, 4.9."""
        pairs = []
        for name, value in attributes.items():
            for one in value if isinstance(value, (list, tuple)) else [value]:
                pairs.append((name, one))
        items: list[Item | None] = [
            ttlv.integer(T.MAXIMUM_ITEMS.value, maximum_items) if maximum_items is not None else None,
            ttlv.integer(T.OFFSET_ITEMS.value, offset_items) if offset_items is not None else None,
        ]
        if self._v2():
            items.append(ttlv.structure(T.ATTRIBUTES.value, messages.attribute_items(self.version, pairs)))
        else:
            items += messages.attribute_items(self.version, pairs)
        payload = self.request(Operation.LOCATE, [i for i in items if i is not None])
        return [i.value for i in payload.find_all(T.UNIQUE_IDENTIFIER.value)]

    def activate(self, uid: str) -> None:
        """Pre-Active to Active. KMIP 1.4, 4.19."""
        self.request(Operation.ACTIVATE, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])

    def revoke(
        self,
        uid: str,
        reason: RevocationReasonCode | str = RevocationReasonCode.CESSATION_OF_OPERATION,
        message: str | None = None,
        compromise_occurrence_date: int | None = None,
    ) -> None:
        """Revoke: Deactivated, or Compromised for KEY_COMPROMISE and
        CA_COMPROMISE (then `compromise_occurrence_date`, seconds since the
        epoch, may be given). KMIP 1.4, 4.20."""
        code = _enum(RevocationReasonCode, reason, "revocation reason")
        revocation = ttlv.structure(
            T.REVOCATION_REASON.value,
            [
                ttlv.enumeration(T.REVOCATION_REASON_CODE.value, code.value),
                ttlv.text(T.REVOCATION_MESSAGE.value, message) if message else None,
            ],
        )
        self.request(
            Operation.REVOKE,
            [
                ttlv.text(T.UNIQUE_IDENTIFIER.value, uid),
                revocation,
                ttlv.date_time(T.COMPROMISE_OCCURRENCE_DATE.value, compromise_occurrence_date)
                if compromise_occurrence_date is not None
                else None,
            ],
        )

    def destroy(self, uid: str) -> None:
        """Destroy the object's key material. KMIP 1.4, 4.21."""
        self.request(Operation.DESTROY, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])

    @staticmethod
    def _crypto_parameters(
        mode: BlockCipherMode | str | None, padding: PaddingMethod | str | None, tag_length: int | None
    ) -> Item:
        return ttlv.structure(
            T.CRYPTOGRAPHIC_PARAMETERS.value,
            [
                ttlv.enumeration(T.BLOCK_CIPHER_MODE.value, _enum(BlockCipherMode, mode, "block cipher mode").value)
                if mode is not None
                else None,
                ttlv.enumeration(T.PADDING_METHOD.value, _enum(PaddingMethod, padding, "padding method").value)
                if padding is not None
                else None,
                ttlv.integer(T.TAG_LENGTH.value, tag_length) if tag_length is not None else None,
            ],
        )

    def encrypt(
        self,
        uid: str,
        data: bytes,
        mode: BlockCipherMode | str | None = "GCM",
        iv: bytes | None = None,
        aad: bytes | None = None,
        padding: PaddingMethod | str | None = None,
        tag_length: int | None = None,
    ) -> EncryptResult:
        """Encrypt `data` with a key on the server (the key never leaves it).
        `mode` None uses the key's Cryptographic Parameters; without `iv` the
        server makes one and it is returned. KMIP 1.4, 4.29."""
        payload = self.request(
            Operation.ENCRYPT,
            [
                ttlv.text(T.UNIQUE_IDENTIFIER.value, uid),
                self._crypto_parameters(mode, padding, tag_length)
                if (mode, padding, tag_length) != (None, None, None)
                else None,
                ttlv.byte_string(T.DATA.value, data),
                ttlv.byte_string(T.IV_COUNTER_NONCE.value, iv) if iv is not None else None,
                ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA.value, aad) if aad is not None else None,
            ],
        )
        ciphertext = payload.get(T.DATA.value)
        if not isinstance(ciphertext, bytes):
            raise self._unexpected(Operation.ENCRYPT, "holds no Data")
        return EncryptResult(
            ciphertext,
            payload.get(T.IV_COUNTER_NONCE.value, iv),
            payload.get(T.AUTHENTICATED_ENCRYPTION_TAG.value),
        )

    def decrypt(
        self,
        uid: str,
        data: bytes,
        iv: bytes | None = None,
        aad: bytes | None = None,
        tag: bytes | None = None,
        mode: BlockCipherMode | str | None = "GCM",
        padding: PaddingMethod | str | None = None,
    ) -> bytes:
        """Decrypt `data` with a key on the server; an AEAD tag that does not
        verify is a CRYPTOGRAPHIC_FAILURE. KMIP 1.4, 4.30."""
        payload = self.request(
            Operation.DECRYPT,
            [
                ttlv.text(T.UNIQUE_IDENTIFIER.value, uid),
                self._crypto_parameters(mode, padding, None) if (mode, padding) != (None, None) else None,
                ttlv.byte_string(T.DATA.value, data),
                ttlv.byte_string(T.IV_COUNTER_NONCE.value, iv) if iv is not None else None,
                ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA.value, aad) if aad is not None else None,
                ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_TAG.value, tag) if tag is not None else None,
            ],
        )
        plaintext = payload.get(T.DATA.value)
        if not isinstance(plaintext, bytes):
            raise self._unexpected(Operation.DECRYPT, "holds no Data")
        return plaintext

    def _uid(self, payload: Item, operation: Operation) -> str:
        uid = payload.get(T.UNIQUE_IDENTIFIER.value)
        if not isinstance(uid, str):
            raise self._unexpected(operation, "holds no Unique Identifier")
        return uid
