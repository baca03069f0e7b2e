"""Flows that do not pass yet, with the reason (docs/conformance.md lists
the same). The pytest module marks these xfail(strict=True); `make
conformance` says when one starts passing or another stops."""

from __future__ import annotations

KNOWN: dict[str, str] = {}


def reason_for(name: str) -> str:
    return KNOWN.get(name, "")
