"""A simulated impression -> click -> cart -> purchase funnel with known conversion probabilities.

Why it exists: on logged data the conversion rate of an impression that was not clicked is never
observed, so a CVR model's bias over the entire space cannot be measured. Here every impression
carries its true click probability (``true_ctr``) and its true post-click conversion probability
(``true_cvr``), and one knob, ``bias``, sets how strongly the click decision selects impressions
that would convert (sample selection bias, Ma et al., SIGIR 2018, Sec. 1).

Generative model (one "world" drawn from ``data_seed``; all arrays vectorised):

* 2,000 users in 20 segments, 1,000 items in 50 categories. Two independent latent spaces, each
  giving every user and item a bias and a k = 8 dimensional factor, drawn as 0.8 x its group's
  draw + 0.6 x its own (unit variance, 64 % shared with the group), so the signal is learnable
  from the group fields as well as from the ids. Affinities, standardised over impressions:
  ``z_conv = std(a_u0 + a_i0 + <a_u, a_i> / sqrt(k))`` (what makes a user buy an item) and
  ``z_ind = std(b_u0 + b_i0 + <b_u, b_i> / sqrt(k))`` (click appeal unrelated to buying).
* Impressions: users uniform, items with a Zipf-like popularity; context fields ``position``
  (1-10), ``device`` (3) and ``hour`` (0-23).
* Click: ``logit = -3.2 + sqrt(bias) z_conv + sqrt(1 - bias) z_ind + user_activity + item_appeal
  - 0.12 (position - 1) + device_click + 0.3 sin(2 pi hour / 24)``; ``true_ctr = sigmoid(logit)``.
  With ``bias = 0`` clicks are independent of the conversion affinity; with ``bias = 1`` the
  click appeal *is* the conversion affinity, so clicked impressions are the likely buyers.
* Post-click behaviour, drawn for every impression as a potential outcome and observed only where
  clicked (ESM2's decomposition, Wen et al., SIGIR 2020): cart (the D-action) with
  ``p_cart = sigmoid(-1.5 + 0.8 z_conv + device_conv)``; purchase after a cart
  ``sigmoid(-1.3 + z_conv)``, without one ``sigmoid(-4.3 + z_conv + device_conv)``.
  ``true_cvr = p_cart p_buy|cart + (1 - p_cart) p_buy|no cart`` = P(purchase | click, x).
* Labels: ``cart = click * cart_potential``, ``purchase = click * purchase_potential``
  (both ``depends_on: click``).

Resulting rates (default world): CTR about 4 %; mean true CVR over all impressions 8 %; among
clicks cart 20 % / purchase 8.5 % at ``bias = 0``, 28 % / 15 % at 0.5 and 32 % / 19 % at 1 (the
clicked rows over-represent buyers as ``bias`` grows, which is the point). ``true_ctr`` and
``true_cvr`` are carried in the frames but are neither features nor tasks: the schema lists only
what a model may read and predict.

What kind of bias this is: selection acts through user and item factors that the id and group
fields carry, so it is selection on observables. A model that learned ``true_cvr(x)`` exactly from
the clicked rows would be unbiased everywhere; a real one, fitted on ~8 k clicks concentrated in
the high-affinity region, extrapolates badly to the rest, and that error grows with ``bias``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtlrec.data.datasets.registry import DatasetSplits, register_dataset
from mtlrec.errors import ConfigError
from mtlrec.schema import Feature, Schema, Task

N_USERS, N_ITEMS, N_SEGMENTS, N_CATEGORIES, LATENT = 2000, 1000, 20, 50, 8
FEATURES = ["user_id", "user_segment", "item_id", "item_category", "position", "device", "hour"]
TRUTH = ["true_ctr", "true_cvr"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _factors(rng: np.random.Generator, groups: int, n: int, group_of: np.ndarray) -> np.ndarray:
    """Member factors [n, 1 + k] (a bias, then k latent dimensions): 0.8 x the group's draw +
    0.6 x the member's own (unit variance, 64 % of it shared with the group)."""
    group = rng.standard_normal((groups, 1 + LATENT))
    return 0.8 * group[group_of] + 0.6 * rng.standard_normal((n, 1 + LATENT))


