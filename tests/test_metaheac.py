"""MetaHeac (issue 7): hybrid experts and critics as an ordinary multi-task model, its scenario
mode, the meta-training loop through the trainer (``train.meta``) and fine-tuning on a held-out
scenario, which must reach a target loss in fewer steps than training from scratch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mtlrec import config as cfg
from mtlrec.balance import build_balancer
from mtlrec.config import TrainConfig
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import build_model, describe_models
from mtlrec.schema import Schema
from mtlrec.train.meta import MetaLoop, adapt
from mtlrec.train.trainer import Trainer
from tests.conftest import files_dataset, funnel_frame, resume_matches_straight_run
from tests.model_properties import (
    assert_learns_funnel_signal,
    assert_own_gradients,
    assert_partition,
)
from tests.model_properties import train_steps as _train

torch.set_num_threads(1)

VARIANTS = [{}, {"scenario_feature": "user"}, {"scenario_feature": "user", "inner_params": "head"}]


# --- a multi-scenario set: a shared signal plus a bias per scenario and task --------------------

SCENARIO_SCHEMA = {
    "features": [
        {"name": "scenario"},
        {"name": "a"},
        {"name": "b"},
        {"name": "c"},
        {"name": "x", "type": "numeric"},
    ],
    "tasks": [{"name": "click"}, {"name": "like"}],
}
SCENARIOS = 30  # 0..29 train; 30 is held out
_bias = np.random.default_rng(0).normal(0.0, 1.5, size=(SCENARIOS + 1, 2))
_bias[SCENARIOS] = [2.5, -2.0]  # the held-out scenario is far from the average one


def scenario_frame(scenarios, n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows, true probabilities [n, 2]): click and like share their feature effects across
    scenarios; each scenario shifts both logits by its own bias."""
    rng = np.random.default_rng(seed)
    s = rng.choice(np.asarray(scenarios), n)
    a, b, c = (rng.integers(0, 10, n) for _ in range(3))
    x = rng.normal(0.0, 1.0, n)
    logit1 = 2.0 * (a % 2 == 0) + 1.5 * (b < 5) - 1.75 + _bias[s, 0]
    logit2 = -1.5 * x + 1.5 * (c % 3 == 0) - 0.5 + _bias[s, 1]
    prob = 1 / (1 + np.exp(-np.stack([logit1, logit2], 1)))
    labels = (rng.random((n, 2)) < prob).astype(int)
    frame = pd.DataFrame(
        {
            "scenario": [f"s{v}" for v in s],
            **{k: v.astype(str) for k, v in (("a", a), ("b", b), ("c", c))},
            "x": x,
            "click": labels[:, 0],
            "like": labels[:, 1],
        }
    )
    return frame, prob


@pytest.fixture(scope="module")
def scenario_data():
    """Encoder fitted on the 30 training scenarios (the held-out one is out of vocabulary), the
    train / valid tables, and the held-out scenario's 64 support rows and 2,000 evaluation rows
    with the loss of the true probabilities on them."""
    train_df, _ = scenario_frame(range(SCENARIOS), 6000, seed=1)
    valid_df, _ = scenario_frame(range(SCENARIOS), 1000, seed=2)
    new_df, new_prob = scenario_frame([SCENARIOS], 2064, seed=3)
    enc = Encoder(Schema.from_dict(SCENARIO_SCHEMA)).fit(train_df)
    evaluation = enc.transform(new_df.iloc[64:])
    y, p = evaluation.labels.numpy(), new_prob[64:]
    oracle = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p), 0).sum())
    return {
        "enc": enc,
        "train": enc.transform(train_df),
        "valid": enc.transform(valid_df),
        "support": enc.transform(new_df.head(64)),
        "eval": evaluation,
        "oracle": oracle,
        "frames": (train_df, valid_df),
    }


OPTIONS = {"embed_dim": 8, "scenario_feature": "scenario"}


