import pytest

from mtlrec.errors import ConfigError
from mtlrec.schema import Feature, Schema, Task
from tests.conftest import FUNNEL_SCHEMA


def test_schema_round_trips_through_json(tmp_path):
    schema = Schema.from_dict(FUNNEL_SCHEMA)
    schema.save(tmp_path / "s.json")
    again = Schema.load(tmp_path / "s.json")
    assert again == schema
    assert again.upstream_index() == [-1, 0]


def _schema_from_yaml(tmp_path, text: str) -> Schema:
    """``Schema.load`` of ``text`` written to ``tmp_path/schema.yaml``."""
    path = tmp_path / "schema.yaml"
    path.write_text(text)
    return Schema.load(path)


def test_schema_yaml_file_is_read(tmp_path):
    schema = _schema_from_yaml(
        tmp_path,
        "features:\n  - {name: a}\n  - {name: b, type: numeric}\n"
        "tasks:\n  - {name: y, type: regression, weight: 2}\n",
    )
    assert [f.type for f in schema.features] == ["categorical", "numeric"]
    assert schema.tasks[0].weight == 2


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"features": [{"name": "a", "kind": "x"}], "tasks": [{"name": "y"}]}, "kind"),
        ({"features": [{"name": "a", "type": "text"}], "tasks": [{"name": "y"}]}, "text"),
        (
            {"features": [{"name": "a"}], "tasks": [{"name": "y", "type": "multiclass"}]},
            "multiclass",
        ),
        ({"features": [{"name": "a"}], "tasks": [{"name": "y", "depends_on": "z"}]}, "'z'"),
        (
            {
                "features": [{"name": "a"}],
                "tasks": [{"name": "b", "depends_on": "c"}, {"name": "c"}],
            },
            "listed before",
        ),
        ({"features": [{"name": "a"}], "tasks": []}, "at least one task"),
        ({"features": [{"name": "a"}], "tasks": [{"name": "a"}]}, "duplicate"),
        ({"features": [{"name": "a"}], "tasks": [{"name": "y"}], "extra": 1}, "extra"),
        (
            {"features": [{"name": "a"}, {"name": "f", "column": "y"}], "tasks": [{"name": "y"}]},
            "feature 'f' reads column 'y', the label of task 'y'",
        ),
        (
            {"features": [{"name": "a"}], "tasks": [{"name": "y", "column": "a"}]},
            "feature 'a' reads column 'a'",
        ),
        ({"features": [{"name": "a"}], "tasks": [{"name": "y", "depends_on": "y"}]}, "itself"),
        ({"features": [{"name": "a"}], "tasks": [{"name": "y", "weight": -1}]}, ">= 0"),
        ({"features": [{"name": "a"}], "tasks": [{"name": "y", "weight": float("nan")}]}, "finite"),
        ({"features": [{"name": "a"}], "tasks": [{"name": "y", "weight": "abc"}]}, "'abc'"),
        (
            {
                "features": [{"name": "s", "type": "sequence", "max_len": 10**8}],
                "tasks": [{"name": "y"}],
            },
            "max_len must be between 1 and 10,000",
        ),
        (  # pred_buy_joint would be two columns: one prediction silently lost
            {
                "features": [{"name": "a"}],
                "tasks": [
                    {"name": "click"},
                    {"name": "buy", "depends_on": "click"},
                    {"name": "buy_joint", "type": "regression"},
                ],
            },
            "task 'buy_joint': the name of task 'buy''s entire-space prediction",
        ),
    ],
)
def test_bad_schema_names_the_problem(data, needle):
    with pytest.raises(ConfigError, match=needle):
        Schema.from_dict(data)


