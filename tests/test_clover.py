"""CLOVER (fair meta-learned recommender): shapes, options, the adversary's gradient rule, a
planted-signal check that the adversary hides the sensitive attribute, meta-training through the
trainer, the fairness measures of mtlrec.train.fairness by hand, and MovieLens-100K."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mtlrec.balance import build_balancer
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import build_model, describe_models
from mtlrec.models.fair_meta import per_user_cross_entropy
from mtlrec.schema import Schema
from mtlrec.train import fairness as fm
from mtlrec.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {
    "features": [
        {"name": "user"},
        {"name": "gender"},
        {"name": "age"},
        {"name": "item"},
        {"name": "x", "type": "numeric"},
    ],
    "tasks": [{"name": "like"}, {"name": "rating", "type": "regression"}],
}
OPTIONS = {"embed_dim": 8, "sensitive_feature": "gender", "item_fields": "item"}


def fair_frame(
    users: int, per_user: int, seed: int, first_user: int = 0, gender_effect: float = 1.0
) -> pd.DataFrame:
    """Users with a gender and an age bucket; gender shifts the score by ``gender_effect``,
    age, the item and x carry the rest."""
    rng = np.random.default_rng(seed)
    uid = np.repeat(np.arange(first_user, first_user + users), per_user)
    gender = rng.integers(0, 2, users)[uid - first_user]
    age = rng.integers(0, 4, users)[uid - first_user]
    item = rng.integers(0, 20, len(uid))
    x = rng.normal(0, 1, len(uid))
    score = (
        0.8 * x
        + 0.1 * (item % 5)
        + gender_effect * gender
        + 0.3 * age
        + rng.normal(0, 0.5, len(uid))
    )
    return pd.DataFrame(
        {
            "user": [f"u{u}" for u in uid],
            "gender": np.where(gender == 1, "F", "M"),
            "age": age.astype(str),
            "item": item.astype(str),
            "x": x,
            "like": (score > 1.0).astype(int),
            "rating": score + 2.0,
        }
    )


@pytest.fixture(scope="module")
def data():
    train_df = fair_frame(60, 20, seed=1)
    enc = Encoder(Schema.from_dict(SCHEMA)).fit(train_df)
    return enc, enc.transform(train_df)


def _model(enc, **options):
    torch.manual_seed(0)
    return build_model("clover", enc.schema, enc.layout(), {**OPTIONS, **options})


# --- shapes and options ----------------------------------------------------------------------------
def test_registered_and_shapes(data):
    enc, table = data
    assert describe_models()["clover"].startswith("CLOVER:")
    model = _model(enc).train()
    out = model(table.head(50))
    assert out.logits.shape == (50, 2)
    assert out.extras["user_rep"].shape == (50, 32)
    assert out.aux_loss is not None and out.aux_loss.ndim == 0 and out.aux_loss > 0
    model.eval()
    assert model(table.head(5)).aux_loss is None  # the adversary runs in training only
    # towers: the user reads gender and age (not the id), the item reads item
    assert model.user_idx.tolist() == [1, 2] and model.item_idx.tolist() == [3]
    assert model.user_num.tolist() == [0] and model.item_num.tolist() == []
    names = model.meta_parameter_names()
    assert not any(n.startswith("embedding.") for n in names)
    assert any(n.startswith("decision.") for n in names)
    assert any(n.startswith("discriminators.") for n in names)
    assert model.scenario_ids(table.head(4)).tolist() == model.user.local(table.head(4)).tolist()


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"sensitive_feature": ""}, "model.sensitive_feature is required"),
        ({"sensitive_feature": "sex"}, r"model.sensitive_feature: 'sex' is not a categorical"),
        ({"sensitive_feature": "x"}, r"model.sensitive_feature: 'x' is not a categorical"),
        ({"fair_weight": -1.0}, "model.fair_weight and model.group_weight must be >= 0"),
        ({"group_weight": -0.5}, "model.fair_weight and model.group_weight must be >= 0"),
        ({"user_feature": "nope"}, "model.user_feature: 'nope'"),
        ({"item_fields": "itme"}, r"model.item_fields: 'itme' not in the schema"),
        ({"user_fields": "item"}, "model.user_fields and model.item_fields both list 'item'"),
    ],
)
def test_option_errors_name_the_option(data, options, needle):
    enc, _ = data
    with pytest.raises(ConfigError, match=needle):
        build_model("clover", enc.schema, enc.layout(), {**OPTIONS, **options})


def test_a_schema_without_the_sensitive_feature_is_refused(funnel_tables):
    enc, _, _ = funnel_tables
    with pytest.raises(ConfigError, match="model.sensitive_feature is required.*user, item"):
        build_model("clover", enc.schema, enc.layout(), {})


# --- the adversary's gradients ---------------------------------------------------------------------
def _grads(model, batch, with_aux: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(batch)
    loss = model.task_losses(out, batch).sum()
    if with_aux and out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fair_weight_zero_leaves_the_recommender_gradients_alone(data):
    enc, table = data
    batch = table.head(200)
    plain = _model(enc, fair_weight=0.0).train()
    assert plain(batch).aux_loss is None
    with_aux, without = _grads(plain, batch, True), _grads(plain, batch, False)
    assert with_aux.keys() == without.keys()
    assert all(torch.equal(with_aux[n], without[n]) for n in without)
    assert not any(n.startswith("discriminators.") for n in with_aux)
    # the discriminator's weights do not matter to it either
    with torch.no_grad():
        for p in plain.discriminators.parameters():
            p.add_(1.0)
    again = _grads(plain, batch, True)
    assert all(torch.equal(again[n], without[n]) for n in without)


def _adversary_grads(model, batch, lam: float) -> dict[str, torch.Tensor]:
    model.config.fair_weight = lam
    model.zero_grad()
    model(batch).aux_loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_adversary_gradient_rule(data):
    """The discriminators get grad L_adv at detached inputs, whatever lambda; the recommender
    gets lambda x grad of the confusion loss (the frozen discriminators' cross-entropy to the
    uniform distribution), and nothing from L_adv."""
    enc, table = data
    batch = table.head(200)
    model = _model(enc, fair_weight=0.7).train()
    got = {lam: _adversary_grads(model, batch, lam) for lam in (0.7, 2.0)}
    disc = {n for n in got[0.7] if n.startswith("discriminators.")}
    rec = set(got[0.7]) - disc
    assert disc and any(n.startswith("user_layer.") for n in rec)
    assert any(n.startswith("embedding.") for n in rec)
    for n in disc:  # the discriminators' update does not depend on lambda
        assert torch.equal(got[0.7][n], got[2.0][n]), n
    for n in rec:  # the recommender's is linear in lambda
        assert torch.allclose(got[2.0][n], got[0.7][n] * (2.0 / 0.7), atol=1e-6), n

    # by hand: L_adv on detached inputs for the discriminators ...
    model.zero_grad()
    u, v = model.representations(batch)
    logits = torch.cat([h(model.decision(torch.cat([u, v], 1))) for h in model.task_modules], 1)
    users, groups, y = model.scenario_ids(batch), model.sensitive.groups(batch), batch.labels
    pred = torch.where(model.is_binary, torch.sigmoid(logits), logits).detach()
    d = model.discriminators
    d1 = d.individual_out(torch.relu(d.individual_in(torch.cat([u.detach(), y], 1))))
    d2 = d.group_out(
        torch.relu(d.group_in(torch.cat([pred, y], 1))) + torch.relu(d.group_item(v.detach()))
    )
    (
        per_user_cross_entropy(d1, groups, users) + 0.5 * per_user_cross_entropy(d2, groups, users)
    ).backward()
    for n in disc:
        assert torch.allclose(got[0.7][n], dict(model.named_parameters())[n].grad, atol=1e-6), n

    # ... and 0.7 x the uniform cross-entropy through frozen copies for the recommender
    frozen = copy.deepcopy(d).requires_grad_(False)
    model.zero_grad()
    u, v = model.representations(batch)
    logits = torch.cat([h(model.decision(torch.cat([u, v], 1))) for h in model.task_modules], 1)
    pred = torch.where(model.is_binary, torch.sigmoid(logits), logits)

    def uniform_ce(z: torch.Tensor) -> torch.Tensor:
        ids, inverse = torch.unique(users, return_inverse=True)
        mean = torch.stack([z[inverse == i].mean(0) for i in range(len(ids))])
        return (-torch.log_softmax(mean, 1).mean(1)).mean()

    f1 = frozen.individual_out(torch.relu(frozen.individual_in(torch.cat([u, y], 1))))
    f2 = frozen.group_out(
        torch.relu(frozen.group_in(torch.cat([pred, y], 1))) + torch.relu(frozen.group_item(v))
    )
    (0.7 * (uniform_ce(f1) + 0.5 * uniform_ce(f2))).backward()
    for n in rec:
        assert torch.allclose(got[0.7][n], dict(model.named_parameters())[n].grad, atol=1e-5), n


def test_uniform_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 0.0]])
    users = torch.tensor([1, 1, 2])
    got = per_user_cross_entropy(logits, torch.tensor([0, 0, 1]), users, uniform=True)
    # user 1: mean logits (3, 0) -> -(log p0 + log p1) / 2; user 2: log 2
    p0 = math.exp(3) / (math.exp(3) + 1)
    want = (-(math.log(p0) + math.log(1 - p0)) / 2 + math.log(2)) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_per_user_cross_entropy_averages_logits_per_user():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    target = torch.tensor([0, 0, 1, -1])
    users = torch.tensor([7, 7, 3, 3])
    got = per_user_cross_entropy(logits, target, users)
    ce = torch.nn.functional.cross_entropy
    want = (ce(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) + ce(logits[2:3], target[2:3])) / 2
    assert torch.allclose(got, want)


# --- planted signal: the adversary hides the attribute ---------------------------------------------
def _attacker(model, enc, train_df, test_df) -> float:
    train, test = enc.transform(train_df), enc.transform(test_df)
    users_tr, users_te = model.user.local(train), model.user.local(test)
    _, rep_tr, grp_tr = fm.user_representations(model, train, users_tr, model.sensitive)
    _, rep_te, grp_te = fm.user_representations(model, test, users_te, model.sensitive)
    return fm.attacker_auc(rep_tr, grp_tr, rep_te, grp_te, epochs=150, lr=0.01, seed=0)


def test_the_adversary_lowers_the_attacker_auc():
    """Gender is an input of the user tower (so the user representation encodes it by
    construction: attacker AUC near 1 without the adversary) but carries no signal; with
    lambda = 1 the representation stops revealing it."""
    train_df = fair_frame(80, 12, seed=3, gender_effect=0.0)
    test_df = fair_frame(80, 12, seed=4, first_user=1000, gender_effect=0.0)
    enc = Encoder(Schema.from_dict(SCHEMA)).fit(pd.concat([train_df, test_df]))
    table = enc.transform(train_df)
    aucs = {}
    for lam in (0.0, 1.0):
        model = _model(enc, fair_weight=lam, group_weight=0.0, rep_dim=8, user_fields="gender,age")
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(80):  # the game needs a few hundred steps to settle
            for batch in table.batches(240, shuffle=True, generator=gen):
                out = model(batch)
                loss = model.task_losses(out, batch).sum()
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss
                opt.zero_grad()
                loss.backward()
                opt.step()
        aucs[lam] = _attacker(model, enc, train_df, test_df)
    assert aucs[0.0] > 0.9, aucs
    assert aucs[1.0] < aucs[0.0] - 0.2, aucs


# --- meta-training --------------------------------------------------------------------------------
def test_meta_training_runs_and_the_loss_falls(data):
    enc, table = data
    model = _model(enc)
    config = {
        "epochs": 20,
        "batch_size": 600,
        "lr": 0.01,
        "meta": True,
        "meta_tasks": 8,
        "inner_steps": 2,
        "patience": 100,
        "progress": False,
    }
    trainer = Trainer(model, build_balancer("ew", model), config)
    before = _loss(model, table)
    trainer.fit(table, table.head(300))
    assert trainer.meta.episodes_run > 0 and trainer.meta.fallbacks == 0
    assert _loss(model, table) < 0.7 * before


def _loss(model, table) -> float:
    model.eval()
    with torch.no_grad():
        return float(model.task_losses(model(table), table).sum())


def test_adapt_changes_only_the_local_parameters(data):
    from mtlrec.train.meta import adapt

    enc, table = data
    model = _model(enc)
    tuned = adapt(model, table.head(20), steps=3, lr=0.05)
    for (n, p), (_, q) in zip(model.named_parameters(), tuned.named_parameters(), strict=True):
        assert torch.equal(p, q) == n.startswith("embedding."), n


# --- the fairness measures by hand ------------------------------------------------------------------
def test_group_gap_by_hand():
    pred = torch.tensor([[1.0], [3.0], [2.0], [2.0], [5.0]])
    labels = torch.tensor([[2.0], [2.0], [2.0], [4.0], [4.0]])
    users = torch.tensor([0, 0, 1, 2, 2])
    groups = torch.tensor([0, 0, 0, 1, 1])
    # user 0: MAE 1, user 1: 0 -> group 0: 0.5; user 2: (2 + 1) / 2 = 1.5 -> group 1: 1.5
    assert fm.group_gap(pred, labels, users, groups) == pytest.approx([1.0])
    assert math.isnan(fm.group_gap(pred, labels, users, torch.zeros(5, dtype=torch.long))[0])


class _Lookup(torch.nn.Module):
    """A 'model' whose prediction is 10 x the sensitive column's local index plus the row's x."""

    num_tasks = 1

    def __init__(self, column: fm.CategoricalColumn) -> None:
        super().__init__()
        self.column = column

    def forward(self, batch):
        from mtlrec.models.base import ModelOutput

        value = 10.0 * self.column.local(batch).float() + batch.num[:, 0]
        return ModelOutput(logits=value.unsqueeze(1), extras={"user_rep": batch.num})

    def predict(self, out):
        return out.logits, out.logits


def test_counterfactual_gap_by_hand():
    from mtlrec.data.table import TensorTable

    column = fm.CategoricalColumn("s", 0, 5, 4)  # 3 groups at rows 6, 7, 8 (5 = unknown)
    cat = torch.tensor([[6], [6], [8], [5]])
    table = TensorTable(
        cat, torch.zeros(4, 0, dtype=torch.long), torch.ones(4, 1), torch.zeros(4, 1)
    )
    model = _Lookup(column)
    # rows of group 0 move by 10 and 20 (mean 15), the group-2 row by 20 and 10 (15); the unknown
    # row is left out
    assert fm.counterfactual_gap(model, table, column) == pytest.approx([15.0])
    users = torch.tensor([0, 0, 1, 2])
    assert fm.counterfactual_gap(model, table, column, users) == pytest.approx([15.0])
    two = fm.CategoricalColumn("s", 0, 5, 3)
    cat2 = torch.tensor([[6], [7], [7]])
    table2 = TensorTable(cat2, table.seq[:3], table.num[:3], table.labels[:3])
    assert fm.counterfactual_gap(_Lookup(two), table2, two) == pytest.approx([10.0])


def test_attacker_auc_reads_a_planted_attribute():
    gen = torch.Generator().manual_seed(0)
    group = torch.randint(0, 2, (400,), generator=gen)
    leaky = torch.randn(400, 4, generator=gen) + 3.0 * group.unsqueeze(1).float()
    noise = torch.randn(400, 4, generator=gen)
    assert fm.attacker_auc(leaky[:300], group[:300], leaky[300:], group[300:], epochs=30) > 0.95
    fair = fm.attacker_auc(noise[:300], group[:300], noise[300:], group[300:], epochs=30)
    assert 0.3 < fair < 0.7
    assert math.isnan(fm.attacker_auc(noise, group, noise[:5], torch.zeros(5, dtype=torch.long)))


def test_per_user_mean_by_hand():
    ids, mean = fm.per_user_mean(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([4, 2, 4]))
    assert ids.tolist() == [2, 4] and mean.squeeze(1).tolist() == [3.0, 3.0]


def test_cold_start_predictions_adapt_per_user(data):
    enc, _ = data
    test_df = fair_frame(6, 8, seed=9, first_user=500)
    table = enc.transform(test_df)
    model = _model(enc)
    users = torch.as_tensor(pd.factorize(test_df["user"])[0])
    cold = fm.cold_start_predictions(model, table, users, model.sensitive, 5, 3, 0.05)
    assert len(cold.rows) == 6 * 3 and cold.pred.shape == (18, 2) and cold.user_rep.shape[0] == 6
    assert (cold.cf_gap >= 0).all()
    with pytest.raises(ValueError, match="more than 8 rows"):
        fm.cold_start_predictions(model, table, users, model.sensitive, 8, 1, 0.05)


# --- MovieLens-100K -------------------------------------------------------------------------------
def test_trains_on_movielens(data_dir):
    from mtlrec.data.datasets import movielens as ml

    if not (data_dir / ml.FOLDER).is_dir():
        pytest.skip(f"MTLREC_DATA_DIR has no {ml.FOLDER}/ folder")
    from mtlrec.data.datasets import load_dataset

    splits = load_dataset("movielens-100k", max_rows=3000)
    enc = Encoder(splits.schema).fit(splits.train)
    train, valid = enc.transform(splits.train), enc.transform(splits.valid)
    torch.manual_seed(0)
    options = {
        "sensitive_feature": "gender",
        "user_fields": "age,gender,occupation,zip_region",
        "item_fields": "movie,year,genres",
    }
    model = build_model("clover", enc.schema, enc.layout(), options)
    config = {"epochs": 2, "batch_size": 1500, "meta": True, "meta_tasks": 8, "progress": False}
    trainer = Trainer(model, build_balancer("ew", model), config)
    trainer.fit(train, valid)
    assert trainer.meta.episodes_run > 0
    pred = model.predict(model.eval()(valid))[0]
    assert torch.isfinite(pred).all()
