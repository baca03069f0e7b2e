"""The configuration framework both services use: TOML, validated once.

A service describes its file with a `Schema` (section -> key -> (validator,
default)); `merge_sources` takes each key from the first source that has it
(command-line overrides, then the file, then the default) and validates it.
Secrets are given as file paths only, never read here. Relative paths in the
file resolve against the file's directory, relative flags against the working
directory. The validators below are the shared vocabulary of both services'
schemas; every failure is a `ConfigError` with a one-line message naming the
key and the fix.
"""

from __future__ import annotations

import difflib
import json
import os
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "DERIVED",
    "IDENTITY_MODES",
    "LOG_LEVELS",
    "TLS_VERSIONS",
    "ConfigError",
    "Required",
    "Schema",
    "Source",
    "TlsConfig",
    "Validator",
    "boolean",
    "check_file",
    "check_shape",
    "choice",
    "db_url",
    "format_settings",
    "identities",
    "int_between",
    "invalid",
    "merge_sources",
    "nonempty_str",
    "path_value",
    "plain_value",
    "port_number",
    "positive_seconds",
    "redact_url",
    "syslog_url",
    "toml_value",
]


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming key and fix."""


IDENTITY_MODES = ("cn", "subject", "fingerprint")
TLS_VERSIONS = ("1.2", "1.3")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None
    key: Path | None
    ca: Path | None
    trusted_clients_dir: Path
    identity: str
    min_version: str


def check_file(key: str, path: Path, *, secret: bool) -> list[str]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [f"{key} {path} does not exist; create it or fix the path"]
    except OSError as exc:
        return [
            f"{key} {path} cannot be examined ({exc.strerror}); fix the path or permissions"
        ]
    if not stat.S_ISREG(st.st_mode):
        return [f"{key} {path} is not a regular file; point it at a file"]
    if not os.access(path, os.R_OK):
        return [
            f"{key} {path} is not readable by this user; fix its owner or permissions"
        ]
    if secret and st.st_mode & 0o007:
        return [f"{key} {path} is accessible by other users; run: chmod 600 {path}"]
    return []


def plain_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def redact_url(url: str) -> str:
    # Passwords are refused at load time; this is defence in depth for logs.
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


# --- Loading -----------------------------------------------------------------


class Source:
    """Where a raw value came from, which decides how relative paths resolve."""

    def __init__(self, base: Path, origin: str) -> None:
        self.base = base
        self.origin = origin


Validator = Callable[[str, Any, Source], Any]


def invalid(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"config: {key} must be {expected} (got {value!r})")


def int_between(lo: int, hi: int) -> Validator:
    def check(key: str, value: Any, src: Source) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not lo <= value <= hi
        ):
            raise invalid(key, f"an integer between {lo} and {hi}", value)
        return value

    return check


def positive_seconds(maximum: float) -> Validator:
    def check(key: str, value: Any, src: Source) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid(
                key,
                f"a number of seconds between 0 and {maximum:g}, such as 30.0",
                value,
            )
        if not 0 < value <= maximum:
            raise invalid(
                key,
                f"a number of seconds greater than 0 and at most {maximum:g}",
                value,
            )
        return float(value)

    return check


def port_number(key: str, value: Any, src: Source) -> int:
    # 0 asks the OS for a free port: tests and one-off runs use it.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise invalid(
            key, "an integer between 1 and 65535, or 0 for any free port", value
        )
    return value


def syslog_url(key: str, value: Any, src: Source) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    try:
        port = parts.port if parts is not None else None
    except ValueError:
        port = None
    if parts is None or parts.scheme not in ("udp", "tcp") or not parts.hostname or port is None:
        raise invalid(key, 'a syslog address such as "udp://127.0.0.1:514" or "tcp://siem.example:6514"', value)
    return value


def nonempty_str(key: str, value: Any, src: Source) -> str:
    if not isinstance(value, str) or not value.strip():
        raise invalid(key, "a non-empty string", value)
    return value


def boolean(key: str, value: Any, src: Source) -> bool:
    if not isinstance(value, bool):
        raise invalid(key, "true or false", value)
    return value


def choice(options: tuple[str, ...], *, upper: bool = False) -> Validator:
    shown = " or ".join(f'"{o}"' for o in options)

    def check(key: str, value: Any, src: Source) -> str:
        if isinstance(value, str):
            candidate = value.upper() if upper else value
            if candidate in options:
                return candidate
        raise invalid(key, f"one of {shown} (a quoted string)", value)

    return check


def path_value(key: str, value: Any, src: Source) -> Path:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise invalid(key, "a file path as a non-empty string", value)
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = src.base / p
    return Path(os.path.normpath(p))


def identities(key: str, value: Any, src: Source) -> tuple[str, ...]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(
        isinstance(v, str) and v.strip() for v in value
    ):
        raise invalid(
            key, 'a list of client identities, such as ["admin1", "admin2"]', value
        )
    return tuple(value)


def db_url(key: str, value: Any, src: Source) -> str:
    if not isinstance(value, str) or "://" not in value:
        raise invalid(key, 'a database URL such as "sqlite:///var/kms.db"', value)
    parts = urlsplit(value)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql"):
        raise invalid(key, "a sqlite:// or postgresql:// URL", value)
    if parts.password is not None:
        raise ConfigError(
            f"config: {key} must not contain a password; use a PostgreSQL passfile "
            "(PGPASSFILE or ?passfile=<path>) or client certificates instead"
        )
    if scheme == "sqlite":
        return resolve_sqlite_url(value, src)
    return value


def resolve_sqlite_url(url: str, src: Source) -> str:
    # SQLAlchemy would resolve a relative SQLite path against the process's
    # working directory; resolve it like every other path in the file.
    prefix, sep, rest = url.partition(":///")
    if not sep:
        return url
    db_path, q, query = rest.partition("?")
    if not db_path or db_path == ":memory:" or db_path.startswith("/"):
        return url
    resolved = os.path.normpath(src.base / db_path)
    return f"{prefix}:///{resolved}{q}{query}"


# A schema maps section -> key -> (validator, default). A default of DERIVED
# is left for the caller to fill in once the other values are known (most
# derive from a data_dir); None means unset; a Required default means the key
# has no default and must be given.
DERIVED = object()


class Required:
    """The default of a key that must be set; ``example`` is the value shown
    in the error message, such as ``'"kms-prod" (your key provider name)'``."""

    def __init__(self, example: str) -> None:
        self.example = example


Schema = dict[str, dict[str, tuple[Validator, Any]]]



def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}known: {', '.join(known)}"


def check_shape(schema: Schema, raw: Any, origin: str) -> dict[str, dict[str, Any]]:
    """``raw`` (a parsed file or the overrides) checked against ``schema``:
    only known sections, each a table, holding only known keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {origin} must be a table of sections")
    for section, table in raw.items():
        if section not in schema:
            raise ConfigError(
                f"config: unknown section [{section}] in {origin}; "
                f"{suggest(section, list(schema))}"
            )
        if not isinstance(table, dict):
            raise ConfigError(
                f"config: [{section}] in {origin} must be a table of keys, "
                f"such as [{section}] on its own line (got {table!r})"
            )
        for key in table:
            if key not in schema[section]:
                raise ConfigError(
                    f"config: unknown key {section}.{key} in {origin}; "
                    f"{suggest(key, list(schema[section]))}"
                )
    return raw


