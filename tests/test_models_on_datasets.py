"""Every core model trains a few steps on every dataset it applies to, and its loss falls."""

import pytest
import torch

from mtlrec.balance import build_balancer
from mtlrec.data.datasets import load_dataset
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import build_model

MODELS = ["single-task", "shared-bottom", "omoe", "mmoe", "cgc", "ple", "esmm", "aitm"]
DATASETS = {
    "adult": {"max_rows": 1500},
    "census-income": {"max_rows": 1500},
    "ali-ccp": {"sample": True},
    "aliexpress": {"sample": True},
    "synthetic-mmoe": {"n": 1500, "d": 20},
    "movielens-100k": {"max_rows": 1500},
}


@pytest.fixture(scope="module")
def encoded():
    cache = {}

    def get(name):
        if name not in cache:
            splits = load_dataset(name, **DATASETS[name])
            enc = Encoder(splits.schema).fit(splits.train)
            cache[name] = (enc, enc.transform(splits.train))
        return cache[name]

    return get


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("model_name", MODELS)
def test_loss_falls(model_name, dataset, encoded, data_dir):
    enc, table = encoded(dataset)
    torch.manual_seed(0)
    try:
        model = build_model(model_name, enc.schema, enc.layout(), {"embed_dim": 8})
    except ConfigError as exc:  # cascade models on regression tasks: not applicable
        assert model_name in ("esmm", "aitm") and "binary" in str(exc)
        pytest.skip(str(exc))
    balancer = build_balancer("ew", model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    batch = table.head(512)
    first = None
    for _ in range(25):
        out = model(batch)
        losses = model.task_losses(out, batch)
        opt.zero_grad()
        total = balancer.backward(losses, out.aux_loss)
        opt.step()
        first = float(total) if first is None else first
    assert torch.isfinite(total)
    assert float(total) < first