def test_schema_file_errors_name_the_file_and_entry(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("features:\n  - {name: a}\n  - {name: b, type: text}\ntasks:\n  - {name: y}\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: features\[1\]: feature 'b': type 'text'"):
        Schema.load(path)
    path.write_text("features:\n  - {name: a}\ntasks: []\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: at least one task"):
        Schema.load(path)


def test_task_weight_is_stored_as_a_float():
    schema = Schema.from_dict({"features": [{"name": "a"}], "tasks": [{"name": "y", "weight": 0}]})
    assert schema.tasks[0].weight == 0.0  # a monitored, unweighted task is allowed
    assert Task("y", weight="2.5").weight == 2.5


def test_missing_schema_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        Schema.load(tmp_path / "nope.yaml")


def test_lookups():
    schema = Schema([Feature("a"), Feature("x", "numeric")], [Task("c"), Task("p", depends_on="c")])
    assert schema.task_index("p") == 1
    assert [f.name for f in schema.features_of("numeric")] == ["x"]
    with pytest.raises(ConfigError, match="unknown task"):
        schema.task("q")


def test_schema_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "features:\n  - {name: a}\n  - {name: b, type: numeric\ntasks:\n  - {name: y}\n"
    )
    with pytest.raises(ConfigError) as info:
        Schema.load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path} line 4 column 6: not valid YAML: expected ',' or '}}'")
    assert "line 3 column 5" in message  # where the unclosed mapping began


def test_schema_that_is_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("# café\nfeatures: [{name: a}]\ntasks: [{name: y}]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml: not UTF-8 text \(byte 5, 0xe9 on line 1\)"):
        Schema.load(path)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"type": "sequence", "max_len": 2.5}, "max_len must be an integer, got 2.5"),
        ({"type": "numeric", "buckets": 2.5}, "buckets must be an integer, got 2.5"),
        ({"hash_buckets": 1.5}, "hash_buckets must be an integer, got 1.5"),
        ({"hash_buckets": True}, "hash_buckets must be an integer, got True"),
        ({"min_freq": "abc"}, "min_freq must be an integer, got 'abc'"),
        ({"type": "sequence", "sep": ""}, "sep must be a non-empty string, got ''"),
        ({"type": "sequence", "sep": 1}, "sep must be a non-empty string, got 1"),
        ({"column": ["a", "b"]}, r"column name must be a string, got \['a', 'b'\]"),
        ({"column": ""}, "column must be a column name or null"),
        ({"type": "numeric", "log": "yes please"}, "log must be true or false, got 'yes please'"),
    ],
)
def test_loosely_typed_feature_options_are_named(options, needle):
    with pytest.raises(ConfigError, match=rf"features\[0\]: feature 'a': {needle}"):
        Schema.from_dict({"features": [{"name": "a", **options}], "tasks": [{"name": "y"}]})


@pytest.mark.parametrize(
    "name, needle",
    [
        (None, "feature name is missing"),
        (1.5, r"feature name must be a string, got 1.5 \(quote it: '1.5'\)"),
        (["a"], r"feature name must be a string, got \['a'\]"),
    ],
)
def test_feature_name_must_be_text(name, needle):
    with pytest.raises(ConfigError, match=rf"features\[0\]: {needle}"):
        Schema.from_dict({"features": [{"name": name}], "tasks": [{"name": "y"}]})


@pytest.mark.parametrize(
    "task, needle",
    [
        ({"name": None}, r"tasks\[0\]: task name is missing"),
        ({"name": True}, "task name must be a string, got True"),
        ({"name": "y", "column": 2.5}, "task 'y': column name must be a string, got 2.5"),
        ({"name": "y", "weight": True}, "task 'y': weight True is not a number"),
    ],
)
def test_loosely_typed_task_options_are_named(task, needle):
    with pytest.raises(ConfigError, match=needle):
        Schema.from_dict({"features": [{"name": "a"}], "tasks": [task]})


def test_integral_floats_are_taken_as_integers():
    feature = Feature("a", "sequence", max_len=20.0, min_freq=2.0)
    assert (feature.max_len, feature.min_freq) == (20, 2)
    assert isinstance(feature.max_len, int)


def test_numeric_names_are_csv_headers(tmp_path):
    """A CSV header 0,1,2,... is text: YAML ints in name/column/depends_on read those columns."""
    schema = _schema_from_yaml(
        tmp_path,
        "features: [{name: 0}, {name: 2, type: numeric}, {name: x, column: 3}]\n"
        "tasks: [{name: 4}, {name: 5, depends_on: 4}]\n",
    )
    assert schema.required_columns() == ["0", "2", "3", "4", "5"]
    assert schema.upstream_index() == [-1, 0]
    schema.save(tmp_path / "again.json")
    assert Schema.load(tmp_path / "again.json") == schema


def test_features_must_be_a_list():
    with pytest.raises(ConfigError, match="features must be a list"):
        Schema.from_dict({"features": "a", "tasks": [{"name": "y"}]})