def read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"config: file {path} does not exist; pass an existing file with --config"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"config: {path} is a directory; pass a TOML file") from None
    except OSError as exc:
        raise ConfigError(
            f"config: cannot read {path} ({exc.strerror}); check the path and permissions"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config: {path} is not valid TOML ({exc}); fix the syntax"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"config: {path} is not UTF-8 text; save it as UTF-8"
        ) from None


def merge_sources(
    schema: Schema,
    path: str | os.PathLike[str] | None,
    overrides: dict[str, dict[str, Any]] | None,
) -> tuple[dict[str, dict[str, Any]], Path | None]:
    """Every key of ``schema`` validated from the first source that has it:
    command-line ``overrides`` (None values skipped), then the TOML file at
    ``path``, then the default. Relative paths resolve against the working
    directory for flags, the file's directory for the file, and the file's
    directory (or the working directory without a file) for defaults.
    DERIVED and None defaults are left as they are for the caller; a missing
    Required key is an error. Returns the values and the file's absolute path.
    """
    cwd_source = Source(Path.cwd(), "command-line flags")
    file_source: Source | None = None
    raw_file: dict[str, dict[str, Any]] = {}
    source_path: Path | None = None
    if path is not None:
        source_path = Path(os.path.abspath(os.fspath(path)))
        file_source = Source(source_path.parent, str(source_path))
        raw_file = check_shape(schema, read_file(source_path), str(source_path))
    raw_overrides = {
        section: {k: v for k, v in table.items() if v is not None}
        for section, table in check_shape(
            schema, overrides or {}, "command-line flags"
        ).items()
    }
    default_source = file_source or cwd_source

    values: dict[str, dict[str, Any]] = {}
    for section, keys in schema.items():
        values[section] = {}
        for key, (validate, default) in keys.items():
            dotted = f"{section}.{key}"
            if key in raw_overrides.get(section, {}):
                values[section][key] = validate(
                    dotted, raw_overrides[section][key], cwd_source
                )
            elif key in raw_file.get(section, {}):
                assert file_source is not None
                values[section][key] = validate(
                    dotted, raw_file[section][key], file_source
                )
            elif isinstance(default, Required):
                raise ConfigError(
                    f"config: {dotted} is required; "
                    f"add {key} = {default.example} to [{section}]"
                )
            elif default is DERIVED or default is None:
                values[section][key] = default
            else:
                values[section][key] = validate(dotted, default, default_source)
    return values, source_path


# --- Display -----------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot show {value!r} as TOML")


def format_settings(
    source: Path | None,
    redacted: dict[str, dict[str, Any]],
    secret_keys: frozenset[tuple[str, str]],
) -> str:
    """Settings (a ``redacted()`` result) as TOML text, safe to print.

    Keys in ``secret_keys`` name secret files: they appear by path with a
    comment, their contents never read. Unset optional settings appear as
    comments, since TOML has no null. ``source`` is the file they came from.
    """
    lines: list[str] = []
    if source is not None:
        lines.append(f"# effective configuration from {source}")
    else:
        lines.append("# effective configuration (no file; defaults and flags)")
    for section, table in redacted.items():
        lines.append("")
        lines.append(f"[{section}]")
        for key, value in table.items():
            if value is None:
                lines.append(f"# {key} is not set")
                continue
            line = f"{key} = {toml_value(value)}"
            if (section, key) in secret_keys:
                line += "  # (secret file, contents not shown)"
            lines.append(line)
    return "\n".join(lines) + "\n"
