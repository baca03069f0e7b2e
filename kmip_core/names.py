"""The one rule for the names people give things: KMS client names (which
become file names under the PKI directory), the broker's key provider name,
and the names of management instances and hosts (checked by the broker, the
management client and the host agent alike).

A name is 1 to `max_length` characters (64 unless a caller says otherwise):
ASCII letters, digits, '.', '_' and '-', starting with a letter or digit. So
it is never empty, never starts with '.' or '-' (no hidden file, no option),
and holds no '/', space or control character.

Each caller keeps its own exception and message; `check_name` hands it the
rule in words (`name_rule`) so the message states the limit the check used.
Standard library only: light tools import it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection
from typing import TypeGuard

__all__ = ["MAX_NAME_LENGTH", "check_name", "is_name", "name_rule"]

MAX_NAME_LENGTH = 64


@functools.cache
def _pattern(max_length: int) -> re.Pattern[str]:
    if max_length < 1:
        raise ValueError("a name's maximum length is at least 1")
    return re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{max_length - 1}}}\Z")


def is_name(value: object, max_length: int = MAX_NAME_LENGTH) -> TypeGuard[str]:
    """Whether `value` is a str that follows the rule."""
    return isinstance(value, str) and _pattern(max_length).match(value) is not None


def name_rule(max_length: int = MAX_NAME_LENGTH) -> str:
    """The rule in the words of the messages: "1-64 letters, digits, '.', '_' or '-'"."""
    return f"1-{max_length} letters, digits, '.', '_' or '-'"


def check_name(
    value: object,
    refuse: Callable[[str], Exception],
    *,
    max_length: int = MAX_NAME_LENGTH,
    reserved: Collection[str] = (),
) -> str:
    """`value` if it is a name (`is_name`) and none of `reserved` (lowercase
    names, compared case-insensitively); otherwise raise ``refuse(rule)``,
    the caller's exception with its message, given ``name_rule(max_length)``."""
    if is_name(value, max_length) and value.lower() not in reserved:
        return value
    raise refuse(name_rule(max_length))
