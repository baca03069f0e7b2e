"""Continuous export of the audit trail to a SIEM: a JSON-lines file and
syslog (RFC 5424, over UDP, or TCP with octet-counting framing, RFC 6587).

Records reach the sinks after their transaction committed. Each sink has a
bounded queue and a thread of its own, so a slow or failing sink never
blocks a request: when its queue is full the record is dropped there and
counted, and failures are logged (once per failure streak) and counted.
The trail in the database stays complete either way; `kms-admin audit
export` recovers what a sink missed.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from kms_server.storage.base import StoredAuditRecord

log = logging.getLogger("kms_server.audit.sinks")

QUEUE_SIZE = 10_000
# RFC 5424: facility 10 (security/authorization, "authpriv"); severity 6
# (informational) for successes, 4 (warning) for refusals.
FACILITY = 10
_SD_ID = "kms@32473"  # 32473: the example enterprise number of RFC 5612


def record_json(record: StoredAuditRecord) -> dict:
    body = json.loads(record.body)
    body["hash"] = record.hash
    return body


class Sink:
    name = "sink"

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self._failing = False
        self._thread = threading.Thread(target=self._run, name=f"audit-sink-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, record: StoredAuditRecord) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("audit sink %s is not keeping up: %d records dropped so far", self.name, self.dropped)

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            try:
                self.send(record)
                self.sent += 1
                if self._failing:
                    log.warning("audit sink %s works again", self.name)
                    self._failing = False
            except Exception as exc:
                self.failed += 1
                if not self._failing:
                    log.error("audit sink %s failed (record %d not delivered): %s", self.name, record.seq, exc)
                    self._failing = True

    def send(self, record: StoredAuditRecord) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to `timeout`), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self.release()

    def release(self) -> None:
        pass


class JsonLinesSink(Sink):
    """One JSON object per line, appended and flushed per record."""

    name = "jsonl"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: TextIO | None = None
        super().__init__()

    def send(self, record: StoredAuditRecord) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across records
        try:
            self._file.write(json.dumps(record_json(record), ensure_ascii=False, sort_keys=True) + "\n")
            self._file.flush()
        except OSError:
            self._file.close()
            self._file = None
            raise

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _sd_value(value) -> str:
    # RFC 5424, 6.3.3: escape '"', '\\' and ']' in PARAM-VALUE.
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(record: StoredAuditRecord, hostname: str, app: str = "kms-server") -> bytes:
    """One RFC 5424 message: structured data carries the searchable fields,
    the MSG part the whole record as JSON."""
    body = record_json(record)
    severity = 6 if record.result == "SUCCESS" else 4
    pri = FACILITY * 8 + severity
    params = {
        "seq": record.seq,
        "node": record.node,
        "operation": record.operation,
        "uid": record.uid,
        "client": record.client,
        "result": record.result,
        "reason": (body.get("result") or {}).get("reason"),
        "xName": record.x_name,
        "xIdentifier": record.x_identifier,
        "xComponent": record.x_component,
    }
    sd = "[" + _SD_ID + "".join(f' {k}="{_sd_value(v)}"' for k, v in params.items() if v is not None) + "]"
    timestamp = body.get("time", "-")
    msgid = (record.operation or "-").replace(" ", "_")[:32] or "-"
    header = f"<{pri}>1 {timestamp} {hostname[:255] or '-'} {app} - {msgid} {sd} "
    msg = json.dumps(body, ensure_ascii=False, sort_keys=True)
    return header.encode("ascii", "replace") + b"\xef\xbb\xbf" + msg.encode("utf-8")


class SyslogSink(Sink):
    name = "syslog"

    def __init__(self, url: str, hostname: str | None = None):
        parts = urlsplit(url)
        self.transport = parts.scheme
        self.address = (parts.hostname, parts.port)
        self.hostname = hostname or socket.gethostname()
        self._sock: socket.socket | None = None
        super().__init__()

    def _connect(self):
        host = self.address[0]
        if host is None:  # the configuration's check refuses such a URL
            raise OSError("the syslog URL names no host")
        if self.transport == "udp":
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(self.address)
        else:
            sock = socket.create_connection(self.address, timeout=5)
        return sock

    def send(self, record: StoredAuditRecord) -> None:
        message = syslog_message(record, self.hostname)
        if self._sock is None:
            self._sock = self._connect()
        try:
            if self.transport == "udp":
                self._sock.send(message)
            else:
                self._sock.sendall(str(len(message)).encode() + b" " + message)
        except OSError:
            self._sock.close()
            self._sock = None
            raise

    def release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Fanout:
    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def publish(self, record: StoredAuditRecord) -> None:
        for sink in self.sinks:
            sink.submit(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def stats(self) -> dict[str, dict[str, int]]:
        return {s.name: {"sent": s.sent, "dropped": s.dropped, "failed": s.failed} for s in self.sinks}


def build(audit_cfg) -> Fanout | None:
    sinks: list[Sink] = []
    if audit_cfg.jsonl_file is not None:
        sinks.append(JsonLinesSink(audit_cfg.jsonl_file))
    if audit_cfg.syslog is not None:
        sinks.append(SyslogSink(audit_cfg.syslog))
    return Fanout(sinks) if sinks else None
