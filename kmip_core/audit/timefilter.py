"""How an operator writes a moment in an audit filter (--since, --until).

Both services' audit commands and the KMS's audit page read times this way.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

__all__ = ["parse_time"]

_AGE = re.compile(r"^(\d+)\s*([smhd])$")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """Epoch seconds; an ISO 8601 date or time (UTC unless it names a
    zone); or an age such as 30m, 12h, 7d. Raises ValueError."""
    text = text.strip()
    age = _AGE.match(text)
    if age:
        return (time.time() if now is None else now) - int(age.group(1)) * _AGE_SECONDS[age.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace(" ", "T").replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use ISO 8601 such as 2026-11-26T18:00Z, epoch seconds, or an age such as 12h)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