def _heldout_loss(model, table) -> float:
    model.eval()
    with torch.no_grad():
        return float(model.task_losses(model(table), table).sum())


# --- the model as an ordinary multi-task model ---------------------------------------------------


def test_registered_with_a_one_line_summary():
    assert describe_models()["metaheac"].startswith("MetaHeac:")


@pytest.mark.parametrize("options", VARIANTS[:2])
def test_learns_the_planted_funnel_signal(options, funnel_tables):
    enc, train, valid = funnel_tables
    torch.manual_seed(0)
    model = build_model("metaheac", enc.schema, enc.layout(), {"embed_dim": 8, **options})
    assert_learns_funnel_signal(model, train, valid)


@pytest.mark.parametrize("options", VARIANTS)
def test_task_parameters_partition_the_model_and_get_only_their_tasks_gradient(
    options, funnel_tables
):
    enc, train, _ = funnel_tables
    torch.manual_seed(0)
    model = build_model("metaheac", enc.schema, enc.layout(), options)
    assert all(assert_partition(model)), "every task owns its embedding and critic"
    assert_own_gradients(model, train.head(256))


def test_gates_are_per_task_distributions_over_experts_and_critics(funnel_tables):
    enc, train, _ = funnel_tables
    model = build_model(
        "metaheac", enc.schema, enc.layout(), {"num_experts": 5, "num_critics": 3}
    ).eval()
    with torch.no_grad():
        out = model(train.head(10))
    for key, width in (("gates", 5), ("critic_gates", 4)):  # critics: 3 shared + the task's own
        gates = out.extras[key]
        assert gates.shape == (10, 2, width)
        assert (gates >= 0).all()
        assert torch.allclose(gates.sum(-1), torch.ones(10, 2), atol=1e-5)
    # the gates read the task embedding: the two tasks mix the experts differently
    assert not torch.allclose(out.extras["gates"][:, 0], out.extras["gates"][:, 1])


def test_binary_logit_is_the_logit_of_the_critic_mixture(funnel_tables):
    enc, train, _ = funnel_tables
    torch.manual_seed(0)
    model = build_model("metaheac", enc.schema, enc.layout(), {"num_critics": 2}).eval()
    batch = train.head(8)
    with torch.no_grad():
        out = model(batch)
        fields = model.embedding(batch)
        h = torch.bmm(out.extras["gates"], model.experts(fields))
        for t, head in enumerate(model.task_modules):
            z = torch.cat([c(h[:, t]) for c in model.critics] + [head.critic(h[:, t])], 1)
            p = (out.extras["critic_gates"][:, t] * torch.sigmoid(z)).sum(1)
            assert torch.allclose(torch.sigmoid(out.logits[:, t]), p, atol=1e-5)


def test_parallel_binary_and_regression_tasks(parallel_schema):
    frame = funnel_frame(400, seed=5)
    enc = Encoder(parallel_schema).fit(frame)
    model = build_model("metaheac", enc.schema, enc.layout(), {"embed_dim": 4})
    history = _train(model, enc.transform(frame), steps=30)
    assert sum(history[-5:]) < sum(history[:5])


def test_bad_options_name_their_key(funnel_tables):
    enc, _, _ = funnel_tables
    build = lambda **o: build_model("metaheac", enc.schema, enc.layout(), o)  # noqa: E731
    with pytest.raises(ConfigError, match="model.scenario_feature: 'country'"):
        build(scenario_feature="country")
    with pytest.raises(ConfigError, match="model.scenario_feature: 'tags'"):
        build(scenario_feature="tags")  # a sequence feature cannot name a row's scenario
    with pytest.raises(ConfigError, match="model.scenario_feature.*model.max_scenarios=5"):
        build(scenario_feature="item", max_scenarios=5)
    with pytest.raises(ConfigError, match="model.inner_params"):
        build(inner_params="tower")
    with pytest.raises(ConfigError, match="model.num_expert"):
        build(num_expert=3)


