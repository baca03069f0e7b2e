"""The sealed backup format both services write (docs/backup-format.md).

A backup is a header (JSON: the caller's fields, the tables and their row
counts, KDF, cipher, the wrapped backup key) followed by a record stream of
sections, one per table, cut into chunks. Each chunk is sealed with
AES-256-GCM under a key derived (HKDF-SHA256, fresh salt) from a random
backup key, which the master key wraps into the header: so a master key that
never leaves its token works, and a backup stays restorable with the master
key it was made under after a rotation. A chunk's nonce carries its index
and whether it is the last one, so a reordered, removed or truncated chunk
does not open.

What tells one product's backups apart is its `BackupKind` (the file
signature, which is also in the context that binds the wrapped backup key,
the names its messages use, the tables its sections name); the rest is
here. `kms_server.admin.backup` (``kms-admin backup``) and `broker.backup`
(``vtpm-broker backup``) each say what goes into their sections and what a
restore checks; this module writes (`write_sealed`) and reads (`open_sealed`,
`open_backup`) the file, and holds the database parts both use
(`table_section`, `require_empty`, `set_high_water`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import MetaData, Table, func, inspect, select, text
from sqlalchemy.engine import Connection

from kmip_core.files import atomic_file
from kmip_core.progress import Callback
from kmip_core.sealing.backup_seal import HKDF_INFO, BackupCipher, ChunkInvalid
from kmip_core.sealing.master_key import MasterKey, MasterKeyError

__all__ = [
    "BATCH_ROWS",
    "CHUNK_SIZE",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "BackupError",
    "BackupHeader",
    "BackupKind",
    "Progress",
    "SealedBackup",
    "Section",
    "backup_key_context",
    "check_output",
    "count_rows",
    "describe_rows",
    "made_under",
    "open_backup",
    "open_sealed",
    "require_empty",
    "set_high_water",
    "table_section",
    "unwrap_backup_key",
    "write_sealed",
]

# (done, total) reports: kmip_core.progress, the one progress helper, displays them.
Progress = Callback
"""Called with (rows done, rows in total), first with done == 0."""

# 2: the chunk key comes from a random backup key that the master key wraps
# into the header. 1 (still restored by the KMS): it came from the raw master key.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
BACKUP_KEY_SIZE = 32
SALT_SIZE = 32
DIGEST_SIZE = 32
TAG_SIZE = 16
# Plaintext bytes per chunk; the reader takes the value from the header.
CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_HEADER_SIZE = 1024 * 1024
# Rows read (server-side cursor) and inserted per round trip.
BATCH_ROWS = 1000

_PREFIX = struct.Struct(">8sHI")  # magic, format version, header length
_FRAME = struct.Struct(">BI")  # chunk flags, sealed chunk length
_FLAG_MORE, _FLAG_FINAL = 0x00, 0x01
# Nonce = kind (1 byte) || 3 zero bytes || index (8 bytes, big-endian).

# Records of the plaintext stream.
_REC_SECTION, _REC_ROW, _REC_SECTION_END, _REC_END = b"T", b"R", b"E", b"Z"
# Column values.
_V_NULL, _V_INT, _V_FLOAT, _V_TEXT, _V_BYTES = 0, 1, 2, 3, 4
_MAX_VALUE_SIZE = 1 << 30


class BackupError(Exception):
    """A backup or restore could not be done; the message is one line,
    'problem; fix', and holds no key material or attribute value."""


def describe_rows(rows: dict[str, int], descriptions: Mapping[str, tuple[str, str]] | None = None) -> str:
    """'3 objects, 12 attributes, 1 server value' for a summary's rows.

    `descriptions` maps a table to how its rows are named (singular,
    plural), in the order they are listed; a table it does not name comes
    after them, as '<table> row(s)'."""
    descriptions = descriptions or {}
    order = list(descriptions)
    parts = []
    for name in sorted(rows, key=lambda n: (order.index(n) if n in order else len(order), n)):
        singular, plural = descriptions.get(name, (f"{name} row", f"{name} rows"))
        parts.append(f"{rows[name]} {singular if rows[name] == 1 else plural}")
    return ", ".join(parts)


@dataclass(frozen=True)
class BackupKind:
    """What tells one product's backups apart (the KMS's, the broker's):
    the file signature, which is also in the context that binds the wrapped
    backup key, the names its messages use, and the tables its sections name.
    Everything else (layout, cipher, record stream) is this module's."""

    magic: bytes  # 8 bytes
    product: str  # "kms-server": "... is not a kms-server backup"
    tool: str  # "kms-admin": "a file made by 'kms-admin backup'"
    metadata: MetaData


