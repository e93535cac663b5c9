"""Every registered model x every registered balancer runs a few training steps.

The lists come from the registries, so a newly registered model or balancer is covered without
editing this file. Each cell is tiny (three steps of 96 rows): the point is that the pair composes
(parameter groups, auxiliary losses, custom optimizers), not that it learns. A model gets the
first tiny funnel it accepts: click -> purchase, else click -> cart + click -> purchase (ESM²'s
D-action layout); one that accepts neither fails.

``MTLREC_TEST_DEVICE=cuda`` runs the same matrix on a GPU (model, batches and optimizer state on
the device), which is how the CUDA path of every pair is checked where a GPU is lent.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mtlrec.balance import describe_balancers
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import MTLModel, build_model, describe_models
from mtlrec.schema import Schema
from tests.conftest import FUNNEL_SCHEMA, funnel_frame
from tests.model_properties import balancer_steps

MODELS = list(describe_models())
# Options a model cannot be built without, naming features of the test schemas.
REQUIRED_OPTIONS = {"clover": {"sensitive_feature": "item"}}
BALANCERS = list(describe_balancers())
STEPS = 3
DEVICE = torch.device(os.environ.get("MTLREC_TEST_DEVICE", "cpu"))
SCHEMAS = {
    "click -> purchase": FUNNEL_SCHEMA,
    "click -> cart, click -> purchase": {
        "features": FUNNEL_SCHEMA["features"],
        "tasks": [
            {"name": "click"},
            {"name": "cart", "depends_on": "click"},
            {"name": "purchase", "depends_on": "click"},
        ],
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_funnels(rows: int = 288, seed: int = 11) -> dict[str, tuple]:
    """Schema label -> (encoder, table) on the same planted-signal rows (a ``cart`` column: half
    of the clicks, for the three-task layout)."""
    frame = funnel_frame(rows, seed=seed)
    rng = np.random.default_rng(seed)
    frame["cart"] = (frame["click"].astype(bool) & (rng.random(rows) < 0.5)).astype(int)
    out = {}
    for label, spec in SCHEMAS.items():
        enc = Encoder(Schema.from_dict(spec)).fit(frame)
        out[label] = (enc, enc.transform(frame))
    return out


def build_on_first_fit(name: str, funnels: dict[str, tuple], **options) -> tuple[MTLModel, object]:
    """(model, table) for the first schema the model accepts; fails naming every refusal."""
    refusals = []
    for label, (enc, table) in funnels.items():
        try:
            merged = {"embed_dim": 4, **REQUIRED_OPTIONS.get(name, {}), **options}
            return build_model(name, enc.schema, enc.layout(), merged), table
        except ConfigError as exc:
            refusals.append(f"{label}: {exc}")
    pytest.fail(f"model {name!r} accepts none of the test schemas: " + "; ".join(refusals))


@pytest.fixture(scope="module")
def funnels():
    return tiny_funnels()


def test_the_matrix_covers_the_registries():
    assert len(MODELS) >= 8 and len(BALANCERS) >= 17


@pytest.mark.parametrize("balancer_name", BALANCERS)
@pytest.mark.parametrize("model_name", MODELS)
def test_model_trains_with_balancer(model_name, balancer_name, funnels):
    torch.manual_seed(0)
    model, table = build_on_first_fit(model_name, funnels)
    model, table = model.to(DEVICE), table.to(DEVICE)
    params, moved = balancer_steps(model, table, balancer_name, STEPS)
    assert all(p.device.type == DEVICE.type for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(moved)


@pytest.mark.parametrize("name", MODELS)
def test_the_dropout_option_reaches_every_expert_and_tower(name, funnels):
    """``model.dropout`` applies to every expert block and every hidden MLP other than a gate
    (STEM's and DSelect-k's towers, HoME's experts, PFE's task experts, DMTL's and MVKE's
    towers once ignored it silently)."""
    from dataclasses import fields

    from torch import nn

    from mtlrec.models.hierarchy_experts import NormExperts
    from mtlrec.models.registry import model_class
    from mtlrec.nn.experts import Experts
    from mtlrec.nn.mlp import MLP

    if "dropout" not in {f.name for f in fields(model_class(name).Config)}:
        pytest.skip(f"{name} has no dropout option")
    model, _ = build_on_first_fit(name, funnels, dropout=0.3)
    activations = (nn.ReLU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.PReLU)
    missing = []
    for path, module in model.named_modules():
        if isinstance(module, Experts | NormExperts) and module.dropout is None:
            missing.append(path)
        hidden = isinstance(module, MLP) and any(isinstance(m, activations) for m in module)
        if hidden and "gate" not in path and not any(isinstance(m, nn.Dropout) for m in module):
            missing.append(path)
    assert not missing, missing
