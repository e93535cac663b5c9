"""Read CSV and Parquet files into pandas frames, with errors that name the file.

Every column is read as text first; the encoder converts it (numbers, labels) and can then name the
row and column of a bad value. Parquet columns keep their types and are converted the same way.
"""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pandas as pd

from mtlrec.errors import DataError, first_line

#: Cell values that mean "missing" in a numeric column.
NA_TOKENS = frozenset({"", "nan", "NaN", "NAN", "NA", "N/A", "null", "NULL", "None", "?"})


PARQUET_SUFFIXES = (".parquet", ".pq")


def read_frame(
    path: str | Path,
    *,
    columns: list[str] | None = None,
    header: bool = True,
    names: list[str] | None = None,
    sep: str = ",",
    max_rows: int | None = None,
) -> pd.DataFrame:
    """Read a CSV (optionally gzip/bz2/xz/zip-compressed) or Parquet file.

    ``columns`` are checked to exist; a missing one raises :class:`DataError` naming it and the
    file. CSV cells are kept as strings (no NA guessing: ``"NA"`` can be a real category).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        if path.is_dir():
            frame = _read_parquet_folder(path, columns, max_rows)
        elif is_parquet(path):
            frame = _read_parquet(path, columns, max_rows)
        else:
            with warnings.catch_warnings():
                # pandas only warns (and drops cells) when the first data row is too long
                warnings.simplefilter("error", pd.errors.ParserWarning)
                try:
                    frame = pd.read_csv(
                        path,
                        sep=sep,
                        header=0 if header else None,
                        names=names,
                        dtype=str,
                        keep_default_na=False,
                        skipinitialspace=True,
                        nrows=max_rows,
                        engine="c",
                        index_col=False,  # never turn a ragged first column into an index
                    )
                except pd.errors.ParserWarning as exc:
                    first = 2 if header else 1
                    raise DataError(
                        f"{path}: malformed file (line {first} has more fields than the header)"
                    ) from exc
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {_first_non_utf8(path) or first_line(exc)}") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, EOFError) as exc:
        raise DataError(f"{path}: malformed file ({first_line(exc)})") from exc
    except OSError as exc:  # truncated/corrupt gzip, permission denied, ...
        raise DataError(f"{path}: cannot read ({first_line(exc)})") from exc
    except Exception as exc:  # pyarrow's errors for corrupt Parquet files
        if type(exc).__module__.startswith("pyarrow"):
            raise DataError(f"{path}: cannot read Parquet ({first_line(exc)})") from exc
        raise
    if header and not is_parquet(path) and not path.is_dir():
        _check_duplicate_header(frame, path, sep)
    frame.columns = [str(c).strip() for c in frame.columns]
    frame.attrs["source"] = str(path)
    if columns is not None:
        _check_separator(frame, columns, path, sep)
        require_columns(frame, columns, path)
    return frame


def _first_non_utf8(path: Path) -> str | None:
    """Where a text file first stops being UTF-8 ("line 3 is not UTF-8 text (byte 0xe9)..."),
    read line by line; None for a compressed file (pandas' own message is kept)."""
    if path.suffix.lower() in (".gz", ".bz2", ".xz", ".zip", ".zst"):
        return None
    with path.open("rb") as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (
                    f"line {number} is not UTF-8 text (byte 0x{line[exc.start]:02x} at column "
                    f"{exc.start + 1}); save the file as UTF-8"
                )
    return None


def _check_separator(frame: pd.DataFrame, columns: list[str], path: Path, sep: str) -> None:
    """One column whose name holds the wanted names joined by another character: the file uses
    another separator (a semicolon CSV from a European Excel, a TSV)."""
    if len(frame.columns) != 1 or columns[0] in frame.columns:
        return
    header = str(frame.columns[0])
    for other, yaml_value in ((";", ";"), ("\t", '"\\t"'), ("|", "|"), (",", ",")):
        if other != sep and sum(c in header.split(other) for c in columns) >= min(2, len(columns)):
            name = "tabs" if other == "\t" else repr(other)
            flag = "tab" if other == "\t" else shlex.quote(other)
            raise DataError(
                f"{path}: the header {header[:60]!r} looks separated by {name}, not {sep!r}; "
                f"set it with --set 'dataset.sep={yaml_value}' (train), or --sep {flag} "
                "(predict, evaluate)"
            )


def _check_duplicate_header(frame: pd.DataFrame, path: Path, sep: str) -> None:
    """pandas renames a repeated CSV column 'price' to 'price.1' and reads on: the schema would
    silently get the first of two columns. The header is read raw only when a name looks
    renamed (or repeats once stripped of spaces)."""
    names = [str(c) for c in frame.columns]
    stripped = [n.strip() for n in names]
    renamed = any(
        (m := re.fullmatch(r"(.+)\.(\d+)", n)) is not None and m.group(1) in names for n in names
    )
    if renamed:
        raw = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False)
        stripped = [str(v).strip() for v in raw.iloc[0]] if len(raw) else stripped
    seen: dict[str, int] = {}
    for i, name in enumerate(stripped):
        if name in seen:
            raise DataError(
                f"{path}: column {name!r} appears twice in the header (columns {seen[name] + 1} "
                f"and {i + 1}); rename one"
            )
        seen[name] = i


