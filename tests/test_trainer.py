"""Model selection on validation only, the test split read once, resume, divergence."""

import json
from pathlib import Path

import pytest
import torch

import mtlrec.train.trainer as trainer_mod
from mtlrec import config as cfg
from mtlrec.balance import build_balancer
from mtlrec.config import TrainConfig
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError, DataError
from mtlrec.models import build_model, describe_models
from mtlrec.train.run import train_run
from mtlrec.train.trainer import Trainer, TrainingDiverged
from tests.conftest import (
    FUNNEL_SCHEMA,
    files_dataset,
    funnel_frame,
    resume_matches_straight_run,
)


def _trainer(funnel_tables, **train):
    enc, _, _ = funnel_tables
    torch.manual_seed(0)
    model = build_model("shared-bottom", enc.schema, enc.layout(), {"embed_dim": 4})
    conf = TrainConfig(progress=False, batch_size=512, **train)
    return Trainer(model, build_balancer("ew", model), conf)


def test_early_stopping_restores_the_best_validation_epoch(funnel_tables, monkeypatch):
    _, train, valid = funnel_tables
    scores = iter([0.70, 0.80, 0.75, 0.74, 0.90, 0.95])
    snapshots = []

    def fake_evaluate(model, table, batch_size):
        assert table is valid  # model selection never sees another split
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"click": {"auc": next(scores)}}

    monkeypatch.setattr(trainer_mod, "evaluate", fake_evaluate)
    trainer = _trainer(funnel_tables, epochs=6, patience=1)
    result = trainer.fit(train, valid)
    assert result.best_epoch == 2
    assert result.stopped_early and len(result.history) == 4
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, snapshots[1][key]), key


def test_nan_loss_stops_with_the_task_name(funnel_tables, monkeypatch):
    _, train, valid = funnel_tables
    trainer = _trainer(funnel_tables, epochs=2)
    original = trainer.model.task_losses

    def broken(out, batch):
        losses = original(out, batch)
        return losses * torch.tensor([1.0, float("nan")])

    monkeypatch.setattr(trainer.model, "task_losses", broken)
    with pytest.raises(TrainingDiverged, match="task 'purchase'"):
        trainer.fit(train, valid)


@pytest.fixture
def files_config(tmp_path):
    frames = {"train": funnel_frame(1200, seed=1), "valid": funnel_frame(400, seed=2)}
    frames["test"] = funnel_frame(400, seed=3)
    dataset = files_dataset(tmp_path, frames, FUNNEL_SCHEMA)
    return lambda **train: cfg.resolve(
        {
            "dataset": dataset,
            "model": {"name": "mmoe", "embed_dim": 4},
            "train": {"progress": False, "batch_size": 256, **train},
        }
    )


def test_test_split_is_encoded_once_after_training(files_config, tmp_path, monkeypatch):
    calls = []
    original = Encoder.transform

    def spy(self, frame, where="data", labels=True):
        calls.append(str(where))
        return original(self, frame, where, labels)

    monkeypatch.setattr(Encoder, "transform", spy)
    train_run(files_config(epochs=2), tmp_path / "run", echo=lambda *_: None)
    test_calls = [c for c in calls if c.endswith("test.csv")]
    assert len(test_calls) == 1 and calls[-1].endswith("test.csv")


def test_resume_continues_to_the_same_result(files_config, tmp_path):
    resume_matches_straight_run(files_config, tmp_path, epochs=4, stop_after=2)
    history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3, 4]


