"""The MMoE paper's synthetic regression tasks with controllable task correlation.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018, Sec. 3.2: two orthogonal unit vectors u1, u2 in R^d; w1 = c u1,
w2 = c (p u1 + sqrt(1 - p^2) u2); x ~ N(0, I_d);
y_k = w_k^T x + sum_{i=1..m} sin(alpha_i w_k^T x + beta_i) + eps_k, eps_k ~ N(0, noise).
The Pearson correlation of the two tasks' linear parts is p, so ``p`` dials the task relatedness.
The paper leaves alpha_i, beta_i as "given parameters"; we draw them once from N(0, 1) with the
seed, which keeps the sinusoids non-trivial.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mtlrec.data.datasets.registry import DatasetSplits, register_dataset
from mtlrec.errors import ConfigError
from mtlrec.schema import Feature, Schema, Task


def generate_mmoe(
    n: int, d: int = 100, c: float = 1.0, m: int = 10, p: float = 0.5, noise: float = 0.01,
    seed: int = 0,
) -> pd.DataFrame:  # fmt: skip
    """``n`` rows with columns x0..x{d-1}, y1, y2. ``noise`` is the variance of eps."""
    if not -1.0 <= p <= 1.0:
        raise ConfigError(f"dataset.p: correlation {p} is outside [-1, 1]")
    if d < 2 or n < 1 or m < 0:
        raise ConfigError("dataset: need d >= 2, n >= 1, m >= 0")
    if not (math.isfinite(noise) and noise >= 0):  # a variance: -1 gave NaN labels
        raise ConfigError(f"dataset.noise: the variance of eps must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    # Two orthonormal vectors from a QR decomposition of a random Gaussian matrix.
    q, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = c * u1
    w2 = c * (p * u1 + np.sqrt(1.0 - p * p) * u2)
    alpha = rng.standard_normal(m)
    beta = rng.standard_normal(m)
    x = rng.standard_normal((n, d))
    out = {f"x{i}": x[:, i] for i in range(d)}
    for k, w in (("y1", w1), ("y2", w2)):
        lin = x @ w
        y = lin + np.sin(np.outer(lin, alpha) + beta).sum(1)
        out[k] = y + rng.normal(0.0, np.sqrt(noise), n)
    return pd.DataFrame(out)


@register_dataset("synthetic-mmoe")
def synthetic_mmoe(
    max_rows: int | None = None, seed: int = 2024, n: int = 10000, d: int = 100, c: float = 1.0,
    m: int = 10, p: float = 0.5, noise: float = 0.01, data_seed: int = 0,
) -> DatasetSplits:  # fmt: skip
    """MMoE paper's synthetic data (Sec. 3.2): regression tasks y1, y2 whose weight vectors have
    cosine p (the labels' correlation rises with p: about 0.11 at p=0.5, 0.7 at 0.9, 0.99 at 1).
    """
    n_valid = n_test = max(n // 5, 1)
    frame = generate_mmoe(n + n_valid + n_test, d, c, m, p, noise, data_seed)
    train, valid, test = (
        frame.iloc[:n],
        frame.iloc[n : n + n_valid].reset_index(drop=True),
        frame.iloc[n + n_valid :].reset_index(drop=True),
    )
    if max_rows is not None:
        train, valid, test = (f.iloc[:max_rows] for f in (train, valid, test))
    schema = Schema(
        features=[Feature(f"x{i}", "numeric") for i in range(d)],
        tasks=[Task("y1", "regression"), Task("y2", "regression")],
    )
    return DatasetSplits(schema, train, valid, test, source="generated")
