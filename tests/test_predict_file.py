"""Batch scoring of a file with a finished run (`mtlrec predict`)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from mtlrec.cli import app
from mtlrec.errors import ConfigError, DataError
from mtlrec.train.predict_file import predict_file
from tests.conftest import funnel_frame

runner = CliRunner()
PRED = ["pred_click", "pred_purchase", "pred_purchase_joint"]


@pytest.fixture(scope="module")
def test_csv(finished_run):
    return finished_run.parent / "data" / "test.csv"


def test_scores_reproduce_the_runs_test_metrics(finished_run, test_csv, tmp_path):
    out = tmp_path / "scores.parquet"
    summary = predict_file(finished_run, test_csv, out, keep=["user", "click", "purchase"])
    scores = pd.read_parquet(out)
    assert summary.rows == len(scores) == 300
    assert list(scores.columns) == ["user", "click", "purchase", *PRED]
    metrics = json.loads((finished_run / "metrics.json").read_text())["test"]
    click = scores["click"].astype(int)
    assert roc_auc_score(click, scores["pred_click"]) == pytest.approx(
        metrics["click"]["auc"], abs=1e-9
    )
    clicked = click == 1  # the CVR AUC is over clicked rows, the joint over all rows
    buy = scores["purchase"].astype(int)
    assert roc_auc_score(buy[clicked], scores["pred_purchase"][clicked]) == pytest.approx(
        metrics["purchase"]["auc"], abs=1e-9
    )
    assert roc_auc_score(buy, scores["pred_purchase_joint"]) == pytest.approx(
        metrics["purchase"]["joint_auc"], abs=1e-9
    )
    # MMoE's pCTCVR is the chain product pCTR x pCVR
    np.testing.assert_allclose(
        scores["pred_purchase_joint"], scores["pred_click"] * scores["pred_purchase"], rtol=1e-6
    )
    assert scores["user"].tolist() == pd.read_csv(test_csv)["user"].tolist()  # row order kept


def test_streamed_parquet_without_labels_scores_like_the_csv(finished_run, test_csv, tmp_path):
    frame = pd.read_csv(test_csv, dtype=str, keep_default_na=False)
    unlabeled = frame.drop(columns=["click", "purchase", "score"])
    src = tmp_path / "unlabeled.parquet"
    pq.write_table(pa.Table.from_pandas(unlabeled), src, row_group_size=70)
    out = tmp_path / "scores.csv"
    predict_file(finished_run, src, out, keep=["item"], read_rows=25)
    streamed = pd.read_csv(out)
    whole = pd.read_parquet(predict_file(finished_run, test_csv, tmp_path / "w.pq").out)
    assert list(streamed.columns) == ["item", *PRED]
    assert streamed["item"].tolist() == frame["item"].tolist()
    np.testing.assert_allclose(streamed[PRED].to_numpy(), whole[PRED].to_numpy(), rtol=1e-6)


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_kept_integer_ids_with_nulls_come_back_unchanged(finished_run, test_csv, tmp_path, suffix):
    """pandas reads an integer column with a null as float64 (ids above 2**53 round, and 7
    becomes 7.0); a kept column is copied as stored. Written without pandas' metadata, as Spark
    writes it; row groups of 70 read 25 rows at a time, so some chunks hold no null."""
    frame = pd.read_csv(test_csv, dtype=str, keep_default_na=False)
    ids = [None if i % 50 == 3 else 2**53 + 1 + i for i in range(len(frame))]
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    table = table.append_column("order_id", pa.array(ids, pa.int64()))
    src = tmp_path / "ids.parquet"
    pq.write_table(table, src, row_group_size=70)
    out = tmp_path / f"scores.{suffix}"
    predict_file(finished_run, src, out, keep=["order_id", "user"], read_rows=25)
    if suffix == "parquet":
        got = pq.read_table(out).column("order_id").to_pylist()
    else:
        got = [
            None if v == "" else int(v)
            for v in pd.read_csv(out, dtype=str, keep_default_na=False)["order_id"]
        ]
    assert got == ids
    whole = pd.read_parquet(predict_file(finished_run, test_csv, tmp_path / "w.pq").out)
    scores = pd.read_csv(out) if suffix == "csv" else pd.read_parquet(out)
    np.testing.assert_allclose(scores[PRED].to_numpy(), whole[PRED].to_numpy(), rtol=1e-6)


def test_an_integer_feature_with_nulls_and_large_values_is_read_like_pandas(
    finished_run, test_csv, tmp_path
):
    """A streamed integer column with nulls is cast to float64 as pandas converts it, ids above
    2**53 included (the range-checked cast refused them)."""
    frame = pd.read_csv(test_csv, dtype=str, keep_default_na=False)
    users = [None if i % 40 == 0 else 2**60 + i for i in range(len(frame))]
    table = pa.Table.from_pandas(frame.drop(columns=["user"]), preserve_index=False)
    table = table.replace_schema_metadata(None).append_column("user", pa.array(users, pa.int64()))
    src = tmp_path / "users.parquet"
    pq.write_table(table, src, row_group_size=70)
    streamed = pd.read_parquet(predict_file(finished_run, src, tmp_path / "s.pq", read_rows=25).out)
    from mtlrec.data.readers import read_frame
    from mtlrec.train.predict_file import predict_frame
    from mtlrec.train.run import load_run

    _, encoder, model = load_run(finished_run)
    whole = predict_frame(model, encoder, read_frame(src))
    np.testing.assert_allclose(streamed[PRED].to_numpy(), whole[PRED].to_numpy(), rtol=1e-6)


def test_unseen_values_are_scored_not_rejected(finished_run, tmp_path):
    frame = funnel_frame(50, 9)
    frame["user"] = "never-seen"
    frame["tags"] = "new1|new2"
    src = tmp_path / "new.csv"
    frame.to_csv(src, index=False)
    scores = pd.read_parquet(predict_file(finished_run, src, tmp_path / "s.parquet").out)
    assert len(scores) == 50 and scores[PRED].notna().all().all()
    assert ((scores[PRED] > 0) & (scores[PRED] < 1)).all().all()


def test_a_bad_row_names_its_row_and_leaves_no_output(finished_run, test_csv, tmp_path):
    frame = pd.read_csv(test_csv, dtype=str, keep_default_na=False)
    frame.loc[213, "price"] = "cheap"
    src = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pandas(frame), src, row_group_size=100)
    out = tmp_path / "scores.parquet"
    out.write_text("an earlier result")
    with pytest.raises(DataError, match=r"bad.parquet: column 'price' row 213: 'cheap'"):
        predict_file(finished_run, src, out, read_rows=40)
    assert out.read_text() == "an earlier result"  # not clobbered by a half-written file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "scores.parquet"]


def test_empty_input_gives_an_empty_file_with_the_columns(finished_run, test_csv, tmp_path):
    src = tmp_path / "empty.csv"
    pd.read_csv(test_csv).head(0).to_csv(src, index=False)
    summary = predict_file(finished_run, src, tmp_path / "e.parquet", keep=["user"])
    scores = pd.read_parquet(summary.out)
    assert summary.rows == 0 and list(scores.columns) == ["user", *PRED] and scores.empty


@pytest.mark.parametrize(
    "keep, out, error, needle",
    [
        (["pred_click"], "s.parquet", ConfigError, "name of a prediction column"),
        (["nope"], "s.parquet", DataError, "missing column.*'nope'"),
        ([], "s.json", ConfigError, r"s.json: the output must end in \.parquet"),
    ],
)
def test_bad_requests_are_named(finished_run, test_csv, tmp_path, keep, out, error, needle):
    with pytest.raises(error, match=needle):
        predict_file(finished_run, test_csv, tmp_path / out, keep=keep)
    assert not (tmp_path / out).exists()


@pytest.mark.parametrize("size", [0, -3])
def test_a_batch_size_below_one_is_refused(finished_run, test_csv, tmp_path, size):
    with pytest.raises(ConfigError, match=f"--batch-size {size}: must be at least 1"):
        predict_file(finished_run, test_csv, tmp_path / "s.csv", batch_size=size)


def test_output_paths_through_a_file_exit_2_naming_the_path(finished_run, test_csv, tmp_path):
    """--out below an existing file was an OSError traceback in train, predict, export and sweep."""
    blocker = tmp_path / "data.csv"
    blocker.write_text("x\n1\n")
    bad = blocker / "sub"
    commands = {
        "predict": ["predict", str(finished_run), "--data", str(test_csv), "--out", f"{bad}/s.csv"],
        "export": ["export", str(finished_run), "--format", "torchscript", "--out", str(bad)],
        "train": ["train", "--dataset", "synthetic-mmoe", "--model", "mmoe", "--out", str(bad)],
        "sweep": ["sweep", "--dataset", "synthetic-mmoe", "--models", "mmoe", "--out", str(bad)],
    }
    for name, args in commands.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        assert "cannot create the folder" in result.output and "data.csv" in result.output, name
    assert blocker.read_text() == "x\n1\n"


def test_a_tsv_is_scored_and_evaluated_with_sep(finished_run, test_csv, tmp_path):
    """The run was trained on CSV files; --sep reads a TSV (there was no way to, and the error
    pointed at --set, which predict and evaluate do not have)."""
    tsv = tmp_path / "test.tsv"
    pd.read_csv(test_csv, dtype=str, keep_default_na=False).to_csv(tsv, sep="\t", index=False)
    result = runner.invoke(app, ["predict", str(finished_run), "--data", str(tsv), "-o", "x.csv"])
    assert result.exit_code == 2 and "--sep tab" in result.output
    out = tmp_path / "tsv.csv"
    args = ["predict", str(finished_run), "--data", str(tsv), "--out", str(out), "--sep", "tab"]
    assert runner.invoke(app, args).exit_code == 0
    want = tmp_path / "csv.csv"
    predict_file(finished_run, test_csv, want)
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(want))
    result = runner.invoke(app, ["evaluate", str(finished_run), "--data", str(tsv), "--sep", "tab"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(finished_run), "--data", str(tsv), "--sep", "ab"])
    assert result.exit_code == 2 and "--sep: expected one character" in result.output


def test_cli_predict(finished_run, test_csv, tmp_path):
    out = tmp_path / "cli.csv"
    args = ["predict", str(finished_run), "--data", str(test_csv), "--out", str(out)]
    result = runner.invoke(app, [*args, "--keep", "user,item", "--keep", "click"])
    assert result.exit_code == 0, result.output
    assert "wrote 300 rows x 6 columns" in result.output
    assert list(pd.read_csv(out).columns) == ["user", "item", "click", *PRED]
    result = runner.invoke(app, [*args, "--keep", "nope"])
    assert result.exit_code == 2 and "missing column(s) 'nope'" in result.output
    result = runner.invoke(app, ["predict", str(tmp_path), "--data", str(test_csv), "-o", "x.csv"])
    assert result.exit_code == 2 and "not a finished run directory" in result.output


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_export_folder_scores_like_its_run(finished_run, test_csv, tmp_path, fmt):
    """The artifact that ships is the one scored: its graph, read by the export's loader."""
    pytest.importorskip("onnxruntime")
    from mtlrec.serve.export import export_run

    folder = export_run(finished_run, fmt, tmp_path / fmt)
    exported = pd.read_parquet(predict_file(folder, test_csv, tmp_path / "e.parquet").out)
    eager = pd.read_parquet(predict_file(finished_run, test_csv, tmp_path / "r.parquet").out)
    assert list(exported.columns) == PRED
    np.testing.assert_allclose(exported.to_numpy(), eager.to_numpy(), rtol=1e-5, atol=1e-6)
    small = predict_file(folder, test_csv, tmp_path / "b.parquet", batch_size=64).out
    np.testing.assert_allclose(pd.read_parquet(small).to_numpy(), exported.to_numpy(), rtol=1e-6)