def test_compiled_training_follows_the_eager_run(funnel_tables):
    """train.compile changes how the forward runs, not what is learned: the same seed gives the
    same losses and weights as eager mode (a loss-weighting balancer: one backward per step)."""
    enc, train, valid = funnel_tables
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("shared-bottom", enc.schema, enc.layout(), {"embed_dim": 4})
        conf = TrainConfig(progress=False, batch_size=512, epochs=2, compile=compiled, seed=5)
        trainer = Trainer(model, build_balancer("uw", model), conf)
        assert (trainer.forward is not model) == compiled  # the compiled path really runs
        fit = trainer.fit(train, valid)
        results[compiled] = (fit.history, model.state_dict())
    (eager_hist, eager_state), (comp_hist, comp_state) = results[False], results[True]
    for a, b in zip(eager_hist, comp_hist, strict=True):
        for task, loss in a.train_loss.items():
            assert b.train_loss[task] == pytest.approx(loss, rel=1e-4), task
    for key, value in eager_state.items():
        torch.testing.assert_close(comp_state[key], value, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("balancer", ["pcgrad", "gradnorm", "adatask"])
def test_compile_refuses_per_task_gradient_balancers(funnel_tables, balancer):
    """A second backward through a compiled graph returns wrong gradients (torch 2.13), so
    gradient surgery with train.compile must stop with an error naming the key, not train."""
    enc, _, _ = funnel_tables
    model = build_model("shared-bottom", enc.schema, enc.layout(), {"embed_dim": 4})
    conf = TrainConfig(progress=False, compile=True)
    with pytest.raises(cfg.ConfigError, match=rf"train.compile: balancer '{balancer}'"):
        Trainer(model, build_balancer(balancer, model), conf)


def test_bf16_precision_runs_the_forward_in_bfloat16_and_learns_like_fp32(funnel_tables):
    """train.precision=bf16 must really change the forward's dtype (a hook sees bfloat16 layer
    outputs) while the weights stay fp32 and the model learns the planted signal as well."""
    enc, train, valid = funnel_tables
    aucs, seen = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model("mmoe", enc.schema, enc.layout(), {"embed_dim": 4})
        dtypes = set()
        first_linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        first_linear.register_forward_hook(  # training steps only: evaluation stays fp32
            lambda m, i, o, d=dtypes: d.add(o.dtype) if m.training else None
        )
        conf = TrainConfig(progress=False, batch_size=256, epochs=4, lr=0.01, precision=precision)
        fit = Trainer(model, build_balancer("ew", model), conf).fit(train, valid)
        aucs[precision] = fit.history[-1].valid["click"]["auc"]
        seen[precision] = dtypes
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert seen == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert aucs["fp32"] > 0.7, aucs
    assert abs(aucs["bf16"] - aucs["fp32"]) < 0.02, aucs


@pytest.mark.parametrize("model_name", sorted(describe_models()))
def test_bf16_losses_keep_binary_cross_entropy_out_of_autocast(model_name, monkeypatch):
    """CUDA autocast refuses F.binary_cross_entropy (a loss on probabilities), so on a GPU
    train.precision=bf16 failed for every entire-space model (ESMM, AITM, ...), while CPU
    autocast let it through. Here the CPU stands in for CUDA: the patched BCE refuses to run
    while autocast is on, as CUDA's does, and every model's losses must still come out."""
    from tests.test_model_balancer_matrix import build_on_first_fit, tiny_funnels

    real_bce = torch.nn.functional.binary_cross_entropy

    def bce_refusing_autocast(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("binary_cross_entropy is unsafe to autocast")
        return real_bce(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy", bce_refusing_autocast)
    torch.manual_seed(0)
    model, table = build_on_first_fit(model_name, tiny_funnels(rows=96))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.task_losses(model(table), table)
    assert losses.dtype == torch.float32
    assert torch.isfinite(losses).all(), losses


def test_unknown_precision_is_a_config_error():
    with pytest.raises(cfg.ConfigError, match="train.precision: 'fp16'"):
        TrainConfig(precision="fp16")


def test_a_validation_task_with_one_class_is_warned_about(tmp_path):
    """No purchase among the clicked validation rows: the purchase AUC is undefined, and the run
    says so before training instead of selecting on the click AUC alone without a word."""
    valid = funnel_frame(400, seed=2)
    valid["purchase"] = 0
    frames = {"train": funnel_frame(1200, seed=1), "valid": valid}
    config = cfg.resolve(
        {
            "dataset": files_dataset(tmp_path / "data", frames, FUNNEL_SCHEMA),
            "model": {"name": "shared-bottom", "embed_dim": 4},
            "train": {"progress": False, "epochs": 1},
        }
    )
    lines: list[str] = []
    metrics = train_run(config, tmp_path / "run", echo=lines.append)
    warned = [line for line in lines if line.startswith("warning:")]
    clicked = int(valid["click"].sum())
    assert warned == [
        f"warning: {tmp_path / 'data' / 'valid.csv'}: task 'purchase' has all 0 on its "
        f"{clicked:,} observed rows; its AUC is undefined there and early stopping on AUC "
        "leaves it out"
    ]
    assert metrics["valid"]["purchase"]["auc"] is None
    assert metrics["valid"]["click"]["auc"] is not None


def test_train_run_leaves_the_callers_thread_count(files_config, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_run(files_config(epochs=1, threads=1), tmp_path / "run", echo=lambda *_: None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_resume_refuses_a_changed_configuration(files_config, tmp_path):
    out = tmp_path / "run"
    train_run(files_config(epochs=1), out, echo=lambda *_: None)
    with pytest.raises(ConfigError, match=r"cannot resume .*train.lr: 0.001 -> 0.01"):
        train_run(files_config(epochs=2, lr=0.01), out, resume=True, echo=lambda *_: None)
    lines: list[str] = []
    train_run(files_config(epochs=2), out, resume=True, echo=lines.append)  # only longer
    assert any(line.startswith("resumed from") for line in lines)


def test_resume_refuses_a_changed_schema_file(tmp_path):
    """--resume compared config.yaml only: an edited schema.yaml (a longer sequence, a task
    weight) under the same config silently mixed two schemas in one run."""
    import yaml

    frames = {"train": funnel_frame(600, seed=1), "valid": funnel_frame(200, seed=2)}
    dataset = files_dataset(tmp_path / "data", frames, FUNNEL_SCHEMA)
    config = cfg.resolve(
        {"dataset": dataset, "model": {"name": "mmoe", "embed_dim": 4}, "train": {"epochs": 1}}
    )
    out = tmp_path / "run"
    train_run(config, out, echo=lambda *_: None)
    edited = yaml.safe_load(Path(dataset["schema"]).read_text())
    edited["tasks"][1]["weight"] = 2.0
    edited["features"] = [f for f in edited["features"] if f["name"] != "price"]
    Path(dataset["schema"]).write_text(yaml.safe_dump(edited))
    longer = {**config, "train": {**config["train"], "epochs": 2}}
    with pytest.raises(
        ConfigError, match="another schema.*feature 'price' removed.*weight: 1.0 -> 2.0"
    ):
        train_run(longer, out, resume=True, echo=lambda *_: None)


def test_a_failed_start_keeps_the_earlier_run_in_the_folder(files_config, tmp_path):
    """Starting over in a finished run's folder deleted its model and metrics before the new
    run's data or model were checked: a typo cost the earlier run."""
    out = tmp_path / "run"
    train_run(files_config(epochs=1), out, echo=lambda *_: None)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad_data = files_config(epochs=1)
    bad_data["dataset"]["train"] = str(tmp_path / "nothere.csv")
    with pytest.raises(DataError, match="nothere.csv: file not found"):
        train_run(bad_data, out, echo=lambda *_: None)
    bad_model = files_config(epochs=1)
    bad_model["model"]["num_experts"] = 0
    with pytest.raises(ConfigError, match="num_experts"):
        train_run(bad_model, out, echo=lambda *_: None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_from_a_damaged_or_foreign_checkpoint_names_the_file(files_config, tmp_path):
    """A truncated, empty or foreign checkpoint.pt is an error naming it (it was a torch
    traceback, and an empty file printed only 'Aborted.'), and so is one of another model."""
    import shutil

    from mtlrec.errors import MTLRecError

    done = tmp_path / "done"
    train_run(files_config(epochs=1), done, echo=lambda *_: None)
    good = (done / "checkpoint.pt").read_bytes()
    damaged = {"truncated": good[:1000], "empty": b"", "json": b"{}"}
    for name, content in damaged.items():
        out = tmp_path / name
        shutil.copytree(done, out)
        (out / "checkpoint.pt").write_bytes(content)
        with pytest.raises(MTLRecError, match=r"checkpoint.pt: cannot read the checkpoint"):
            train_run(files_config(epochs=2), out, resume=True, echo=lambda *_: None)
    out = tmp_path / "foreign"
    shutil.copytree(done, out)
    torch.save({"a": 1}, out / "checkpoint.pt")
    with pytest.raises(MTLRecError, match=r"checkpoint.pt: not an mtlrec checkpoint"):
        train_run(files_config(epochs=2), out, resume=True, echo=lambda *_: None)
    state = torch.load(done / "checkpoint.pt", weights_only=False)
    state["model"] = {"not": torch.zeros(1)}
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(MTLRecError, match=r"checkpoint.pt: does not fit this run"):
        train_run(files_config(epochs=2), out, resume=True, echo=lambda *_: None)


def test_a_resumed_run_that_had_stopped_early_stays_stopped(funnel_tables, monkeypatch):
    """--resume of a run that stopped early (killed before metrics.json, or simply run again) must
    not train on from the last epoch and replace the best model; a larger patience may."""
    _, train, valid = funnel_tables
    scores = iter([0.70, 0.80, 0.75, 0.74, 0.90, 0.95])
    monkeypatch.setattr(
        trainer_mod, "evaluate", lambda model, table, batch_size: {"click": {"auc": next(scores)}}
    )
    first = _trainer(funnel_tables, epochs=6, patience=1)
    assert first.fit(train, valid).stopped_early and len(first.result.history) == 4
    again = _trainer(funnel_tables, epochs=6, patience=1)
    again.load_state(first.state())
    result = again.fit(train, valid)
    assert result.stopped_early and len(result.history) == 4 and result.best_epoch == 2
    for key, value in again.model.state_dict().items():
        assert torch.equal(value, first.model.state_dict()[key]), key
    longer = _trainer(funnel_tables, epochs=6, patience=3)
    longer.load_state(first.state())
    assert len(longer.fit(train, valid).history) == 6  # scores 0.90, 0.95 improve again


def test_starting_over_removes_an_earlier_runs_checkpoint_and_results(files_config, tmp_path):
    out = tmp_path / "run"
    train_run(files_config(epochs=1), out, echo=lambda *_: None)
    with pytest.raises(TrainingDiverged):  # a new run here dies in its first steps
        train_run(files_config(epochs=1, lr=1e9, optimizer="sgd"), out, echo=lambda *_: None)
    left = {p.name for p in out.iterdir()}
    assert not left & {"checkpoint.pt", "model.pt", "metrics.json", "history.json"}, left


def test_the_python_api_takes_the_same_train_options_as_the_config(funnel_tables):
    """TrainConfig built in code converts like a YAML train: section; Trainer takes a mapping or
    nothing, applies threads and diagnose itself; evaluate has the default batch size."""
    from mtlrec.train.trainer import evaluate

    with pytest.raises(ConfigError, match="train.epochs must be an integer, got 2.5"):
        TrainConfig(epochs=2.5)
    assert TrainConfig(lr="1e-3").lr == 0.001  # YAML reads 1e-3 as text
    enc, train, valid = funnel_tables
    torch.manual_seed(0)
    model = build_model("shared-bottom", enc.schema, enc.layout(), {"embed_dim": 4})
    before = torch.get_num_threads()
    try:
        trainer = Trainer(
            model, build_balancer("ew", model), {"epochs": 1, "threads": 1, "diagnose": True}
        )
        assert torch.get_num_threads() == 1 and trainer.monitor is not None
    finally:
        torch.set_num_threads(before)
    assert Trainer(model, build_balancer("ew", model)).config == TrainConfig()
    trainer.fit(train, valid)
    assert trainer.monitor.epochs and set(evaluate(model, valid)) == {"click", "purchase"}


def test_python_api_mistakes_say_what_to_do(funnel_tables, files_config, tmp_path):
    enc, train, valid = funnel_tables
    frame = funnel_frame(20, seed=9).drop(columns=["click", "purchase"])
    with pytest.raises(DataError, match="missing label column.*pass labels=False"):
        enc.transform(frame)
    assert len(enc.transform(frame, labels=False)) == 20
    with pytest.raises(TypeError, match="layout must be encoder.layout"):
        build_model("mmoe", enc.schema, enc)
    model = build_model("mmoe", enc.schema, enc.layout())
    with pytest.raises(TypeError, match="encode it first"):
        Trainer(model, build_balancer("ew", model), {"epochs": 1}).fit(frame, valid)
    partial = {"dataset": files_config()["dataset"], "model": {"name": "mmoe"}}
    with pytest.raises(ConfigError, match=r"pass mtlrec.config.resolve\(your_config\)"):
        train_run(partial, tmp_path / "run")


def test_a_model_trained_in_python_is_saved_as_a_run_folder(funnel_tables, tmp_path):
    """save_run writes what load_run, predict and evaluate --data read, like mtlrec train."""
    from mtlrec.train.predict_file import predict_file
    from mtlrec.train.run import evaluate_run, load_run, save_run
    from mtlrec.train.trainer import predict

    enc, train, valid = funnel_tables
    torch.manual_seed(0)
    model = build_model("ple", enc.schema, enc.layout(), {"embed_dim": 4, "dropout": 0.1})
    Trainer(model, build_balancer("ew", model), {"epochs": 1}).fit(train, valid)
    run = save_run(tmp_path / "run", model, enc, TrainConfig(epochs=1))
    _, encoder, loaded = load_run(run)
    for a, b in zip(predict(model, valid), predict(loaded, valid)):
        assert torch.equal(a, b)
    data = tmp_path / "valid.csv"
    funnel_frame(200, seed=2).to_csv(data, index=False)
    assert predict_file(run, data, tmp_path / "s.csv").rows == 200
    assert set(evaluate_run(run, str(data))["valid.csv"]) == {"click", "purchase"}
    with pytest.raises(ConfigError, match="saved from Python .* --data FILE"):
        evaluate_run(run)
