"""The one error every kms-admin command raises for an operator mistake."""

from __future__ import annotations

__all__ = ["CommandError"]


class CommandError(Exception):
    """An operator error found by a handler; message is 'problem; fix'."""
