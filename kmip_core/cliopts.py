"""One command-line convention for every console script (issue 17, point 5).

`conventions(parser, ...)` is applied to a finished argparse parser:

- global options are accepted before and after the subcommand:
  `vtpm-broker --config F admin list` and `vtpm-broker admin list --config F`;
  `everywhere` options are defined on the top-level parser and copied into
  every subcommand; `where_defined` options are defined by some subcommands
  and copied to the top level, where giving one to a subcommand that does not
  take it is a usage error (never silently ignored);
- `--version` prints "<prog> <version>";
- `log_level=True` adds `--log-level` (DEBUG, INFO, WARNING, ERROR; before or
  after the command) to a tool that has no logging configuration of its own:
  its log records go to stderr from that level on (without it, warnings and
  errors only, as Python's logging does by default);
- a usage error is one line that says where to look, not a usage block:
  "<prog>: error: <problem>; see '<prog> ... --help'" (exit status 2), for
  parsers that do not already handle their errors.

A value given after the subcommand wins over one given before it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NoReturn

__all__ = ["conventions", "parsers"]

_ACCEPTS = "_cli_global_accepts"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and every subcommand's parser below it, each once, depth first."""
    seen: set[int] = set()
    stack = [parser]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(reversed(list(action.choices.values())))


def _children(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [
        child
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for child in action.choices.values()
    ]


def _option(parser: argparse.ArgumentParser, name: str) -> argparse.Action | None:
    return parser._option_string_actions.get(name)


def _clone(target: argparse.ArgumentParser, action: argparse.Action, default: Any) -> None:
    kwargs: dict[str, Any] = {"dest": action.dest, "default": default, "help": action.help}
    if isinstance(action, argparse._StoreTrueAction):
        kwargs["action"] = "store_true"
    elif isinstance(action, argparse._StoreFalseAction):
        kwargs["action"] = "store_false"
    elif isinstance(action, argparse._StoreAction):
        kwargs.update(type=action.type, metavar=action.metavar, choices=action.choices, nargs=action.nargs)
    else:  # pragma: no cover - only store options are global
        raise TypeError(f"cannot copy the option {action.option_strings} ({type(action).__name__})")
    target.add_argument(*action.option_strings, **kwargs)


def _one_line_error(parser: argparse.ArgumentParser, prog: str) -> None:
    def error(message: str) -> NoReturn:
        parser.exit(2, f"{prog}: error: {message}; see '{parser.prog} --help'\n")

    parser.error = error  # type: ignore[method-assign]  # this one parser's error(), replaced on purpose


def conventions(
    parser: argparse.ArgumentParser,
    *,
    version: str,
    everywhere: Iterable[str] = (),
    where_defined: Iterable[str] = (),
    log_level: bool = False,
) -> argparse.ArgumentParser:
    """Apply the convention to `parser` (see the module's docstring); returns it."""
    prog = parser.prog.split()[0]
    everywhere, where_defined = tuple(everywhere), tuple(where_defined)
    if log_level:
        parser.add_argument(
            "--log-level",
            type=str.upper,
            choices=LOG_LEVELS,
            help="log records to stderr from this level on (default: warnings and errors)",
        )
        everywhere += ("--log-level",)
    if "--version" not in parser._option_string_actions:
        parser.add_argument("--version", action="version", version=f"{prog} {version}", help="print the version and exit")
    tree = list(parsers(parser))
    below = tree[1:]

    for name in everywhere:
        template = _option(parser, name)
        if template is None:
            raise ValueError(f"{prog}: the global option {name} is not defined on the top-level parser")
        for sub in below:
            existing = _option(sub, name)
            if existing is None:
                _clone(sub, template, argparse.SUPPRESS)
            else:
                existing.default = argparse.SUPPRESS

    for name in where_defined:
        holders = [sub for sub in below if _option(sub, name) is not None]
        if not holders:
            continue
        if _option(parser, name) is None:
            template = _option(holders[0], name)
            assert template is not None
            empty = False if isinstance(template, argparse._StoreTrueAction) else None
            _clone(parser, template, empty)
            top = _option(parser, name)
            assert top is not None
            top.help = f"{template.help or name}; given before the command, for the commands that take it"
        for sub in holders:
            action = _option(sub, name)
            assert action is not None
            action.default = argparse.SUPPRESS
            if action.required:  # checked by `check` below, wherever it was given
                action.required = False
                sub.set_defaults(**{f"_cli_required_{action.dest}": name})
        for sub in below:
            accepts = set(sub._defaults.get(_ACCEPTS, ()))
            if _option(sub, name) is not None:
                accepts.add(name)
            sub.set_defaults(**{_ACCEPTS: frozenset(accepts)})

    for each in tree:
        if type(each).error is argparse.ArgumentParser.error:
            _one_line_error(each, prog)

    if where_defined or log_level:
        _check_after_parse(parser, where_defined, prog if log_level else None)
    return parser


def _check_after_parse(parser: argparse.ArgumentParser, names: tuple[str, ...], log_prog: str | None) -> None:
    """Refuse a top-level option the chosen subcommand does not take; apply --log-level."""
    parse_known_args = parser.parse_known_args
    top = {name: _option(parser, name) for name in names}

    def checked(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        result, extras = parse_known_args(args, namespace)
        accepts = getattr(result, _ACCEPTS, None)
        if accepts is not None:
            for name, action in top.items():
                assert action is not None
                value = getattr(result, action.dest, action.default)
                if name not in accepts and value not in (None, False):
                    parser.error(f"this command does not take {name}")
        for key in [k for k in vars(result) if k.startswith("_cli_required_")]:
            name = getattr(result, key)
            delattr(result, key)
            action = top.get(name)
            if action is not None and getattr(result, action.dest, None) in (None, False):
                parser.error(f"the following arguments are required: {name}")
        if hasattr(result, _ACCEPTS):
            delattr(result, _ACCEPTS)
        level = getattr(result, "log_level", None) if log_prog is not None else None
        if level:  # without it, logging is left as it was (warnings and errors, bare, on stderr)
            logging.basicConfig(format=f"{log_prog}: %(levelname)s %(name)s: %(message)s")
            logging.getLogger().setLevel(level)
        return result, extras

    # This one parser's, wrapped on purpose; typeshed declares it as overloads.
    parser.parse_known_args = checked  # type: ignore[method-assign, assignment]
