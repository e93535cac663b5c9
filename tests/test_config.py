import pytest

from mtlrec import config as cfg
from mtlrec.errors import ConfigError


def test_resolution_order_defaults_preset_file_overrides():
    user = {
        "dataset": {"name": "adult"},
        "model": {"name": "mmoe", "num_experts": 3},
        "train": {"lr": 0.01},
    }
    resolved = cfg.resolve(user, [cfg.parse_override("train.lr=0.02"), {"train": {"epochs": 2}}])
    assert resolved["train"]["lr"] == 0.02
    assert resolved["train"]["epochs"] == 2
    assert resolved["model"]["num_experts"] == 3
    assert resolved["train"]["batch_size"] == cfg.TrainConfig().batch_size
    assert resolved["balance"]["name"] == "fixed"


def test_override_values_are_parsed_as_yaml():
    assert cfg.parse_override("model.expert_hidden=[32, 16]") == {
        "model": {"expert_hidden": [32, 16]}
    }
    assert cfg.parse_override("train.progress=false") == {"train": {"progress": False}}


@pytest.mark.parametrize("text", ["lr=0.1", "optim.lr=0.1", "train.lr"])
def test_bad_override_names_the_key(text):
    with pytest.raises(ConfigError, match="--set"):
        cfg.parse_override(text)


def test_unknown_train_key_is_named():
    with pytest.raises(ConfigError, match="train.learning_rate"):
        cfg.train_config({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="train.epochs"):
        cfg.train_config({"epochs": "many"})


def test_unknown_section_in_file_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="trian"):
        cfg.load_yaml(path)


def test_dataset_preset_applies_its_model_block():
    resolved = cfg.resolve({"dataset": {"name": "census-income"}, "model": {"name": "mmoe"}})
    preset = cfg.preset("census-income")
    assert resolved["train"]["epochs"] == preset["train"]["epochs"]
    for key, value in preset["models"]["mmoe"]["model"].items():
        assert resolved["model"][key] == value


def test_device_is_checked_early():
    assert str(cfg.TrainConfig(device="cpu").torch_device()) == "cpu"
    assert cfg.TrainConfig(device="auto").torch_device().type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="train.device: 'gpu0'"):
        cfg.TrainConfig(device="gpu0")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            cfg.TrainConfig(device="cuda")


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("lr", float("nan"), r"train.lr must be > 0 \(got nan\)"),
        ("weight_decay", -0.1, "train.weight_decay must be >= 0"),
        ("patience", -1, "train.patience must be >= 0"),
        ("checkpoint_every", -5, "train.checkpoint_every must be >= 0"),
        ("threads", -1, "train.threads must be >= 0"),
        ("diagnose_every", 0, "train.diagnose_every must be >= 1"),
    ],
)
def test_train_values_out_of_range_are_named(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        cfg.train_config({key: value})


def test_config_changes_name_each_key_and_skip_the_allowed_ones():
    old = {"train": {"lr": 0.001, "epochs": 3, "progress": True}, "model": {"name": "mmoe"}}
    new = {
        "train": {"lr": 0.002, "epochs": 5, "progress": False},
        "model": {"name": "mmoe", "expert_hidden": (16,)},
    }
    assert cfg.config_changes(old, new) == [
        "model.expert_hidden: (unset) -> [16]",
        "train.lr: 0.001 -> 0.002",
    ]
    assert "train.epochs: 3 -> 5" in cfg.config_changes(old, new, cfg.REUSABLE_KEYS)
    same = {"train": {"lr": 0.001, "epochs": 9}, "model": {"name": "mmoe"}}
    assert cfg.config_changes(old, same) == []  # a tuple and its YAML list are the same value
    relative = {"dataset": {"name": "files", "train": "data/t.csv"}}
    absolute = cfg.resolve({}, [relative])  # stored absolute from now on
    assert cfg.config_changes({**absolute, "dataset": relative["dataset"]}, absolute) == []
