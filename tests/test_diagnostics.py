"""Gradient diagnostics: conflict is seen where it is built in, norms match autograd by hand,
gates average to distributions, the balancer's update is untouched, and off means off."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mtlrec.balance import build_balancer, describe_balancers
from mtlrec.balance.grads import trainable
from mtlrec.cli import app
from mtlrec.config import TrainConfig
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import build_model, describe_models
from mtlrec.schema import Feature, Schema, Task
from mtlrec.train.diagnostics import DIAGNOSTICS_FILE, GradientMonitor
from mtlrec.train.trainer import Trainer
from tests.conftest import FUNNEL_SCHEMA, funnel_frame
from tests.test_model_balancer_matrix import build_on_first_fit, tiny_funnels

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _twin_tasks(relation: str):
    """(encoder, table): tasks ``a`` and ``b`` on the same rows, ``b`` = ``a`` or ``1 - a``."""
    frame = funnel_frame(640, seed=5)
    frame["a"] = frame["click"]
    frame["b"] = 1 - frame["click"] if relation == "negated" else frame["click"]
    schema = Schema(
        features=[Feature("user"), Feature("item"), Feature("price", "numeric")],
        tasks=[Task("a"), Task("b")],
    )
    enc = Encoder(schema).fit(frame)
    return enc, enc.transform(frame)


def _tied_shared_bottom(enc):
    """Both towers start with the same weights, so the tasks see the same function at first
    and only their labels decide whether their shared gradients agree or oppose."""
    torch.manual_seed(0)
    model = build_model("shared-bottom", enc.schema, enc.layout(), {"embed_dim": 4})
    model.task_modules[1].load_state_dict(model.task_modules[0].state_dict())
    return model


def _fit_with_monitor(model, table, balancer="ew", **train):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-3, progress=False, diagnose=True, **train)
    monitor = GradientMonitor.from_config(model, cfg)
    trainer = Trainer(model, build_balancer(balancer, model), cfg, monitor=monitor)
    trainer.fit(table, table)
    return monitor


def test_negated_labels_conflict_on_most_steps():
    enc, table = _twin_tasks("negated")
    monitor = _fit_with_monitor(_tied_shared_bottom(enc), table)
    epoch = monitor.epochs[0]
    assert epoch["steps_recorded"] == 10
    assert epoch["conflict_fraction"]["a/b"] > 0.5
    assert epoch["cosine"]["a/b"] < 0
    assert sum(c[0] < 0 for c in monitor.cosines) > len(monitor.cosines) / 2


def test_identical_tasks_have_cosine_one():
    enc, table = _twin_tasks("same")
    monitor = _fit_with_monitor(_tied_shared_bottom(enc), table)
    cosines = [c[0] for c in monitor.cosines]
    assert len(cosines) == 10
    assert min(cosines) > 0.9999
    assert monitor.epochs[0]["conflict_fraction"]["a/b"] == 0.0
    norms = torch.tensor(monitor.norms)
    assert torch.allclose(norms[:, 0], norms[:, 1], rtol=1e-5)


@pytest.mark.parametrize("balancer", list(describe_balancers()))
def test_norms_and_cosine_match_autograd_and_leave_the_update_alone(balancer):
    schema = Schema.from_dict(FUNNEL_SCHEMA)
    frame = funnel_frame(400, seed=6)
    enc = Encoder(schema).fit(frame)
    batch = enc.transform(frame)
    torch.manual_seed(0)
    model = build_model("shared-bottom", schema, enc.layout(), {"embed_dim": 4})
    twin = copy.deepcopy(model)

    out = model(batch)
    losses = model.task_losses(out, batch)
    monitor = GradientMonitor(schema.task_names)
    monitor.on_step(model, losses)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched

    shared = trainable(model.shared_parameters())
    flat = []
    for t in range(2):
        grads = torch.autograd.grad(losses[t], shared, retain_graph=True, allow_unused=True)
        flat.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(shared, grads)
                ]
            )
        )
    expected_norms = [float(g.norm()) for g in flat]
    expected_cos = float(flat[0] @ flat[1]) / (expected_norms[0] * expected_norms[1])
    assert monitor.norms[0] == pytest.approx(expected_norms, rel=1e-5)
    assert monitor.cosines[0][0] == pytest.approx(expected_cos, abs=1e-5)

    # Every balancer still back-propagates through the same graph, to the same gradients.
    torch.manual_seed(1)  # random balancers (rlw) draw the same weights for both
    build_balancer(balancer, model).backward(losses, out.aux_loss)
    twin_out = twin(batch)
    torch.manual_seed(1)
    build_balancer(balancer, twin).backward(twin.task_losses(twin_out, batch), twin_out.aux_loss)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-7)


def test_diagnose_every_records_every_nth_step():
    enc, table = _twin_tasks("same")
    model = _tied_shared_bottom(enc)
    batch = table.head(64)
    losses = model.task_losses(model(batch), batch)
    monitor = GradientMonitor(enc.schema.task_names, every=3)
    for _ in range(7):
        monitor.on_step(model, losses)
    assert monitor.step == [0, 3, 6] and monitor.calls == 7
    with pytest.raises(ConfigError, match="diagnose_every"):
        GradientMonitor(["a", "b"], every=0)


def test_mmoe_gate_averages_sum_to_one_per_task():
    schema = Schema.from_dict(FUNNEL_SCHEMA)
    frame = funnel_frame(640, seed=7)
    enc = Encoder(schema).fit(frame)
    table = enc.transform(frame)
    torch.manual_seed(0)
    model = build_model("mmoe", schema, enc.layout(), {"embed_dim": 4, "num_experts": 4})
    monitor = _fit_with_monitor(model, table)
    gates = monitor.epochs[0]["gates"]
    assert gates["experts"] == ["e0", "e1", "e2", "e3"]
    for task in ("click", "purchase"):
        assert sum(gates["mean"][task]) == pytest.approx(1.0, abs=1e-6)
        assert 1.0 <= gates["effective_experts"][task] <= 4.0 + 1e-9
    assert sum(gates["expert_load"]) == pytest.approx(1.0, abs=1e-6)
    assert gates["collapse_warning"] is False and monitor.warnings() == []


def test_collapsed_gate_is_flagged_and_cgc_columns_are_named():
    schema = Schema.from_dict(FUNNEL_SCHEMA)
    frame = funnel_frame(300, seed=8)
    enc = Encoder(schema).fit(frame)
    table = enc.transform(frame)
    torch.manual_seed(0)
    model = build_model("mmoe", schema, enc.layout(), {"embed_dim": 4, "num_experts": 4})
    with torch.no_grad():  # the click gate sends everything to expert 2
        model.gates[0].linear.weight.zero_()
        model.gates[0].linear.bias.copy_(torch.tensor([0.0, 0.0, 20.0, 0.0]))
    monitor = GradientMonitor(schema.task_names)
    monitor.on_epoch(1, model, table, 128)
    gates = monitor.epochs[0]["gates"]
    assert gates["collapsed"] == ["click"] and gates["collapse_warning"]
    assert gates["top_expert"]["click"] == "e2" and gates["max_share"]["click"] > 0.99
    assert "click" in monitor.warnings()[0]

    model = build_model("cgc", schema, enc.layout(), {"embed_dim": 4})
    summary = GradientMonitor(schema.task_names).gate_summary(model, table, 128)
    assert summary["experts"] == ["own0", "own1", "shared0", "shared1"]
    for row in summary["mean"].values():
        assert sum(row) == pytest.approx(1.0, abs=1e-6)
    shared_bottom = build_model("shared-bottom", schema, enc.layout(), {"embed_dim": 4})
    assert GradientMonitor(schema.task_names).gate_summary(shared_bottom, table, 128) is None


def test_single_task_model_records_nothing_and_says_why():
    schema = Schema.from_dict(FUNNEL_SCHEMA)
    frame = funnel_frame(200, seed=9)
    enc = Encoder(schema).fit(frame)
    batch = enc.transform(frame)
    model = build_model("single-task", schema, enc.layout(), {"embed_dim": 4})
    monitor = GradientMonitor(schema.task_names)
    monitor.on_step(model, model.task_losses(model(batch), batch))
    data = monitor.to_dict()
    assert data["series"]["step"] == [] and data["shared_parameters"] == 0
    assert "shares no parameters" in data["note"]


def test_long_series_are_downsampled_by_bucket_means():
    monitor = GradientMonitor(["a", "b"], max_points=10)
    for i in range(95):
        monitor.step.append(i)
        monitor.epoch.append(1)
        monitor.norms.append([1.0, 2.0])
        monitor.cosines.append([math.nan if i == 0 else -0.5])
    data = monitor.to_dict()
    series = data["series"]
    assert len(series["step"]) == 10 and series["step"][-1] == 94
    assert series["downsampled"]["from_points"] == 95
    assert series["grad_norm"]["b"] == [2.0] * 10
    assert series["cosine"]["a/b"][0] == pytest.approx(-0.5)  # NaN skipped in the mean
    json.dumps(data, allow_nan=False)  # valid JSON: no NaN anywhere


@pytest.fixture(scope="module")
def own_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("diag-data")
    funnel_frame(600, seed=1).to_csv(d / "train.csv", index=False)
    funnel_frame(300, seed=2).to_csv(d / "valid.csv", index=False)
    funnel_frame(300, seed=3).to_csv(d / "test.csv", index=False)
    (d / "schema.yaml").write_text(yaml.safe_dump(FUNNEL_SCHEMA))
    return d


def _train(d, out, *extra):
    return runner.invoke(
        app,
        [
            "train", "--train", str(d / "train.csv"), "--valid", str(d / "valid.csv"),
            "--test", str(d / "test.csv"), "--schema", str(d / "schema.yaml"),
            "--model", "mmoe", "--out", str(out), "--quiet",
            "--set", "train.threads=1", "--set", "train.batch_size=128",
            "--set", "model.embed_dim=4", *extra,
        ],
    )  # fmt: skip


def test_diagnose_flag_writes_diagnostics_and_off_writes_none(own_files, tmp_path):
    off = _train(own_files, tmp_path / "off", "--epochs", "1")
    assert off.exit_code == 0, off.output
    assert not (tmp_path / "off" / DIAGNOSTICS_FILE).exists()
    assert (
        yaml.safe_load((tmp_path / "off" / "config.yaml").read_text())["train"]["diagnose"] is False
    )

    on = _train(own_files, tmp_path / "on", "--epochs", "2", "--diagnose")
    assert on.exit_code == 0, on.output
    path = tmp_path / "on" / DIAGNOSTICS_FILE
    data = json.loads(path.read_text())
    assert yaml.safe_load((tmp_path / "on" / "config.yaml").read_text())["train"]["diagnose"]
    assert data["tasks"] == ["click", "purchase"] and data["pairs"] == [["click", "purchase"]]
    assert [e["epoch"] for e in data["epochs"]] == [1, 2]
    assert len(data["series"]["step"]) == data["steps_seen"] == 10  # 600 rows / 128, 2 epochs
    assert all("gates" in e for e in data["epochs"])

    # A resumed run keeps what the checkpoint's epochs recorded and drops anything later.
    monitor = GradientMonitor(["click", "purchase"])
    monitor.restore(path, completed_epochs=1)
    assert [e["epoch"] for e in monitor.epochs] == [1]
    assert monitor.calls == 5 and monitor.step == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("model_name", sorted(describe_models()))
def test_every_model_can_be_diagnosed(model_name):
    torch.manual_seed(0)
    model, table = build_on_first_fit(model_name, tiny_funnels(rows=192, seed=10))
    monitor = _fit_with_monitor(model, table)
    data = json.loads(json.dumps(monitor.to_dict(), allow_nan=False))
    assert [e["epoch"] for e in data["epochs"]] == [1]
    if model_name == "single-task":
        assert data["series"]["step"] == []
    else:
        assert len(data["series"]["step"]) == 3
        assert all(n > 0 for n in data["series"]["grad_norm"]["click"])


def test_a_one_task_schema_can_be_diagnosed():
    frame = funnel_frame(300, seed=5)
    schema = Schema(features=[Feature("user"), Feature("item")], tasks=[Task("click")])
    enc = Encoder(schema).fit(frame)
    table = enc.transform(frame)
    torch.manual_seed(0)
    model = build_model("mmoe", enc.schema, enc.layout(), {"embed_dim": 4})
    monitor = _fit_with_monitor(model, table)
    data = monitor.to_dict()
    assert data["pairs"] == [] and data["epochs"][0]["steps_recorded"] == 5
    assert data["epochs"][0]["grad_norm"]["click"] > 0


def test_a_checkpoint_mid_epoch_resumes_the_same_diagnostics():
    """The monitor's record is part of the checkpoint: a run resumed from a mid-epoch checkpoint
    records the same steps (and step numbers) as one never interrupted."""
    enc, table = _twin_tasks("negated")

    def trainer(**train):
        torch.manual_seed(0)
        model = build_model("shared-bottom", enc.schema, enc.layout(), {"embed_dim": 4})
        cfg = TrainConfig(batch_size=64, progress=False, diagnose=True, diagnose_every=3, **train)
        monitor = GradientMonitor.from_config(model, cfg)
        return Trainer(model, build_balancer("ew", model), cfg, monitor=monitor), monitor

    straight, expected = trainer(epochs=2)
    straight.fit(table, table)
    first, _ = trainer(epochs=2)
    states = []
    first._save = lambda: states.append(copy.deepcopy(first.state()))
    first.config.checkpoint_every = 4
    first.fit(table, table)
    mid = next(s for s in states if s["next_epoch"] == 1 and s["step_in_epoch"] == 4)
    resumed, monitor = trainer(epochs=2)
    resumed.load_state(mid)
    resumed.fit(table, table)
    assert monitor.step == expected.step and monitor.calls == expected.calls
    assert monitor.to_dict()["epochs"] == expected.to_dict()["epochs"]


def test_verdict_weights_each_epoch_by_its_defined_cosines():
    from mtlrec.report import pair_statistics

    epoch = {"steps_recorded": 10, "conflict_fraction": {"a/b": 0.5}, "cosine": {"a/b": -0.1}}
    diag = {
        "pairs": [["a", "b"]],
        "epochs": [
            {**epoch, "cosine_defined": {"a/b": 2}},
            {**epoch, "conflict_fraction": {"a/b": 0.0}, "cosine": {"a/b": 0.2}},
        ],
    }
    stats = pair_statistics(diag)["a / b"]  # 2 defined steps at 50 %, then 10 at 0 %
    assert stats["steps"] == 12 and stats["fraction"] == pytest.approx(1 / 12)
    assert stats["cosine"] == pytest.approx((2 * -0.1 + 10 * 0.2) / 12)


def test_no_collapse_is_reported_where_one_expert_is_the_design():
    from mtlrec.train.diagnostics import summarise_gates

    one = summarise_gates(torch.tensor([[1.0]]), ["a"], ["e0"], can_collapse=False)
    assert one["collapsed"] == [] and not one["collapse_warning"]
    enc, table = _twin_tasks("same")
    for name, options in (("mmoe", {"num_experts": 1}), ("dselect-k", {"k": 1})):
        torch.manual_seed(0)
        model = build_model(name, enc.schema, enc.layout(), {"embed_dim": 4, **options})
        monitor = _fit_with_monitor(model, table)
        assert monitor.warnings() == [], name


def test_a_run_that_diverges_keeps_the_steps_it_diagnosed(own_files, tmp_path):
    out = tmp_path / "diverged"
    result = _train(
        own_files, out, "--epochs", "1", "--diagnose",
        "--set", "train.optimizer=sgd", "--set", "train.lr=1e12",
    )  # fmt: skip
    assert result.exit_code == 2 and "start over" in result.output, result.output
    data = json.loads((out / DIAGNOSTICS_FILE).read_text())
    assert data["steps_seen"] >= 1 and len(data["series"]["step"]) >= 1
