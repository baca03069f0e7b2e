"""The one percentile every benchmark here reports (bench/README.md, "How
the figures are computed")."""

from __future__ import annotations

from collections.abc import Iterable


def percentile(values: Iterable[float], q: float, default: float | None = None) -> float | None:
    """The q-quantile (0 <= q <= 1) of `values` by linear interpolation
    between the two closest ranks: numpy's default ("linear", Hyndman and
    Fan's type 7). `default` when there are no values."""
    data = sorted(values)
    if not data:
        return default
    pos = (len(data) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)