# --- the backup key under the master key ---------------------------------------------
#
# Format 2: the chunks are sealed under a key derived from a random backup
# key, which the master key wraps (MasterKey.wrap, inside the token for a
# PKCS#11 key) into the header. Format 1 (read only, by the KMS) derived it
# from the raw master key bytes, which a token never gives out.


def backup_key_context(salt: bytes, magic: bytes) -> bytes:
    """What the wrapped backup key is bound to: this format, the product's
    signature `magic` and this backup (its `salt`), so it cannot be moved
    into another header, nor into another product's backup."""
    return b"kms-backup:" + magic + FORMAT_VERSION.to_bytes(2, "big") + salt


def made_under(how: Any) -> str:
    """The master key a header's ``master_key`` member names, for an
    operator: "token key 'K' in token 'T', id pkcs11:...", "a passphrase",
    "a key file, id aes:..."."""
    if not isinstance(how, dict):
        return "an unnamed master key"
    source = how.get("source")
    if source == "pkcs11":
        name = f"token key '{how.get('key_label')}' in token '{how.get('token_label')}'"
    elif source == "passphrase":
        name = "a passphrase"
    else:
        name = "a key file"
    return f"{name}, id {how['key_id']}" if how.get("key_id") else name


def unwrap_backup_key(master: MasterKey, fields: dict[str, Any], salt: bytes, magic: bytes) -> bytes:
    """Format 2: the backup key that `master` wrapped into the header
    `fields` of a backup with signature `magic` and KDF `salt`. Raises
    BackupError when the header lacks it or `master` is another key."""
    try:
        wrapped = bytes.fromhex(fields["backup_key"]["wrapped"])
    except (KeyError, TypeError, ValueError):
        raise _corrupt("the header lacks the wrapped backup key") from None
    try:
        return master.unwrap(wrapped, backup_key_context(salt, magic))
    except MasterKeyError:
        raise BackupError(
            f"the backup was made under another master key; configure {made_under(fields.get('master_key'))} "
            "(the master key of the server that made it, before any rotation)"
        ) from None


# --- database ---------------------------------------------------------------------------


