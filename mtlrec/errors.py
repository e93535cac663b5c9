"""Errors a user can cause. The CLI turns them into one line and exit status 2."""

from __future__ import annotations


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
