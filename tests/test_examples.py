"""Every example config and schema in configs/ stays valid as the code changes."""

from pathlib import Path

import pytest

from mtlrec import config as cfg
from mtlrec.models import model_class
from mtlrec.models.base import build_config
from mtlrec.schema import Schema

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_is_valid(path):
    if path.name.endswith("schema.yaml"):
        Schema.load(path)
        return
    resolved = cfg.resolve(cfg.load_yaml(path))
    cfg.train_config(resolved["train"])
    name, options = cfg.split_named(resolved["model"], "model")
    build_config(model_class(name).Config, options, name)
    assert isinstance(resolved["balance"]["name"], str)
