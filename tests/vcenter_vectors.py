"""Requests and responses of the captured vCenter sessions
(../shared/vectors/vcenter/, see its README): each request is the 8-byte
header line followed by the body line; responses are whole."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

VECTOR_DIR = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "vcenter"
_LINE = re.compile(r" - (kmip\.server\.session\.\w+) - DEBUG - (Request|Response) encoding: b'([0-9a-f]+)'")


@dataclass
class Exchange:
    session: str
    request: bytes
    response: bytes | None


def load(name: str = "vcenter-7.0.3-session.log") -> list[Exchange]:
    path = VECTOR_DIR / name
    if not path.exists():
        # CI lays shared/ beside the clone; a developer checkout may sit elsewhere.
        alt = Path("/work/shared/vectors/vcenter") / name
        path = alt
    exchanges: list[Exchange] = []
    pending: dict[str, bytes] = {}
    for line in path.read_text().splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        session, kind, hexdata = m.groups()
        data = bytes.fromhex(hexdata)
        if kind == "Request":
            if len(data) == 8:
                pending[session] = data
            else:
                exchanges.append(Exchange(session, pending.pop(session, b"") + data, None))
        else:
            for ex in reversed(exchanges):
                if ex.session == session and ex.response is None:
                    ex.response = data
                    break
    return exchanges
