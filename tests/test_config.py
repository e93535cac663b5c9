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


def _read_schema(path):
    from mtlrec.schema import Schema

    return Schema.load(path)


def _read_fusion(path):
    from mtlrec.schema import Schema
    from mtlrec.serve.config import load_serve_config

    schema = Schema.from_dict({"features": [{"name": "a"}], "tasks": [{"name": "y"}]})
    return load_serve_config(path, schema)


def _read_run_config(path):
    from mtlrec.report import read_run

    for name in ("metrics.json", "history.json"):
        (path.parent / name).write_text("{}")
    return read_run(path.parent)


@pytest.mark.parametrize("read", [cfg.load_yaml, _read_schema, _read_fusion, _read_run_config])
def test_every_yaml_file_error_is_one_line(tmp_path, read):
    """A schema, a --config, a fusion file and a run's config.yaml share one reader."""
    path = tmp_path / "config.yaml"
    path.write_text("serve:\n  weights: {y: 1\n  kind: x\n")
    with pytest.raises(ConfigError) as info:
        read(path)
    assert str(info.value) == (
        f"{path} line 3 column 7: not valid YAML: expected ',' or '}}', but got ':' "
        "(while parsing a flow mapping at line 2 column 12)"
    )
    path.write_bytes(b"train:\n  lr: 0.1 # \xe9\n")
    with pytest.raises(
        ConfigError, match=r"config.yaml: not UTF-8 text \(byte 19, 0xe9 on line 2\)"
    ):
        read(path)


def test_yaml_error_without_a_problem_mark_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: \x01\n")
    with pytest.raises(
        ConfigError, match=r"c.yaml line 2 column 7: not valid YAML: character 0x0001: special"
    ):
        cfg.load_yaml(path)


def test_unparsable_override_is_one_line():
    with pytest.raises(ConfigError) as info:
        cfg.parse_override("train.lr=[0.1")
    assert str(info.value).startswith(
        "--set 'train.lr=[0.1': value line 1 column 5: not valid YAML: expected ',' or ']'"
    )
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("epochs", 1.9, "train.epochs must be an integer, got 1.9"),
        ("epochs", float("inf"), "train.epochs must be an integer, got inf"),
        ("epochs", True, "train.epochs must be an integer, got True"),
        ("batch_size", "64", "train.batch_size must be an integer, got '64'"),
        ("lr", True, "train.lr must be a number, got True"),
        ("lr", "fast", "train.lr must be a number, got 'fast'"),
        ("lr", float("inf"), r"train.lr must be finite \(got inf\)"),
        (
            "stream_threshold_mb",
            float("nan"),
            r"train.stream_threshold_mb must be >= 0 \(got nan\)",
        ),
        ("diagnose", "yes please", "train.diagnose must be true or false, got 'yes please'"),
        ("stream", 1, "train.stream must be true or false, got 1"),
        ("device", 0, "train.device must be a string, got 0"),
    ],
)
def test_train_values_of_the_wrong_type_are_named(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        cfg.train_config({key: value})


def test_train_values_are_converted_only_when_exact():
    tc = cfg.train_config(
        {"epochs": 2.0, "lr": "1e-3", "weight_decay": 0, "diagnose": "false", "compile": "No"}
    )
    assert (tc.epochs, tc.lr, tc.weight_decay) == (2, 0.001, 0.0)  # PyYAML reads 1e-3 as text
    assert isinstance(tc.epochs, int) and isinstance(tc.weight_decay, float)
    assert tc.diagnose is False and tc.compile is False  # bool("false") was True
    assert cfg.train_config(cfg.parse_override("train.meta='TRUE'")["train"]).meta is True
    assert cfg.TrainConfig(stream_threshold_mb=float("inf")).stream_threshold_mb == float("inf")


@pytest.mark.parametrize("value", [-1, 0, -5, "abc", 2.5, True])
def test_max_rows_must_be_a_positive_integer(value):
    with pytest.raises(
        ConfigError, match=rf"dataset.max_rows: .* null for all rows; got {value!r}"
    ):
        cfg.resolve({}, [{"dataset": {"max_rows": value}}])


def test_max_rows_null_or_whole_is_kept():
    assert (
        cfg.resolve({}, [cfg.parse_override("dataset.max_rows=null")])["dataset"]["max_rows"]
        is None
    )
    assert cfg.resolve({}, [{"dataset": {"max_rows": 100.0}}])["dataset"]["max_rows"] == 100


@pytest.mark.parametrize(
    "text, sep",
    [(r"\t", "\t"), ("tab", "\t"), ("TAB", "\t"), ('"\\t"', "\t"), (";", ";"), ("' '", " ")],
)
def test_separator_spellings(text, sep):
    assert cfg.resolve({}, [cfg.parse_override(f"dataset.sep={text}")])["dataset"]["sep"] == sep


@pytest.mark.parametrize("text", ["", "5", "ab", "'||'", '"\\n"', "[a]"])
def test_bad_separator_names_the_key_and_the_tab_spelling(text):
    with pytest.raises(
        ConfigError, match=r"dataset.sep: expected one character .* write a tab as \\t or tab"
    ):
        cfg.resolve({}, [cfg.parse_override(f"dataset.sep={text}")])


@pytest.mark.parametrize(
    "args, line",
    [
        (["--max-rows", "-1"], "error: dataset.max_rows: expected an integer >= 1, or null"),
        (["--set", "train.epochs=1.9"], "error: train.epochs must be an integer, got 1.9"),
        (["--set", "dataset.sep=ab"], "error: dataset.sep: expected one character"),
        (
            ["--set", "train.lr=[0.1"],
            "error: --set 'train.lr=[0.1': value line 1 column 5: not valid YAML",
        ),
    ],
)
def test_cli_reports_bad_values_in_one_line_with_status_2(tmp_path, args, line):
    from typer.testing import CliRunner

    from mtlrec.cli import app

    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith(line)
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
