import gzip

import pandas as pd
import pytest

from mtlrec.data.readers import file_columns, read_frame
from mtlrec.errors import DataError


def test_csv_keeps_na_as_a_category_and_strips_spaces(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("a, b\nNA, 1\nx, 2\n")
    frame = read_frame(path, columns=["a", "b"])
    assert frame["a"].tolist() == ["NA", "x"]
    assert frame.attrs["source"] == str(path)


def test_gzip_and_parquet_and_max_rows(tmp_path):
    frame = pd.DataFrame({"a": list("abcdef"), "b": range(6)})
    with gzip.open(tmp_path / "f.csv.gz", "wt") as fh:
        frame.to_csv(fh, index=False)
    frame.to_parquet(tmp_path / "f.parquet")
    assert read_frame(tmp_path / "f.csv.gz", max_rows=4)["a"].tolist() == list("abcd")
    pq = read_frame(tmp_path / "f.parquet", columns=["b"], max_rows=3)
    assert pq["b"].tolist() == [0, 1, 2]


def test_missing_column_in_parquet_is_named(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "f.parquet")
    with pytest.raises(DataError, match="f.parquet: missing column.*'zz'"):
        read_frame(tmp_path / "f.parquet", columns=["a", "zz"])


def test_ragged_row_is_reported_with_the_file(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n3,4,5,6\n")
    with pytest.raises(DataError, match="bad.csv: malformed"):
        read_frame(path)


def test_truncated_gzip_is_reported(tmp_path):
    data = gzip.compress(b"a,b\n" + b"1,2\n" * 5000)
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.csv.gz"):
        read_frame(path)


def test_corrupt_parquet_and_missing_file(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="x.parquet"):
        read_frame(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="nope.csv: file not found"):
        read_frame(tmp_path / "nope.csv")


def test_a_folder_of_parquet_files_reads_as_one_table(tmp_path):
    """A partitioned dataset: every file under the folder, in path order, ints with nulls in any
    file read as floats in all of them (as one file would)."""
    folder = tmp_path / "valid"
    (folder / "day=2").mkdir(parents=True)
    pd.DataFrame({"a": ["x", "y"], "n": [1, 2]}).to_parquet(folder / "part-0.parquet")
    pd.DataFrame({"a": ["z"], "n": pd.array([None], dtype="Int64")}).to_parquet(
        folder / "part-1.parquet"
    )
    pd.DataFrame({"a": ["w"], "n": [4]}).to_parquet(folder / "day=2" / "part-0.parquet")
    frame = read_frame(folder, columns=["a", "n"])
    assert frame["a"].tolist() == ["w", "x", "y", "z"]  # day=2/part-0, part-0, part-1
    assert frame["n"].isna().sum() == 1
    assert len(read_frame(folder, max_rows=3)) == 3
    with pytest.raises(DataError, match=r"valid: missing column\(s\) 'b'"):
        read_frame(folder, columns=["a", "b"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: a folder without .parquet files"):
        read_frame(tmp_path / "empty")


@pytest.mark.parametrize(
    "sep, needle",
    [
        (
            ";",
            "separated by ';', not ','; set it with --set 'dataset.sep=;' \\(train\\), or --sep ';'",
        ),
        ("\t", "by tabs.*or --sep tab \\(predict, evaluate\\)"),
    ],
)
def test_another_separator_is_recognised_and_named(tmp_path, sep, needle):
    path = tmp_path / "data.csv"
    pd.DataFrame({"user": ["a", "b"], "click": [0, 1]}).to_csv(path, sep=sep, index=False)
    with pytest.raises(DataError, match=needle):
        read_frame(path, columns=["user", "click"])
    assert read_frame(path, columns=["user", "click"], sep=sep)["user"].tolist() == ["a", "b"]


@pytest.mark.parametrize(
    "header, needle",
    [
        (
            "user,price,click,price",
            r"column 'price' appears twice in the header \(columns 2 and 4\)",
        ),
        (
            "user, price,click,price ",
            r"column 'price' appears twice in the header \(columns 2 and 4\)",
        ),
    ],
)
def test_a_repeated_column_name_is_refused(tmp_path, header, needle):
    """pandas would rename the second 'price' to 'price.1' and the first would be used."""
    path = tmp_path / "dup.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(f"{header}\nu1,1.0,0,2.0\n")
    with pytest.raises(DataError, match=f"dup.csv.gz: {needle}"):
        read_frame(path, columns=["user", "price"])


def test_a_name_that_only_looks_renamed_is_fine(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text("price,price.1\n1,2\n")
    assert list(read_frame(path).columns) == ["price", "price.1"]


def test_file_columns_of_csv_parquet_and_folder_without_reading_rows(tmp_path):
    frame = pd.DataFrame({"a": list("abc"), " b": range(3)})
    frame.to_csv(tmp_path / "f.csv", sep=";", index=False)
    frame.to_parquet(tmp_path / "f.parquet")
    (tmp_path / "folder").mkdir()
    frame.to_parquet(tmp_path / "folder" / "part-0.parquet")
    assert file_columns(tmp_path / "f.csv", sep=";") == ["a", "b"]  # stripped, like read_frame
    assert file_columns(tmp_path / "f.parquet") == ["a", "b"]
    assert file_columns(tmp_path / "folder") == ["a", "b"]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read Parquet"):
        file_columns(tmp_path / "bad.parquet")
    for missing in ("missing.csv", "missing.parquet"):
        with pytest.raises(DataError, match=f"{missing}: file not found"):
            file_columns(tmp_path / missing)


def test_a_parquet_folder_file_without_a_wanted_column_is_named(tmp_path):
    """pyarrow's dataset schema is the first file's: a later file lacking a column was read as
    nulls without a word."""
    folder = tmp_path / "parts"
    folder.mkdir()
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_parquet(folder / "part-0.parquet")
    pd.DataFrame({"a": [3]}).to_parquet(folder / "part-1.parquet")
    with pytest.raises(DataError, match=r"part-1.parquet: missing column\(s\) 'b'"):
        read_frame(folder, columns=["a", "b"])
    assert read_frame(folder, columns=["a"])["a"].tolist() == [1, 2, 3]


def test_a_csv_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("user,click\nanna,0\nren\xe9e,1\n".encode("latin-1"))
    with pytest.raises(
        DataError, match=r"latin1.csv: line 3 is not UTF-8 text \(byte 0xe9 at column 4\)"
    ):
        read_frame(path, columns=["user", "click"])
