"""Find a dataset file locally, or download it once into a cache, checking its SHA-256.

Lookup order: ``$MTLREC_DATA_DIR/<folder>/<file>``, then ``$MTLREC_CACHE`` (default
``~/.cache/mtlrec``)/<folder>/<file>, then the URL (written atomically into the cache).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mtlrec.errors import DataError


@dataclass(frozen=True)
class RemoteFile:
    folder: str
    name: str
    url: str | None = None
    sha256: str | None = None  # of the file as downloaded
    content_sha256: str | None = None  # of the decompressed content, for .gz files
    # Without a checksum (copies differ in a header line): the number of data lines, not blank
    # and not starting with '|', that a complete download has.
    data_lines: int | None = None


def data_dir() -> Path | None:
    value = os.environ.get("MTLREC_DATA_DIR")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    return Path(os.environ.get("MTLREC_CACHE", Path.home() / ".cache" / "mtlrec")).expanduser()


def sha256_of(path: Path, gunzip: bool = False) -> str:
    digest = hashlib.sha256()
    with gzip.open(path, "rb") if gunzip else path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def locate(remote: RemoteFile, verify: bool = False) -> Path:
    """Return a local path to ``remote``, downloading it into the cache if needed."""
    candidates = []
    if data_dir() is not None:
        candidates.append(data_dir() / remote.folder / remote.name)
    candidates.append(cache_dir() / remote.folder / remote.name)
    for path in candidates:
        if path.is_file():
            if verify and remote.sha256 and sha256_of(path) != remote.sha256:
                raise DataError(f"{path}: checksum mismatch (expected sha256 {remote.sha256})")
            return path
    if not remote.url:
        raise DataError(
            f"{remote.folder}/{remote.name} not found in MTLREC_DATA_DIR ({data_dir()}) or the "
            f"cache ({cache_dir()}), and it has no public download URL: place the file there"
        )
    return download(remote, cache_dir() / remote.folder / remote.name)


def download(remote: RemoteFile, target: Path) -> Path:
    """``remote.url`` into ``target``, atomically, kept only when its checks pass (a cut-off or
    wrong download is never trusted later)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    except OSError as exc:
        raise DataError(
            f"cannot write the download cache {target.parent} ({exc.strerror}); set "
            "MTLREC_CACHE to a writable folder, or MTLREC_DATA_DIR to one holding "
            f"{remote.folder}/{remote.name}"
        ) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        _check(remote, tmp)
        os.replace(tmp, target)
    except (OSError, EOFError) as exc:  # EOFError: a cut-off gzip, found by its content check
        raise DataError(
            f"cannot download {remote.url} ({exc}); set MTLREC_DATA_DIR to a folder holding "
            f"{remote.folder}/{remote.name}"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _check(remote: RemoteFile, path: Path) -> None:
    if remote.sha256 and sha256_of(path) != remote.sha256:
        raise DataError(f"{remote.url}: downloaded file fails its sha256 check")
    if remote.content_sha256 and sha256_of(path, gunzip=True) != remote.content_sha256:
        raise DataError(f"{remote.url}: decompressed content fails its sha256 check")
    if remote.data_lines is not None:
        with path.open("rb") as fh:
            lines = sum(1 for line in fh if line.strip() and not line.startswith(b"|"))
        if lines != remote.data_lines:
            raise DataError(
                f"{remote.url}: {lines:,} data lines downloaded, a complete file has "
                f"{remote.data_lines:,}"
            )


def extract_checked(archive: Path, target: Path, sha256: dict[str, str], label: str) -> None:
    """Write each member named in ``sha256`` of the zip ``archive`` to ``target/<name>`` after
    checking its SHA-256 (``label`` names the dataset in errors).

    Members are matched by path suffix, so a zip with a leading folder (or none) works. Each file
    is written to a temporary name and renamed, so a failed check leaves nothing behind."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:  # a cut-off download, or an HTML page under that name
        raise DataError(
            f"{archive}: not a readable zip archive ({exc}); download it again"
        ) from None
    with zf:
        members = [m for m in zf.namelist() if not m.endswith("/")]
        for name, sha in sha256.items():
            found = [m for m in members if m == name or m.endswith("/" + name)]
            if not found:
                raise DataError(f"{archive}: no member {name!r} in the {label} archive")
            data = zf.read(min(found, key=len))
            out = target / name
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                if sha256_of(tmp) != sha:
                    raise DataError(f"{archive}: member {name!r} fails its sha256 check")
                os.replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)