def count_rows(conn: Connection, table: Table) -> int:
    """The rows `table` holds, as the transaction of `conn` sees them."""
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _serial_sequence(conn: Connection, table: Table, column: str) -> str | None:
    return conn.execute(text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": column}).scalar()


def _high_water(conn: Connection, table: Table) -> dict[str, Any] | None:
    """The largest value the table's autoincrement key has handed out, so
    that a restored store never gives a deleted object's number again."""
    column = table.autoincrement_column
    if column is None:
        return None
    high = conn.execute(select(func.max(column))).scalar() or 0
    if conn.dialect.name == "sqlite" and table.dialect_options["sqlite"]["autoincrement"]:
        seq = conn.execute(text("SELECT seq FROM sqlite_sequence WHERE name = :n"), {"n": table.name}).scalar()
        high = max(high, seq or 0)
    elif conn.dialect.name == "postgresql":
        sequence = _serial_sequence(conn, table, column.name)
        if sequence is not None:
            # The name comes from the catalog, already quoted.
            last, called = conn.execute(text(f"SELECT last_value, is_called FROM {sequence}")).one()
            if called:
                high = max(high, last)
    return {"column": column.name, "high_water": int(high)}


def set_high_water(conn: Connection, table: Table, info: dict[str, Any] | None) -> None:
    """After a restore's inserts: the autoincrement key continues above the
    backup's high-water mark (a section's `autoincrement`)."""
    if not info:
        return
    column = table.c[info["column"]]
    high = max(int(info["high_water"]), conn.execute(select(func.max(column))).scalar() or 0)
    if high <= 0:
        return
    if conn.dialect.name == "sqlite":
        if table.dialect_options["sqlite"]["autoincrement"]:
            params = {"n": table.name, "s": high}
            if conn.execute(text("UPDATE sqlite_sequence SET seq = :s WHERE name = :n"), params).rowcount == 0:
                conn.execute(text("INSERT INTO sqlite_sequence (name, seq) VALUES (:n, :s)"), params)
    elif conn.dialect.name == "postgresql":
        sequence = _serial_sequence(conn, table, column.name)
        if sequence is not None:
            conn.execute(text("SELECT setval(CAST(:s AS regclass), :v, true)"), {"s": sequence, "v": high})


def require_empty(
    conn: Connection,
    shown: str,
    tables: Iterable[Table],
    *,
    revision: str | None,
    known_revisions: Iterable[str],
    product: str,
) -> None:
    """Refuse a restore target that holds a row in any of `tables`, or that
    is at a schema `revision` this `product` (its command name, for the
    message) does not know. Raises BackupError; both products restore this way."""
    inspector = inspect(conn)
    for table in tables:
        if inspector.has_table(table.name):
            rows = count_rows(conn, table)
            if rows:
                raise BackupError(
                    f"database {shown} is not empty ({table.name} holds {rows} row{'s' if rows != 1 else ''}); "
                    "restore into a new, empty database"
                )
    if revision is not None and revision not in known_revisions:
        raise BackupError(
            f"database {shown} is at schema revision {revision}, which this {product} does not know; "
            "restore into a new, empty database"
        )


# --- record encoding ------------------------------------------------------------------


def _encode_value(value: Any, out: bytearray) -> None:
    if value is None:
        out.append(_V_NULL)
    elif isinstance(value, bool):
        out.append(_V_INT)
        out += struct.pack(">q", int(value))
    elif isinstance(value, int):
        out.append(_V_INT)
        out += struct.pack(">q", value)
    elif isinstance(value, float):
        out.append(_V_FLOAT)
        out += struct.pack(">d", value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        out.append(_V_TEXT)
        out += len(data).to_bytes(4, "big") + data
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out.append(_V_BYTES)
        out += len(data).to_bytes(4, "big") + data
    else:
        raise BackupError(f"a column holds a {type(value).__name__}, which backups do not encode; report a bug")


def _row_record(row: Any) -> bytes:
    body = bytearray()
    try:
        for value in row:
            _encode_value(value, body)
    except struct.error:
        raise BackupError(
            "a column holds an integer beyond 64 bits, which backups do not encode; report a bug"
        ) from None
    return _REC_ROW + len(body).to_bytes(4, "big") + body


def _section_record(info: dict[str, Any]) -> bytes:
    data = json.dumps(info, sort_keys=True, separators=(",", ":")).encode()
    return _REC_SECTION + len(data).to_bytes(4, "big") + data


class _ChunkWriter:
    """Cuts the plaintext stream into sealed, framed chunks."""

    def __init__(self, fh: IO[bytes], cipher: BackupCipher, aad: bytes, chunk_size: int):
        self._fh, self._cipher, self._aad, self._size = fh, cipher, aad, chunk_size
        self._buffer = bytearray()
        self.chunks = 0

    def write(self, data: bytes | bytearray) -> None:
        self._buffer += data
        while len(self._buffer) >= self._size:
            self._emit(bytes(self._buffer[: self._size]), final=False)
            del self._buffer[: self._size]

    def close(self) -> None:
        self._emit(bytes(self._buffer), final=True)
        self._buffer.clear()

    def _emit(self, plaintext: bytes, final: bool) -> None:
        sealed = self._cipher.seal(self.chunks, final, plaintext, self._aad)
        self._fh.write(_FRAME.pack(_FLAG_FINAL if final else _FLAG_MORE, len(sealed)) + sealed)
        self.chunks += 1


# --- reading a backup -------------------------------------------------------------------


def _corrupt(what: str) -> BackupError:
    return BackupError(f"the backup is corrupt or was altered ({what}); use an intact copy")


@dataclass
class BackupHeader:
    """A backup's header as read, its digest checked but not yet
    authenticated under the backup's key (`open_backup` does that after
    `chunk_key` gave the key)."""

    version: int
    fields: dict[str, Any]
    tables: list[tuple[str, int]]  # (table, rows) in section order
    salt: bytes  # the KDF salt
    chunk_size: int
    prefix: bytes  # magic .. header JSON: what the header tag authenticates
    digest: bytes
    key_check: bytes
    tag: bytes
    data_offset: int


def _read_header(fh: IO[bytes], path: Path, kind: BackupKind) -> BackupHeader:
    start = fh.read(_PREFIX.size)
    magic = kind.magic
    if len(start) < len(magic) or start[: len(magic)] != magic:
        raise BackupError(
            f"{path} is not a {kind.product} backup (no backup signature); give a file made by '{kind.tool} backup'"
        )
    if len(start) < _PREFIX.size:
        raise BackupError(f"the backup {path} is truncated (it ends inside the header); use a complete copy")
    _magic, version, length = _PREFIX.unpack(start)
    if version not in READ_VERSIONS:
        raise BackupError(
            f"{path} is backup format {version}, this {kind.tool} reads formats "
            f"{', '.join(map(str, READ_VERSIONS))}; restore it with the {kind.tool} release that made it"
        )
    if length > MAX_HEADER_SIZE:
        raise _corrupt("the header length is out of range")
    body = fh.read(length)
    trailer = fh.read(DIGEST_SIZE + 2 * TAG_SIZE)
    if len(body) < length or len(trailer) < DIGEST_SIZE + 2 * TAG_SIZE:
        raise BackupError(f"the backup {path} is truncated (it ends inside the header); use a complete copy")
    prefix = start + body
    digest = trailer[:DIGEST_SIZE]
    # An unkeyed digest first: accidental damage to the header is reported
    # as such, not as a wrong master key.
    if not hmac.compare_digest(hashlib.sha256(prefix).digest(), digest):
        raise _corrupt("the header does not match its digest")
    try:
        fields = json.loads(body)
    except ValueError:
        raise _corrupt("the header is not valid JSON") from None
    if not isinstance(fields, dict):
        raise _corrupt("the header is not a JSON object")
    tables, salt, chunk_size = _check_header_fields(fields)
    return BackupHeader(
        version=version,
        fields=fields,
        tables=tables,
        salt=salt,
        chunk_size=chunk_size,
        prefix=prefix,
        digest=digest,
        key_check=trailer[DIGEST_SIZE : DIGEST_SIZE + TAG_SIZE],
        tag=trailer[DIGEST_SIZE + TAG_SIZE :],
        data_offset=fh.tell(),
    )


def _check_header_fields(fields: dict[str, Any]) -> tuple[list[tuple[str, int]], bytes, int]:
    try:
        tables = [(str(t["name"]), int(t["rows"])) for t in fields["tables"]]
        salt = bytes.fromhex(fields["kdf"]["salt"])
        chunk_size = int(fields["cipher"]["chunk_size"])
        str(fields["schema_revision"])
    except (KeyError, TypeError, ValueError):
        raise _corrupt("the header lacks a field") from None
    if fields.get("kdf", {}).get("name") != "HKDF-SHA256" or fields.get("cipher", {}).get("name") != "AES-256-GCM":
        raise BackupError(
            "the backup uses a cipher or KDF this release does not; restore it with the release that made it"
        )
    if not 0 < chunk_size <= MAX_CHUNK_SIZE or len(salt) != SALT_SIZE:
        raise _corrupt("the header's chunk size or salt is out of range")
    return tables, salt, chunk_size


def _authenticate(cipher: BackupCipher, header: BackupHeader) -> None:
    key_ok = hmac.compare_digest(cipher.key_check(), header.key_check)
    header_ok = hmac.compare_digest(cipher.header_tag(header.prefix), header.tag)
    if not key_ok and not header_ok:
        raise BackupError(
            "the backup was made under another master key; configure the key file or passphrase "
            "of the server that made it"
        )
    if not header_ok:
        raise _corrupt("the header does not authenticate")
    if not key_ok:
        raise _corrupt("the key check does not authenticate")


def _chunks(fh: IO[bytes], cipher: BackupCipher, aad: bytes, chunk_size: int) -> Iterator[bytes]:
    """The authenticated plaintext of every chunk, in order; raises
    BackupError at the first chunk that is missing, out of place or altered."""
    index = 0
    while True:
        frame = fh.read(_FRAME.size)
        if len(frame) < _FRAME.size:
            raise BackupError(
                f"the backup is truncated (it ends after {index} chunks of data, without the final chunk); "
                "use a complete copy"
            )
        flags, length = _FRAME.unpack(frame)
        if flags not in (_FLAG_MORE, _FLAG_FINAL) or not TAG_SIZE <= length <= chunk_size + TAG_SIZE:
            raise _corrupt(f"chunk {index} has a malformed frame")
        sealed = fh.read(length)
        if len(sealed) < length:
            raise BackupError(f"the backup is truncated (it ends inside chunk {index}); use a complete copy")
        try:
            yield cipher.open(index, flags == _FLAG_FINAL, sealed, aad)
        except ChunkInvalid:
            raise _corrupt(f"chunk {index} does not authenticate: altered, reordered or missing") from None
        index += 1
        if flags == _FLAG_FINAL:
            if fh.read(1):
                raise _corrupt("there are bytes after the final chunk")
            return


class _Plaintext:
    """The record stream across chunk boundaries."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buffer = b""
        self._pos = 0

    def read(self, n: int) -> bytes:
        while len(self._buffer) - self._pos < n:
            try:
                more = next(self._chunks)
            except StopIteration:
                raise _corrupt("the records end early") from None
            self._buffer = self._buffer[self._pos :] + more
            self._pos = 0
        out = self._buffer[self._pos : self._pos + n]
        self._pos += n
        return out

    def finish(self) -> None:
        """After the end record: nothing may follow, and the chunks must end
        with a final chunk (the iterator checks that as it runs out)."""
        rest = len(self._buffer) - self._pos
        for more in self._chunks:
            rest += len(more)
        if rest:
            raise _corrupt("there are records after the end record")


_INT = struct.Struct(">q")
_FLOAT = struct.Struct(">d")
_LENGTH = struct.Struct(">I")


def _decode_row(data: bytes, columns: int) -> list[Any]:
    """The values of one row record (its length prefix already removed)."""
    values: list[Any] = []
    at, end = 0, len(data)
    try:
        for _ in range(columns):
            kind = data[at]
            at += 1
            if kind == _V_NULL:
                values.append(None)
            elif kind == _V_INT:
                values.append(_INT.unpack_from(data, at)[0])
                at += 8
            elif kind == _V_FLOAT:
                values.append(_FLOAT.unpack_from(data, at)[0])
                at += 8
            elif kind in (_V_TEXT, _V_BYTES):
                size = _LENGTH.unpack_from(data, at)[0]
                at += 4
                if at + size > end:
                    raise _corrupt("a value runs past its row")
                value = data[at : at + size]
                at += size
                values.append(value if kind == _V_BYTES else value.decode("utf-8"))
            else:
                raise _corrupt(f"unknown value type {kind}")
    except (IndexError, struct.error):
        raise _corrupt("a row is shorter than its columns") from None
    except UnicodeDecodeError:
        raise _corrupt("a text value is not UTF-8") from None
    if at != end:
        raise _corrupt("a row is longer than its columns")
    return values


def _sections(
    stream: _Plaintext, header: dict[str, Any], metadata: MetaData
) -> Iterator[tuple[Table, dict[str, Any], list[dict[str, Any]]]]:
    """(table, section info, a batch of rows) for every batch, in file order.
    Checks that the sections are the header's, that the columns are the
    table's and that each section holds as many rows as the header says."""
    expected = [(t["name"], t["rows"]) for t in header["tables"]]
    for name, rows in expected:
        if stream.read(1) != _REC_SECTION:
            raise _corrupt(f"section {name} is missing")
        size = int.from_bytes(stream.read(4), "big")
        if size > MAX_HEADER_SIZE:
            raise _corrupt("a section header is too long")
        try:
            info = json.loads(stream.read(size))
        except ValueError:
            raise _corrupt("a section header is not valid JSON") from None
        if not isinstance(info, dict) or info.get("table") != name or info.get("rows") != rows:
            raise _corrupt(f"section {name} does not match the header")
        table = metadata.tables.get(name)
        if table is None:
            raise BackupError(f"the backup holds a table {name} this release does not; restore it with its release")
        columns = info.get("columns")
        if not isinstance(columns, list) or sorted(columns) != sorted(c.name for c in table.columns):
            raise BackupError(
                f"the backup's columns of {name} are not this release's; restore it with the release that made it"
            )
        batch: list[dict[str, Any]] = []
        count = 0
        while True:
            record = stream.read(1)
            if record == _REC_ROW:
                size = int.from_bytes(stream.read(4), "big")
                if size > _MAX_VALUE_SIZE:
                    raise _corrupt("a row is too long")
                batch.append(dict(zip(columns, _decode_row(stream.read(size), len(columns)), strict=True)))
                count += 1
                if count > rows:
                    raise _corrupt(f"section {name} holds more rows than its header says")
                if len(batch) >= BATCH_ROWS:
                    yield table, info, batch
                    batch = []
            elif record == _REC_SECTION_END:
                if int.from_bytes(stream.read(8), "big") != count or count != rows:
                    raise _corrupt(f"section {name} holds {count} rows, its header says {rows}")
                yield table, info, batch
                break
            else:
                raise _corrupt(f"unexpected record in section {name}")
    if stream.read(1) != _REC_END:
        raise _corrupt("the end record is missing")
    stream.finish()


@contextlib.contextmanager
def _open_backup_file(path: Path) -> Iterator[IO[bytes]]:
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise BackupError(f"backup file {path} does not exist; check --from") from None
    except IsADirectoryError:
        raise BackupError(f"{path} is a directory; give the backup file with --from") from None
    except OSError as exc:
        raise BackupError(f"cannot read backup file {path} ({exc.strerror}); check its permissions") from None
    with fh:
        yield fh


class SealedBackup:
    """A backup file whose header authenticated under its key (`open_sealed`,
    `open_backup`); its sections are authenticated as they are read."""

    def __init__(self, fh: IO[bytes], path: Path, kind: BackupKind, header: BackupHeader, cipher: BackupCipher):
        self._fh, self._kind, self._header, self._cipher = fh, kind, header, cipher
        self.path = path
        self.version = header.version
        self.fields = header.fields
        self.tables: list[tuple[str, int]] = header.tables

    def sections(self) -> Iterator[tuple[Table, dict[str, Any], list[dict[str, Any]]]]:
        """(table, section info, a batch of rows as dicts) in file order,
        from the start each time it is called; raises BackupError at the
        first thing that is missing, out of place or altered, including
        a file that ends early or goes on after its end."""
        self._fh.seek(self._header.data_offset)
        chunks = _chunks(self._fh, self._cipher, self._header.digest, self._header.chunk_size)
        yield from _sections(_Plaintext(chunks), self.fields, self._kind.metadata)


@contextlib.contextmanager
def open_backup(
    in_path: str | os.PathLike[str], kind: BackupKind, chunk_key: Callable[[BackupHeader], bytes]
) -> Iterator[SealedBackup]:
    """Open a backup of `kind` of any format this release reads.

    The signature, format version, header digest and header fields are
    checked first; then `chunk_key(header)` gives the key the chunks are
    sealed under (it may check the header's fields first and refuse with
    BackupError), and the key check and header tag must hold under it.
    Each failure is one line (BackupError) that says what to do. A product
    that reads only format 2 under its master key uses `open_sealed`."""
    in_path = Path(in_path)
    with _open_backup_file(in_path) as fh:
        header = _read_header(fh, in_path, kind)
        cipher = BackupCipher(chunk_key(header), header.salt)
        _authenticate(cipher, header)
        yield SealedBackup(fh, in_path, kind, header, cipher)


@contextlib.contextmanager
def open_sealed(in_path: str | os.PathLike[str], kind: BackupKind, master: MasterKey) -> Iterator[SealedBackup]:
    """Open a backup of `kind` (format 2) that `master` made: its signature,
    header digest, wrapped backup key, key check and header tag are checked
    here, each failure one line (BackupError) that says what to do."""

    def chunk_key(header: BackupHeader) -> bytes:
        if header.version != FORMAT_VERSION:
            raise _corrupt(f"a {kind.product} backup is never format {header.version}")
        return unwrap_backup_key(master, header.fields, header.salt, kind.magic)

    with open_backup(in_path, kind, chunk_key) as sealed:
        yield sealed


# --- writing a backup -------------------------------------------------------------------


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an output path a backup cannot be written to (no such
    directory, a directory, an existing file without `overwrite`), before
    any work is done; raises BackupError naming --out or --force."""
    if not path.parent.is_dir():
        raise BackupError(f"directory {path.parent} does not exist; create it or choose another --out")
    if path.is_dir():
        raise BackupError(f"{path} is a directory; give a file name with --out")
    if path.exists() and not overwrite:
        raise BackupError(f"{path} exists; choose another --out or give --force to replace it")


@contextlib.contextmanager
def _atomic_output(path: Path, overwrite: bool) -> Iterator[IO[bytes]]:
    """A file at `path` with mode 0600 that appears only complete: written
    under a temporary name in the same directory, synced, then linked (or,
    with overwrite, renamed) into place, and the directory synced."""
    check_output(path, overwrite)
    try:
        with atomic_file(path, 0o600, sync_dir=True, replace=overwrite) as fh:
            yield fh
    except FileExistsError as exc:
        if exc.filename != str(path):
            raise
        raise BackupError(f"{path} appeared while the backup was written; choose another --out") from None


@dataclass(frozen=True)
class Section:
    """One table's part of a backup: `rows` rows in `batches` (each a list
    of rows, values in `table.columns` order), and its autoincrement
    high-water mark (or None). The table need not exist in a database: a
    product may keep other records (files) in sections of their own."""

    table: Table
    rows: int
    batches: Iterable[Sequence[Sequence[Any]]]
    autoincrement: dict[str, Any] | None = None


def table_section(conn: Connection, table: Table, rows: int | None = None) -> Section:
    """A table's section, read in the transaction of `conn` (the snapshot)
    in primary-key order, BATCH_ROWS rows per round trip."""
    if rows is None:
        rows = count_rows(conn, table)

    def batches() -> Iterator[Sequence[Sequence[Any]]]:
        # Run when the writer reaches this section: one open cursor at a time.
        stmt = select(*table.columns).order_by(*table.primary_key.columns)
        yield from conn.execute(stmt.execution_options(yield_per=BATCH_ROWS)).partitions()

    return Section(table, rows, batches(), _high_water(conn, table))


def write_sealed(
    out_path: str | os.PathLike[str],
    kind: BackupKind,
    master: MasterKey,
    fields: dict[str, Any],
    sections: Sequence[Section],
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
) -> tuple[int, int]:
    """Write `sections` to `out_path` (mode 0600, atomically) as a backup of
    this module's format, sealed under a new random backup key that `master`
    wraps into the header. `fields` are the caller's header members (at
    least "schema_revision"; "master_key" names the key for the operator);
    this adds format, tables, KDF, cipher and the wrapped key. Returns
    (file size, chunks). A section whose batches do not hold its declared
    rows is refused and nothing is written."""
    out_path = Path(out_path)
    check_output(out_path, overwrite)
    salt = os.urandom(SALT_SIZE)
    backup_key = os.urandom(BACKUP_KEY_SIZE)
    try:
        wrapped = master.wrap(backup_key, backup_key_context(salt, kind.magic))
    except MasterKeyError as exc:
        raise BackupError(f"{exc}; nothing was written") from None
    cipher = BackupCipher(backup_key, salt)
    header = {
        **fields,
        "format": FORMAT_VERSION,
        "tables": [{"name": s.table.name, "rows": s.rows} for s in sections],
        "kdf": {"name": "HKDF-SHA256", "info": HKDF_INFO.decode(), "salt": salt.hex()},
        "cipher": {"name": "AES-256-GCM", "chunk_size": CHUNK_SIZE},
        "backup_key": {"wrapped": wrapped.hex()},
    }
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    prefix = _PREFIX.pack(kind.magic, FORMAT_VERSION, len(body)) + body
    digest = hashlib.sha256(prefix).digest()
    total = sum(s.rows for s in sections)
    done = 0
    if progress:
        progress(0, total)
    with _atomic_output(out_path, overwrite) as fh:
        fh.write(prefix + digest + cipher.key_check() + cipher.header_tag(prefix))
        writer = _ChunkWriter(fh, cipher, digest, CHUNK_SIZE)
        for section in sections:
            table = section.table
            columns = [c.name for c in table.columns]
            writer.write(
                _section_record(
                    {
                        "table": table.name,
                        "columns": columns,
                        "rows": section.rows,
                        "autoincrement": section.autoincrement,
                    }
                )
            )
            written = 0
            for rows in section.batches:
                out = bytearray()
                for row in rows:
                    out += _row_record(row)
                writer.write(out)
                written += len(rows)
                done += len(rows)
                if progress:
                    progress(done, total)
            if written != section.rows:  # pragma: no cover - the snapshot prevents it
                raise BackupError(f"{table.name} changed during the backup; the database gave no snapshot")
            writer.write(_REC_SECTION_END + written.to_bytes(8, "big"))
        writer.write(_REC_END)
        writer.close()
        size = fh.tell()
    return size, writer.chunks
