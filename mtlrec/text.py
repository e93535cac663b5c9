"""Docstrings as one-line descriptions (``mtlrec list``)."""

from __future__ import annotations


def summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line: a first sentence wrapped over two source lines
    stays whole (its first line alone ended mid-sentence in ``mtlrec list models``)."""
    lines = []
    for line in (doc or "").strip().splitlines():
        if not line.strip():
            break
        lines.append(line.strip())
    return " ".join(lines)