@pytest.mark.parametrize(
    ("key", "value"),
    [("inner_lr", 0.0), ("inner_lr", -0.1), ("inner_steps", 0), ("meta_tasks", -1)]
    + [("meta_support", 1.0), ("meta_support", 0)],
)
def test_bad_meta_train_values_name_their_key(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        cfg.train_config({key: value})


def test_meta_train_keys_are_validated_and_resolved():
    with pytest.raises(ConfigError, match="train.inner_rate"):
        cfg.train_config({"inner_rate": 0.1})
    resolved = cfg.resolve(None, [cfg.parse_override("train.meta=true")])
    tc = cfg.train_config(resolved["train"])
    assert tc.meta and tc.inner_lr == 0.01 and tc.meta_tasks == 5 and tc.inner_steps == 1


def test_meta_training_needs_a_model_with_scenarios(funnel_tables):
    enc, _, _ = funnel_tables
    conf = TrainConfig(meta=True, progress=False)
    for name in ("mmoe", "metaheac"):  # metaheac without model.scenario_feature
        model = build_model(name, enc.schema, enc.layout())
        with pytest.raises(ConfigError, match="train.meta"):
            Trainer(model, build_balancer("ew", model), conf)


# --- the meta-training loop ----------------------------------------------------------------------


def test_episode_splits_each_drawn_scenario_into_support_and_query(scenario_data):
    enc, train = scenario_data["enc"], scenario_data["train"]
    model = build_model("metaheac", enc.schema, enc.layout(), OPTIONS)
    batch = train.head(200)
    ids = model.scenario_ids(batch)
    loop = MetaLoop(model, TrainConfig(meta=True, meta_tasks=0, meta_support=0.5))
    episode = loop.episode(batch, torch.Generator().manual_seed(0))
    eligible = {s for s in ids.tolist() if (ids == s).sum() > 1}
    assert len(episode) == len(eligible)
    seen = 0
    for support, query in episode:
        s_ids, q_ids = model.scenario_ids(support), model.scenario_ids(query)
        assert len(support) >= 1 and len(query) >= 1
        assert len(set(s_ids.tolist()) | set(q_ids.tolist())) == 1  # one scenario, both halves
        n = int((ids == s_ids[0]).sum())
        assert len(support) + len(query) == n and abs(len(support) - len(query)) <= 1
        seen += n
    assert seen == sum(int((ids == s).sum()) for s in eligible)
    capped = MetaLoop(model, TrainConfig(meta=True, meta_tasks=3))
    assert len(capped.episode(batch, torch.Generator().manual_seed(0))) == 3


@pytest.mark.parametrize(("inner_params", "inner_steps"), [("all", 1), ("head", 2)])
def test_outer_gradient_is_the_query_gradient_at_the_adapted_weights(
    inner_params, inner_steps, scenario_data
):
    """First-order MAML: d(query loss at theta')/d theta with the support gradients held fixed
    equals the query-loss gradient of a copy moved by the same SGD steps on the support rows
    (over the parameters the model adapts; the others stay at theta in both)."""
    enc, train = scenario_data["enc"], scenario_data["train"]
    torch.manual_seed(0)
    options = {**OPTIONS, "inner_params": inner_params}
    model = build_model("metaheac", enc.schema, enc.layout(), options)
    conf = TrainConfig(meta=True, meta_tasks=1, inner_lr=0.3, inner_steps=inner_steps)
    loop = MetaLoop(model, conf)
    batch = train.head(300)
    (support, query), *_ = loop.episode(batch, torch.Generator().manual_seed(7))
    loop.episode = lambda *_: [(support, query)]
    losses, _ = loop.losses(batch, epoch=0, step=0)
    losses.sum().backward()
    meta_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    stepped = adapt(model, support, steps=inner_steps, lr=0.3)
    stepped.train()
    stepped.zero_grad(set_to_none=True)
    stepped.task_losses(stepped(query), query).sum().backward()
    for name, p in stepped.named_parameters():
        assert torch.allclose(p.grad, meta_grads[name], rtol=1e-4, atol=1e-7), name


def test_meta_trained_model_adapts_to_a_held_out_scenario_faster_than_from_scratch(
    scenario_data,
):
    """Meta-train over 30 scenarios through the trainer, then fine-tune on 64 rows of an unseen
    scenario (its own bias, far from the others): the target is the held-out loss of the true
    probabilities + 0.1. From scratch, with the same rows, gets the same SGD fine-tuning and also
    Adam; neither reaches the target within 60 steps, the meta-trained model within 10."""
    d = scenario_data
    enc = d["enc"]
    torch.manual_seed(0)
    model = build_model("metaheac", enc.schema, enc.layout(), OPTIONS)
    conf = TrainConfig(
        epochs=6,
        batch_size=512,
        lr=0.01,
        meta=True,
        meta_tasks=0,
        inner_lr=0.5,
        patience=10,
        monitor="loss",
        progress=False,
    )
    trainer = Trainer(model, build_balancer("ew", model), conf)
    result = trainer.fit(d["train"], d["valid"])
    assert trainer.meta.episodes_run == 6 * d["train"].num_batches(512)
    assert result.history[-1].monitor > result.history[0].monitor  # -loss: validation improves

    target, support, evaluation = d["oracle"] + 0.1, d["support"], d["eval"]

    def steps_to_target(start, max_steps: int) -> float:
        reached: list[int] = []

        def check(step, tuned):
            if _heldout_loss(tuned, evaluation) <= target:
                reached.append(step)
                return True
            return False

        if _heldout_loss(start, evaluation) <= target:
            return 0
        adapt(start, support, max_steps, lr=0.5, on_step=check)
        return reached[0] if reached else float("inf")

    before = _heldout_loss(model, evaluation)
    assert before > target  # the unseen scenario's bias is not known before adapting
    meta_steps = steps_to_target(model, 60)
    torch.manual_seed(1)
    scratch = build_model("metaheac", enc.schema, enc.layout(), OPTIONS)
    scratch_steps = steps_to_target(scratch, 60)
    assert meta_steps <= 10 and meta_steps < scratch_steps, (meta_steps, scratch_steps)

    opt = torch.optim.Adam(scratch.parameters(), lr=0.01)  # from scratch, the usual optimizer
    best = float("inf")
    for _ in range(60):
        scratch.train()
        opt.zero_grad()
        scratch.task_losses(scratch(support), support).sum().backward()
        opt.step()
        best = min(best, _heldout_loss(scratch, evaluation))
    assert best > target, best
    # adapting leaves the meta-trained model itself unchanged
    assert _heldout_loss(model, evaluation) == pytest.approx(before)


@pytest.fixture
def scenario_files(scenario_data, tmp_path):
    train_df, valid_df = scenario_data["frames"]
    frames = {"train": train_df.head(1500), "valid": valid_df.head(400)}
    frames["test"] = valid_df.tail(400)
    dataset = files_dataset(tmp_path, frames, SCENARIO_SCHEMA)
    return lambda **train: cfg.resolve(
        {
            "dataset": dataset,
            "model": {"name": "metaheac", **OPTIONS},
            "train": {"progress": False, "batch_size": 256, "lr": 0.02, "meta": True, **train},
        }
    )


def test_train_run_meta_mode_resumes_to_the_same_result(scenario_files, tmp_path):
    a = resume_matches_straight_run(scenario_files, tmp_path, epochs=3, stop_after=1)
    assert a["test"]["click"]["auc"] > 0.6 and a["test"]["like"]["auc"] > 0.6, a["test"]
    saved = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())
    assert saved["train"]["meta"] is True and saved["model"]["scenario_feature"] == "scenario"
