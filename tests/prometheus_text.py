"""Reading Prometheus text exposition in tests (the monitoring listener's
/metrics, tests/integration/test_metrics*.py)."""

from __future__ import annotations

import re


def metric_names(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when the series is not there yet)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, label_text = head.partition("{")
        if series != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0
