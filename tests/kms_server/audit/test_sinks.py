"""The SIEM sinks on real sockets and files: RFC 5424 messages over UDP and
over TCP with octet counting (RFC 6587), JSON lines, a full queue drops and
counts instead of blocking, and a sink that fails is counted and recovers."""

from __future__ import annotations

import json
import socket
import threading
import time

from kms_server.audit import sinks
from kms_server.audit.trail import AuditTrail
from kms_server.storage.memory import MemoryStorage


def records(n: int):
    trail = AuditTrail(MemoryStorage(), "node-1")
    return [
        trail.write(
            {
                "event": "request",
                "operation": "GET",
                "uid": f"key-{i}",
                "client": {"name": 'alice "the] admin'},
                "object": {"x-Name": "test01", "x-Component": "Virtual Machine"},
                "result": {"status": "SUCCESS" if i % 2 == 0 else "OPERATION_FAILED", "reason": None if i % 2 == 0 else "ITEM_NOT_FOUND"},
            }
        )
        for i in range(n)
    ]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_syslog_message_is_rfc5424_with_structured_data_and_the_record():
    record = records(2)[1]
    message = sinks.syslog_message(record, "kms-host")
    header, _, msg = message.partition(b"\xef\xbb\xbf")
    assert header.startswith(b"<84>1 ")  # authpriv.warning for a refusal
    fields = header.decode().split(" ", 7)
    assert fields[2] == "kms-host" and fields[3] == "kms-server" and fields[4] == "-" and fields[5] == "GET"
    sd = fields[6] + " " + fields[7]
    assert sd.startswith("[kms@32473 seq=\"2\"")
    assert 'client="alice \\"the\\] admin"' in sd and 'reason="ITEM_NOT_FOUND"' in sd and 'xName="test01"' in sd
    body = json.loads(msg)
    assert body["seq"] == 2 and body["hash"] == record.hash
    assert sinks.syslog_message(records(1)[0], "h").startswith(b"<86>1 ")  # authpriv.info for a success


def test_udp_and_tcp_syslog_and_jsonl_receive_every_record(tmp_path):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(10)
    listener = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def serve():
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    threading.Thread(target=serve, daemon=True).start()
    fanout = sinks.Fanout(
        [
            sinks.SyslogSink(f"udp://127.0.0.1:{udp.getsockname()[1]}"),
            sinks.SyslogSink(f"tcp://127.0.0.1:{listener.getsockname()[1]}"),
            sinks.JsonLinesSink(tmp_path / "audit.jsonl"),
        ]
    )
    batch = records(5)
    for record in batch:
        fanout.publish(record)
    datagrams = [udp.recv(65536) for _ in batch]
    fanout.close()
    wait_for(lambda: received.count(b"[kms@32473") == 5)
    # Octet counting: "LEN SP MSG" back to back.
    frames, rest = [], bytes(received)
    while rest:
        length, _, rest = rest.partition(b" ")
        frames.append(rest[: int(length)])
        rest = rest[int(length) :]
    assert frames == datagrams == [sinks.syslog_message(r, fanout.sinks[0].hostname) for r in batch]
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3, 4, 5]
    assert all((s.sent, s.dropped, s.failed) == (5, 0, 0) for s in fanout.sinks)


class StuckSink(sinks.Sink):
    name = "stuck"

    def __init__(self):
        self.release_event = threading.Event()
        self.returned = 0  # sends that ended
        super().__init__()

    def send(self, record):
        self.release_event.wait(10)
        self.returned += 1


def test_a_stuck_sink_never_blocks_publishing_and_counts_what_it_drops(monkeypatch):
    monkeypatch.setattr(sinks, "QUEUE_SIZE", 3)
    sink = StuckSink()
    batch = records(10)
    for record in batch:
        sink.submit(record)
    # Every submit returned while the sink's first send was still stuck
    # (it ends only once released below, or after 10 s): publishing never
    # waits for a sink.
    assert sink.returned == 0
    assert sink.dropped >= 6
    sink.release_event.set()
    sink.close()
    assert sink.sent + sink.dropped == 10


def test_a_failing_sink_is_counted_and_recovers(tmp_path, caplog):
    target = tmp_path / "missing-dir" / "audit.jsonl"
    sink = sinks.JsonLinesSink(target)
    batch = records(4)
    sink.submit(batch[0])
    wait_for(lambda: sink.failed == 1)
    target.parent.mkdir()
    for record in batch[1:]:
        sink.submit(record)
    sink.close()
    assert sink.failed == 1 and sink.sent == 3
    assert [json.loads(line)["seq"] for line in target.read_text().splitlines()] == [2, 3, 4]
    assert "audit sink jsonl failed" in caplog.text and "works again" in caplog.text
