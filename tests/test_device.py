"""The training path on ``MTLREC_TEST_DEVICE`` (default ``cpu``; ``cuda`` where a GPU is lent).

On the CPU these repeat what other tests cover; their point is the same checks on a GPU with one
environment variable: ``MTLREC_TEST_DEVICE=cuda pytest tests/test_device.py
tests/test_model_balancer_matrix.py``. The first such run on an H200 found two CUDA-only failures
(the balancers' Gram matrix left on the device, and the entire-space BCE under CUDA autocast).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from mtlrec import config as cfg
from mtlrec.balance import build_balancer
from mtlrec.config import TrainConfig
from mtlrec.models import build_model
from mtlrec.train.run import evaluate_run, train_run
from mtlrec.train.trainer import Trainer
from tests.conftest import FUNNEL_SCHEMA, files_dataset, funnel_frame
from tests.test_model_balancer_matrix import MODELS, build_on_first_fit, tiny_funnels

DEVICE = torch.device(os.environ.get("MTLREC_TEST_DEVICE", "cpu"))


@pytest.mark.parametrize(
    ("model_name", "balancer", "precision"),
    [
        ("mmoe", "ew", "fp32"),
        ("mmoe", "ew", "bf16"),
        ("esmm", "pcgrad", "fp32"),
        ("aitm", "uw", "bf16"),
        ("ple", "gradnorm", "fp32"),
    ],
)
def test_a_model_learns_on_the_device(funnel_tables, model_name, balancer, precision):
    enc, train, valid = funnel_tables
    torch.manual_seed(0)
    model = build_model(model_name, enc.schema, enc.layout(), {"embed_dim": 4}).to(DEVICE)
    conf = TrainConfig(
        progress=False, batch_size=256, epochs=3, lr=0.01, precision=precision, device=str(DEVICE)
    )
    fit = Trainer(model, build_balancer(balancer, model), conf).fit(
        train.to(DEVICE), valid.to(DEVICE)
    )
    assert all(p.device.type == DEVICE.type for p in model.parameters())
    assert fit.history[-1].valid["click"]["auc"] > 0.7, fit.history[-1].valid


def test_a_run_trained_on_the_device_is_evaluated_on_the_cpu(tmp_path):
    """train_run on the device (checkpoints, diagnostics, test once), then `mtlrec evaluate`,
    which loads the model on the CPU: the same test metrics (to float rounding across devices)."""
    frames = {name: funnel_frame(800, seed=i) for i, name in enumerate(["train", "valid", "test"])}
    config = cfg.resolve(
        {
            "dataset": files_dataset(tmp_path / "data", frames, FUNNEL_SCHEMA),
            "model": {"name": "mmoe", "embed_dim": 4},
            "train": {
                "progress": False,
                "epochs": 2,
                "batch_size": 256,
                "device": str(DEVICE),
                "diagnose": True,
                "checkpoint_every": 2,
            },
        }
    )
    metrics = train_run(config, tmp_path / "run", echo=lambda *_: None)
    assert json.loads((tmp_path / "run" / "diagnostics.json").read_text())
    again = evaluate_run(tmp_path / "run")
    for task, values in metrics["test"].items():
        for name, value in values.items():
            assert again["test"][task][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                task,
                name,
            )


@pytest.mark.parametrize("model_name", MODELS)
def test_every_model_trains_under_bf16_autocast(model_name):
    """train.precision=bf16 on every model: a few steps, finite losses and weights. Found two
    models that broke only in bf16: AITM's CVR logit logit(pCTCVR / pCTR) met a ratio that bf16
    rounds to 1 (logit = inf, NaN gradients from the first step), and PFE's prototype update
    added bf16 rows into fp32 centres."""
    torch.manual_seed(0)
    model, table = build_on_first_fit(model_name, tiny_funnels())
    model, table = model.to(DEVICE), table.to(DEVICE)
    conf = TrainConfig(progress=False, batch_size=96, epochs=1, lr=0.01, precision="bf16")
    fit = Trainer(model, build_balancer("ew", model), conf).fit(table, table)
    assert all(math.isfinite(v) for v in fit.history[0].train_loss.values()), fit.history
    assert all(torch.isfinite(p).all() for p in model.parameters())