def test_evaluate_streams_a_parquet_file_to_the_same_metrics(finished_run, test_csv, tmp_path):
    from mtlrec.train.run import evaluate_run

    frame = pd.read_csv(test_csv, dtype=str, keep_default_na=False)
    src = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pandas(frame), src, row_group_size=64)  # 5 row groups
    streamed = evaluate_run(finished_run, str(src))["test.parquet"]
    whole = evaluate_run(finished_run, str(test_csv))["test.csv"]
    saved = json.loads((finished_run / "metrics.json").read_text())["test"]
    for task in ("click", "purchase"):
        for metric, value in saved[task].items():
            assert streamed[task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
            assert whole[task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
    empty = tmp_path / "empty.csv"
    frame.head(0).to_csv(empty, index=False)
    with pytest.raises(DataError, match="empty.csv: no rows to evaluate"):
        evaluate_run(finished_run, str(empty))


def test_a_fusion_file_adds_the_served_ranking_score(finished_run, test_csv, tmp_path):
    conditional = tmp_path / "fusion.yaml"
    conditional.write_text("serve:\n  weights: {click: 1.0, purchase: 0.5}\n")
    scores = pd.read_parquet(
        predict_file(finished_run, test_csv, tmp_path / "s.parquet", fusion=conditional).out
    )
    assert list(scores.columns) == [*PRED, "score"]
    expected = scores["pred_click"].astype(float) * scores["pred_purchase"].astype(float) ** 0.5
    np.testing.assert_allclose(scores["score"], expected, rtol=1e-9)
    joint = tmp_path / "joint.yaml"
    joint.write_text("serve:\n  kind: weighted_sum\n  probabilities: joint\n")
    summed = pd.read_parquet(
        predict_file(finished_run, test_csv, tmp_path / "j.parquet", fusion=joint).out
    )
    expected = summed["pred_click"].astype(float) + summed["pred_purchase_joint"].astype(float)
    np.testing.assert_allclose(summed["score"], expected, rtol=1e-9)
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  weights: {like: 1.0}\n")
    with pytest.raises(ConfigError, match="like"):
        predict_file(finished_run, test_csv, tmp_path / "b.parquet", fusion=bad)


def test_an_output_over_its_input_is_refused(finished_run, test_csv, tmp_path):
    copy = tmp_path / "cands.csv"
    copy.write_bytes(test_csv.read_bytes())
    with pytest.raises(ConfigError, match="would overwrite the input"):
        predict_file(finished_run, copy, copy)
    assert copy.read_bytes() == test_csv.read_bytes()
    folder = tmp_path / "parts"
    folder.mkdir()
    pd.read_csv(test_csv).to_parquet(folder / "a.parquet")
    with pytest.raises(ConfigError, match="would overwrite the input"):
        predict_file(finished_run, folder, folder / "scores.parquet")


def test_a_non_finite_fused_score_is_missing_as_in_the_service(finished_run, test_csv, tmp_path):
    fusion = tmp_path / "fusion.yaml"
    fusion.write_text("serve:\n  kind: expression\n  expression: 'click + log(0 * purchase)'\n")
    scores = pd.read_parquet(
        predict_file(finished_run, test_csv, tmp_path / "s.parquet", fusion=fusion).out
    )
    assert scores["score"].isna().all()


def test_mostly_unseen_values_are_warned_about(finished_run, test_csv, tmp_path):
    frame = pd.read_csv(test_csv, dtype=str, keep_default_na=False)
    frame["user"] = frame["user"] + ".0"  # ids written as floats by another export
    src = tmp_path / "floats.csv"
    frame.to_csv(src, index=False)
    lines: list[str] = []
    predict_file(finished_run, src, tmp_path / "s.parquet", warn=lines.append)
    assert len(lines) == 1 and "column 'user': 100% of its values were never seen" in lines[0]
    from mtlrec.train.run import evaluate_run

    evaluated: list[str] = []
    evaluate_run(finished_run, str(src), warn=evaluated.append)
    assert evaluated == lines
    lines.clear()
    predict_file(finished_run, test_csv, tmp_path / "t.parquet", warn=lines.append)
    assert lines == []


def test_kept_list_columns_are_written_to_csv_as_sequences_a_reader_reads_back(
    finished_run, test_csv, tmp_path
):
    frame = pd.read_csv(test_csv, keep_default_na=False).head(6)
    tags = [t.split("|") if t else [] for t in frame["tags"].astype(str)]
    src = tmp_path / "lists.parquet"
    table = pa.table(
        {
            **{c: frame[c].tolist() for c in frame.columns if c != "tags"},
            "tags": pa.array(tags, pa.list_(pa.string())),
            "seen": pa.array([[1, 2], None, [], [3], [4, 5, 6], [7]], pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, src)
    out = predict_file(finished_run, src, tmp_path / "s.csv", keep=["tags", "seen"]).out
    got = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert got["tags"].tolist() == ["|".join(t) for t in tags]  # the feature's own sep
    assert got["seen"].tolist() == ["1|2", "", "", "3", "4|5|6", "7"]