def is_parquet(path: str | Path) -> bool:
    """A Parquet file, or a folder holding Parquet files."""
    p = Path(path)
    if p.is_dir():
        return any(f.suffix.lower() in PARQUET_SUFFIXES for f in p.rglob("*") if f.is_file())
    return "".join(p.suffixes).lower().endswith(PARQUET_SUFFIXES)


def file_columns(path: str | Path, sep: str = ",") -> list[str]:
    """The column names of a CSV (its header line) or Parquet file or folder, without reading
    the rows."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not is_parquet(path):
        return list(read_frame(path, sep=sep, max_rows=0).columns)
    import pyarrow.parquet as pq

    try:
        if path.is_dir():
            import pyarrow.dataset as ds

            names = ds.dataset(str(path), format="parquet").schema.names
        else:
            names = pq.ParquetFile(path).schema_arrow.names
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: cannot read Parquet ({first_line(exc)})") from exc
    return [str(c).strip() for c in names]  # as read_frame names them


def require_columns(frame: pd.DataFrame, columns: list[str], where: str | Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"found {', '.join(list(map(str, frame.columns))[:12])}"
            + (" ..." if len(frame.columns) > 12 else "")
        )


def _read_parquet(path: Path, columns: list[str] | None, max_rows: int | None) -> pd.DataFrame:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    read_cols = parquet_columns(path, pf.schema_arrow.names, columns)
    if max_rows is None:
        table = pf.read(columns=read_cols)
    else:
        batches, count = [], 0
        for batch in pf.iter_batches(columns=read_cols, batch_size=min(max_rows, 65536)):
            batches.append(batch)
            count += batch.num_rows
            if count >= max_rows:
                break
        import pyarrow as pa

        table = pa.Table.from_batches(batches, schema=batches[0].schema if batches else None)
        table = table.slice(0, max_rows)
    return table.to_pandas()


def _read_parquet_folder(
    path: Path, columns: list[str] | None, max_rows: int | None
) -> pd.DataFrame:
    """Every Parquet file under a folder (a partitioned dataset), in the order pyarrow lists
    them, which is the order the streaming reader uses too."""
    import pyarrow.dataset as ds

    if not is_parquet(path):
        raise DataError(f"{path}: a folder without .parquet files")
    dataset = ds.dataset(str(path), format="parquet")
    read_cols = parquet_columns(path, dataset.schema.names, columns)
    if read_cols is not None:  # the dataset's schema is its first file's: check every file
        for fragment in dataset.get_fragments():
            parquet_columns(Path(fragment.path), fragment.physical_schema.names, read_cols)
    if max_rows is None:
        return dataset.to_table(columns=read_cols).to_pandas()
    return dataset.head(max_rows, columns=read_cols).to_pandas()


def parquet_columns(path: Path, present: list[str], columns: list[str] | None) -> list[str] | None:
    """The columns to read (None: all), after checking that each requested one exists."""
    if columns is None:
        return None
    missing = [c for c in columns if c not in set(present)]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"found {', '.join(sorted(present)[:12])}"
        )
    return list(dict.fromkeys(columns))
