"""Errors a user can cause. The CLI turns them into one line and exit status 2."""

from __future__ import annotations

from pathlib import Path


class MTLRecError(Exception):
    """A mistake in the user's input: a file, column, row, key or name that is wrong.

    The message must name the offending thing so the user can fix it without a traceback.
    """


class ConfigError(MTLRecError):
    """An unknown or ill-typed configuration key."""


class DataError(MTLRecError):
    """A malformed data file, a missing column, a bad label or value."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty): what a
    one-line error shows of a library's multi-line message."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def make_dir(path: Path, what: str) -> Path:
    """``mkdir -p path``; a path through a file (``--out data.csv/run``) or without permission
    is a :class:`ConfigError` naming ``what`` (the option) and the path, not an OSError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{what} {path}: cannot create the folder ({exc.strerror or first_line(exc)})"
        ) from exc
    return path
