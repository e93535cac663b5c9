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


def test_schema_yaml_file_is_read(tmp_path):
    path = tmp_path / "schema.yaml"
    path.write_text(
        "features:\n  - {name: a}\n  - {name: b, type: numeric}\n"
        "tasks:\n  - {name: y, type: regression, weight: 2}\n"
    )
    schema = Schema.load(path)
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
