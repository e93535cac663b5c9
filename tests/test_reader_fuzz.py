"""Fuzzing the readers and the encoder: bad input is a DataError naming file/row/column, never
a crash from deep inside pandas or numpy."""

import gzip

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtlrec.data.encoder import Encoder
from mtlrec.data.readers import NA_TOKENS, read_frame
from mtlrec.errors import DataError
from mtlrec.schema import Feature, Schema, Task

SCHEMA = Schema([Feature("c"), Feature("x", "numeric")], [Task("y")])
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _load(path):
    frame = read_frame(path, columns=SCHEMA.required_columns())
    return Encoder(SCHEMA).fit(frame, str(path)).transform(frame, str(path))


@FUZZ
@given(body=st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(tmp_path, body):
    path = tmp_path / "f.csv"
    path.write_bytes(b"c,x,y\n" + body)
    try:
        _load(path)
    except DataError as exc:
        assert "f.csv" in str(exc)


@FUZZ
@given(
    rows=st.integers(2, 40),
    bad_row=st.integers(0, 39),
    token=st.text(alphabet="abcxyz!#%&", min_size=1, max_size=6),
)
def test_text_in_a_numeric_column_names_row_and_column(tmp_path, rows, bad_row, token):
    bad_row %= rows
    frame = pd.DataFrame(
        {"c": ["a"] * rows, "x": ["1.5"] * rows, "y": ["0", "1"] * (rows // 2) + ["0"] * (rows % 2)}
    )
    frame.loc[bad_row, "x"] = token
    path = tmp_path / "n.csv"
    frame.to_csv(path, index=False)
    if token in NA_TOKENS:
        _load(path)  # a missing-value token is allowed
        return
    with pytest.raises(DataError, match=f"n.csv: column 'x' row {bad_row}: "):
        _load(path)


@FUZZ
@given(
    rows=st.integers(2, 40),
    bad_row=st.integers(0, 39),
    label=st.sampled_from(["2", "-1", "0.5", "yes", "nan", ""]),
)
def test_label_outside_its_range_names_row(tmp_path, rows, bad_row, label):
    bad_row %= rows
    frame = pd.DataFrame({"c": ["a"] * rows, "x": np.arange(rows).astype(str), "y": ["1"] * rows})
    frame.loc[bad_row, "y"] = label
    path = tmp_path / "l.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=f"l.csv: column 'y' row {bad_row}"):
        _load(path)


@FUZZ
@given(rows=st.integers(1, 30), bad_line=st.integers(0, 29), extra=st.integers(1, 3))
def test_ragged_row_names_the_file_and_line(tmp_path, rows, bad_line, extra):
    bad_line %= rows
    lines = ["c,x,y"] + [f"a,{i},1" for i in range(rows)]
    lines[bad_line + 1] += ",z" * extra
    path = tmp_path / "r.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"r.csv: malformed.*line {bad_line + 2}"):
        _load(path)


@FUZZ
@given(cut=st.floats(0.05, 0.95))
def test_truncated_gzip_anywhere_is_a_data_error(tmp_path, cut):
    rng = np.random.default_rng(0)
    text = "c,x,y\n" + "".join(
        f"v{rng.integers(1000)},{rng.random():.6f},{rng.integers(2)}\n" for _ in range(3000)
    )
    data = gzip.compress(text.encode())
    path = tmp_path / "t.csv.gz"
    path.write_bytes(data[: max(1, int(len(data) * cut))])
    with pytest.raises(DataError, match="t.csv.gz"):
        _load(path)
