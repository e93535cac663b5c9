"""Census-Income (KDD) and UCI Adult with the MMoE paper's two tasks.

Tasks: ``income`` (> 50K) and ``marital`` (never married). Both label columns, and Census's
instance weight, are removed from the features. The train file is the training set; the test
file is split 1:1 into validation and test with a fixed seed (as keras-mmoe and torch-rechub do).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtlrec.data.datasets.download import RemoteFile, locate
from mtlrec.data.datasets.registry import DatasetSplits, register_dataset
from mtlrec.data.readers import read_frame
from mtlrec.schema import Feature, Schema, Task

UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases"
SPLIT_SEED = 2018  # fixed: the validation/test halves never change with the run's seed

CENSUS_COLUMNS = [
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour",
    "hs_college", "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex",
    "union_member", "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses",
    "stock_dividends", "tax_filer_stat", "region_prev_res", "state_prev_res", "det_hh_fam_stat",
    "det_hh_summ", "instance_weight", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same",
    "mig_prev_sunbelt", "num_emp", "fam_under_18", "country_father", "country_mother",
    "country_self", "citizenship", "own_or_self", "vet_question", "vet_benefits", "weeks_worked",
    "year", "income_50k",
]  # fmt: skip
CENSUS_NUMERIC = [
    "age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp",
    "weeks_worked",
]  # fmt: skip
CENSUS_FILES = {
    "train": RemoteFile(
        "census_income_kdd",
        "census-income.data.gz",
        f"{UCI}/census-income-mld/census-income.data.gz",
        content_sha256="3676a81db7d3528f3f8b9f3c699d0f0aa28db45e6e994fa0b8ed38327539ee86",
    ),
    "test": RemoteFile(
        "census_income_kdd",
        "census-income.test.gz",
        f"{UCI}/census-income-mld/census-income.test.gz",
        content_sha256="98402b1ab879573d0a7f38a699a40258080e25e33d3401e7bf9c96d3fa0fab8c",
    ),
}

ADULT_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
    "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week",
    "native_country", "income",
]  # fmt: skip
ADULT_NUMERIC = ["age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week"]
ADULT_FILES = {
    "train": RemoteFile(
        "uci_adult",
        "adult.data",
        f"{UCI}/adult/adult.data",
        "5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d",
    ),
    "test": RemoteFile(
        "uci_adult",
        "adult.test",
        f"{UCI}/adult/adult.test",
        None,  # UCI's copy starts with a '|1x3 Cross validator' line that ours lacks
        data_lines=16_281,
    ),
}

TASKS = [Task("income"), Task("marital")]


def _schema(
    columns: list[str], numeric: list[str], drop: set[str], buckets: int, log: bool
) -> Schema:
    feats = [
        Feature(c, "numeric", buckets=buckets, log=log) if c in numeric else Feature(c)
        for c in columns
        if c not in drop
    ]
    return Schema(features=feats, tasks=list(TASKS))


def census_halves(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the (validation, test) halves of a ``rows``-row Census test file."""
    order = np.random.default_rng(SPLIT_SEED).permutation(rows)
    return order[: rows // 2], order[rows // 2 :]


def _halves(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    valid, test = census_halves(len(frame))
    return frame.iloc[valid].reset_index(drop=True), frame.iloc[test].reset_index(drop=True)


def read_census(split: str) -> pd.DataFrame:
    """One Census-Income file ("train" or "test") with the ``income`` and ``marital`` labels."""
    frame = read_frame(
        locate(CENSUS_FILES[split]), header=False, names=CENSUS_COLUMNS, columns=CENSUS_COLUMNS
    )
    frame["income"] = (frame["income_50k"].str.strip() == "50000+.").astype(int)
    frame["marital"] = (frame["marital_stat"].str.strip() == "Never married").astype(int)
    return frame


def _cap(frame: pd.DataFrame, max_rows: int | None) -> pd.DataFrame:
    return frame if max_rows is None else frame.iloc[:max_rows].reset_index(drop=True)


@register_dataset("census-income")
def census_income(
    max_rows: int | None = None,
    seed: int = 2024,
    numeric_buckets: int = 0,
    log_amounts: bool = False,
) -> DatasetSplits:
    """Census-Income (KDD), 199,523 + 99,762 rows; tasks income > 50K and never married.

    ``numeric_buckets`` > 0 also embeds each numeric column's quantile bucket; ``log_amounts``
    log-transforms the numeric columns before standardising."""
    frames = {split: read_census(split) for split in CENSUS_FILES}
    valid, test = _halves(frames["test"])
    schema = _schema(
        CENSUS_COLUMNS,
        CENSUS_NUMERIC,
        {"income_50k", "marital_stat", "instance_weight"},
        numeric_buckets,
        log_amounts,
    )
    return DatasetSplits(
        schema,
        _cap(frames["train"], max_rows),
        _cap(valid, max_rows),
        _cap(test, max_rows),
        source=str(locate(CENSUS_FILES["test"]).parent),
    )


@register_dataset("adult")
def adult(
    max_rows: int | None = None,
    seed: int = 2024,
    numeric_buckets: int = 0,
    log_amounts: bool = False,
) -> DatasetSplits:
    """UCI Adult, 32,561 + 16,281 rows; the same two tasks as Census (small, for quick runs)."""
    frames = {}
    for split, remote in ADULT_FILES.items():
        path = locate(remote)
        frame = read_frame(path, header=False, names=ADULT_COLUMNS, columns=ADULT_COLUMNS)
        if split == "test" and frame.iloc[0, 0].startswith("|"):
            frame = frame.iloc[1:].reset_index(drop=True)  # UCI's header line
        frame = frame[frame["income"].str.strip() != ""].reset_index(drop=True)
        frame["income"] = frame["income"].str.strip().str.rstrip(".").eq(">50K").astype(int)
        frame["marital"] = frame["marital_status"].str.strip().eq("Never-married").astype(int)
        frames[split] = frame
    valid, test = _halves(frames["test"])
    schema = _schema(
        ADULT_COLUMNS, ADULT_NUMERIC, {"income", "marital_status"}, numeric_buckets, log_amounts
    )
    return DatasetSplits(
        schema,
        _cap(frames["train"], max_rows),
        _cap(valid, max_rows),
        _cap(test, max_rows),
        source=str(path.parent),
    )