def _affinity(user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Standardised user bias + item bias + <user, item> / sqrt(k): a main effect on each side
    and a match term, each of unit variance."""
    match = (user[:, 1:] * item[:, 1:]).sum(1) / np.sqrt(LATENT)
    return _standardise(user[:, 0] + item[:, 0] + match)


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / max(float(x.std()), 1e-12)


def generate_funnel(n: int, bias: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """``n`` impressions of one world (fixed by ``seed``); columns ``FEATURES``, the labels
    ``click``, ``cart``, ``purchase`` and the ground truth ``true_ctr``, ``true_cvr``."""
    if not 0.0 <= bias <= 1.0:
        raise ConfigError(f"dataset.bias: {bias} is outside [0, 1]")
    if n < 1:
        raise ConfigError("dataset: need at least one impression")
    rng = np.random.default_rng(seed)
    # --- the world: who is who -----------------------------------------------------------------
    segment = rng.integers(0, N_SEGMENTS, N_USERS)
    category = rng.integers(0, N_CATEGORIES, N_ITEMS)
    user_conv = _factors(rng, N_SEGMENTS, N_USERS, segment)
    item_conv = _factors(rng, N_CATEGORIES, N_ITEMS, category)
    user_click = _factors(rng, N_SEGMENTS, N_USERS, segment)
    item_click = _factors(rng, N_CATEGORIES, N_ITEMS, category)
    user_activity = rng.normal(0.0, 0.4, N_USERS)
    item_appeal = rng.normal(0.0, 0.4, N_ITEMS)
    device_click = np.array([0.0, -0.3, 0.2])
    device_conv = np.array([0.0, -0.4, 0.1])
    popularity = 1.0 / (np.arange(N_ITEMS) + 10.0) ** 0.8
    item_order = rng.permutation(N_ITEMS)  # popularity is not tied to the item id
    # --- impressions ---------------------------------------------------------------------------
    u = rng.integers(0, N_USERS, n)
    i = item_order[rng.choice(N_ITEMS, n, p=popularity / popularity.sum())]
    position = rng.integers(1, 11, n)
    device = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    hour = rng.integers(0, 24, n)
    z_conv = _affinity(user_conv[u], item_conv[i])
    z_ind = _affinity(user_click[u], item_click[i])
    click_logit = (
        -3.2
        + np.sqrt(bias) * z_conv
        + np.sqrt(1.0 - bias) * z_ind
        + user_activity[u]
        + item_appeal[i]
        - 0.12 * (position - 1)
        + device_click[device]
        + 0.3 * np.sin(2 * np.pi * hour / 24)
    )
    true_ctr = _sigmoid(click_logit)
    p_cart = _sigmoid(-1.5 + 0.8 * z_conv + device_conv[device])
    p_buy_cart = _sigmoid(-1.3 + z_conv)
    p_buy_plain = _sigmoid(-4.3 + z_conv + device_conv[device])
    true_cvr = p_cart * p_buy_cart + (1.0 - p_cart) * p_buy_plain
    # --- outcomes: potential post-click behaviour for everyone, observed where clicked -----------
    click = rng.random(n) < true_ctr
    cart_potential = rng.random(n) < p_cart
    buy_potential = rng.random(n) < np.where(cart_potential, p_buy_cart, p_buy_plain)
    return pd.DataFrame(
        {
            "user_id": u,
            "user_segment": segment[u],
            "item_id": i,
            "item_category": category[i],
            "position": position,
            "device": device,
            "hour": hour,
            "click": click.astype(np.int64),
            "cart": (click & cart_potential).astype(np.int64),
            "purchase": (click & buy_potential).astype(np.int64),
            "true_ctr": true_ctr,
            "true_cvr": true_cvr,
        }
    )


def funnel_schema() -> Schema:
    return Schema(
        features=[Feature(name) for name in FEATURES],
        tasks=[
            Task("click"),
            Task("cart", depends_on="click"),
            Task("purchase", depends_on="click"),
        ],
    )


@register_dataset("synthetic-funnel")
def synthetic_funnel(
    max_rows: int | None = None, seed: int = 2024, n_train: int = 200_000, n_valid: int = 50_000,
    n_test: int = 50_000, bias: float = 0.5, data_seed: int = 0,
) -> DatasetSplits:  # fmt: skip
    """Simulated click -> cart / purchase funnel, true CTR/CVR per impression, a `bias` knob."""
    if min(n_train, n_valid, n_test) < 1:
        raise ConfigError("dataset: n_train, n_valid and n_test must be >= 1")
    frame = generate_funnel(n_train + n_valid + n_test, bias, data_seed)
    cuts = np.cumsum([0, n_train, n_valid, n_test])
    train, valid, test = (
        frame.iloc[a:b].reset_index(drop=True) for a, b in zip(cuts[:-1], cuts[1:])
    )
    if max_rows is not None:
        train, valid, test = (
            f.iloc[:max_rows].reset_index(drop=True) for f in (train, valid, test)
        )
    return DatasetSplits(funnel_schema(), train, valid, test, source="generated")
