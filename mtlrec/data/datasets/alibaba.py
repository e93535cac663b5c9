"""Ali-CCP and AliExpress in the column layout of their public preprocessed releases.

Both are click -> purchase funnels: ``purchase``/``conversion`` ``depends_on`` ``click``.
The full data sets are distributed through Alibaba's Tianchi portal behind a login, so there is no
URL to fetch them from: put the files under ``$MTLREC_DATA_DIR`` (or the cache) in the folder named
below and the loader reads them. Without them the loader falls back to the tiny samples
(``sample: true`` forces the samples), which are for format checks only.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from mtlrec.data.datasets.download import RemoteFile, locate
from mtlrec.data.datasets.registry import DatasetSplits, register_dataset
from mtlrec.data.readers import read_frame
from mtlrec.errors import ConfigError, DataError
from mtlrec.schema import Feature, Schema, Task

log = logging.getLogger(__name__)
RECHUB = "https://raw.githubusercontent.com/datawhalechina/torch-rechub/5a73b2eebc3a670dc64c54971cc06a78ddd55394/examples/ranking/data"  # noqa: E501


def _first_available(full: list[RemoteFile], sample: list[RemoteFile], force_sample: bool):
    if not force_sample:
        try:
            return [locate(r) for r in full], False
        except DataError as exc:
            log.warning("%s; using the tiny sample instead", exc)
    return [locate(r) for r in sample], True


def _cap(frame: pd.DataFrame, max_rows: int | None) -> pd.DataFrame:
    return frame if max_rows is None else frame.iloc[:max_rows].reset_index(drop=True)


@register_dataset("ali-ccp")
def ali_ccp(max_rows: int | None = None, seed: int = 2024, sample: bool = False) -> DatasetSplits:
    """Ali-CCP (ESMM paper), torch-rechub layout: click -> purchase, 23 sparse + 8 dense fields."""
    full = [RemoteFile("ali_ccp", f"ali_ccp_{s}.csv") for s in ("train", "val", "test")]
    samples = [
        RemoteFile(
            "ali_ccp_samples",
            f"torch_rechub_ali_ccp_{s}_sample.csv",
            f"{RECHUB}/ali-ccp/ali_ccp_{s}_sample.csv",
            sha,
        )
        for s, sha in (
            ("train", "1c1d125bcdfca70c8f5ed24f6221acadab3e19b70e0b06b3eb3adb2af7a0f9b5"),
            ("val", "1236e1504b76bf7ceb48dbe3d999ae8b49f61fcda2d684578320fd9fc7821104"),
            ("test", "9764a9b8e53b25f85c00e08a89f65ecfadab100cb0834161bd7ef671b7702a09"),
        )
    ]
    paths, _ = _first_available(full, samples, sample)
    # read only the rows kept: the full release has tens of millions
    frames = [read_frame(p, columns=["click", "purchase"], max_rows=max_rows) for p in paths]
    feats = [c for c in frames[0].columns if c not in ("click", "purchase") and c]
    schema = Schema(
        features=[Feature(c, "numeric" if c.startswith("D") else "categorical") for c in feats],
        tasks=[Task("click"), Task("purchase", depends_on="click")],
    )
    return DatasetSplits(schema, *frames, source=str(paths[0].parent))


@register_dataset("aliexpress")
def aliexpress(
    max_rows: int | None = None, seed: int = 2024, country: str = "NL", sample: bool = False,
    valid_fraction: float = 0.1,
) -> DatasetSplits:  # fmt: skip
    """AliExpress (AITM/MTReclib layout): click -> conversion, 16 sparse + 63 dense fields."""
    if country not in ("NL", "ES", "FR", "US"):
        raise ConfigError(f"dataset.country: {country!r} is not one of NL, ES, FR, US")
    if not 0 < valid_fraction < 1:
        raise ConfigError(f"dataset.valid_fraction: {valid_fraction} is not in (0, 1)")
    full = [RemoteFile("aliexpress", f"AliExpress_{country}/{s}.csv") for s in ("train", "test")]
    samples = [
        RemoteFile(
            "aliexpress_samples",
            f"torch_rechub_aliexpress_{s}_sample.csv",
            f"{RECHUB}/aliexpress/aliexpress_{s}_sample.csv",
            sha,
        )
        for s, sha in (
            ("train", "9a602d2bd6012b23898437f60977135b65e75c3414bf19cac0d70408b12035ef"),
            ("test", "c264673dc08e68d1c6153b48c9039a3ea4d3ff3106b071550db34e311e25d529"),
        )
    ]
    paths, _ = _first_available(full, samples, sample)
    labels = ["click", "conversion"]
    train, test = (read_frame(p, columns=labels) for p in paths)
    # The release has no validation file: hold out a fixed fraction of training rows.
    order = np.random.default_rng(2021).permutation(len(train))
    n_valid = max(1, int(len(train) * valid_fraction))
    valid = train.iloc[order[:n_valid]].reset_index(drop=True)
    train = train.iloc[order[n_valid:]].reset_index(drop=True)
    feats = [c for c in train.columns if c.startswith(("categorical_", "numerical_"))]
    schema = Schema(
        features=[
            Feature(c, "numeric" if c.startswith("numerical_") else "categorical") for c in feats
        ],
        tasks=[Task("click"), Task("conversion", depends_on="click")],
    )
    return DatasetSplits(
        schema, _cap(train, max_rows), _cap(valid, max_rows), _cap(test, max_rows),
        source=str(paths[0].parent),
    )  # fmt: skip
