"""Atomic writes: a crash mid-write never leaves a half-written checkpoint or result file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates the file readable by its owner only; a run directory's files get the
        # mode any other file would (umask), so e.g. a serving account can read model.pt
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj: Any, path: str | Path) -> None:
    _atomic(Path(path), lambda fh: torch.save(obj, fh))


def save_json(obj: Any, path: str | Path) -> None:
    data = json.dumps(obj, indent=2, default=_jsonable).encode()
    _atomic(Path(path), lambda fh: fh.write(data))


def save_text(text: str, path: str | Path) -> None:
    _atomic(Path(path), lambda fh: fh.write(text.encode()))


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
