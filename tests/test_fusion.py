"""Score fusion: the formulas by hand, the safe expression parser, the ``serve:`` mapping."""

from __future__ import annotations

import numpy as np
import pytest

from mtlrec.errors import ConfigError
from mtlrec.schema import Schema
from mtlrec.serve.config import load_serve_config, serve_config
from mtlrec.serve.fusion import PRODUCT_EPS, Fusion, WeightError, compile_expression

TASKS = ["click", "purchase", "like"]
P = np.array([[0.5, 0.2, 0.1], [0.1, 0.9, 0.4], [0.0, 1.0, 0.5]])


@pytest.fixture
def schema() -> Schema:
    return Schema.from_dict(
        {
            "features": [{"name": "user"}, {"name": "price", "type": "numeric"}],
            "tasks": [
                {"name": "click"},
                {"name": "purchase", "depends_on": "click"},
                {"name": "like"},
            ],
        }
    )


def fusion(schema: Schema, **section) -> Fusion:
    return Fusion(serve_config(section, schema), schema.task_names)


def test_defaults_are_a_weighted_product_with_unit_weights(schema):
    cfg = load_serve_config(None, schema)
    assert cfg.kind == "weighted_product" and cfg.weights == dict.fromkeys(TASKS, 1.0)
    f = Fusion(cfg, TASKS)
    expected = [0.5 * 0.2 * 0.1, 0.1 * 0.9 * 0.4, PRODUCT_EPS * 1.0 * 0.5]
    np.testing.assert_allclose(f(P), expected, rtol=1e-12)
    assert f.formula() == "click ** 1 * purchase ** 1 * like ** 1"


def test_a_regression_task_is_left_out_of_the_default_fusion():
    """A regression value (here a dwell time that can be predicted negative) is no probability:
    by default it gets weight 0; a weight set in the fusion file brings it in."""
    schema = Schema.from_dict(
        {
            "features": [{"name": "user"}],
            "tasks": [{"name": "click"}, {"name": "dwell", "type": "regression"}],
        }
    )
    values = np.array([[0.5, -3.0], [0.2, 40.0]])
    f = Fusion(load_serve_config(None, schema), schema.task_names)
    np.testing.assert_allclose(f(values), [0.5, 0.2], rtol=1e-12)
    assert f.formula() == "click ** 1 * dwell ** 0"
    assert f.weights({"dwell": 1.0}).tolist() == [1.0, 1.0]  # a request may still bring it in
    g = Fusion(
        serve_config({"kind": "weighted_sum", "weights": {"dwell": 0.01}}, schema),
        ["click", "dwell"],
    )
    np.testing.assert_allclose(g(values), [0.5 - 0.03, 0.2 + 0.4], rtol=1e-12)


def test_weighted_sum_by_hand(schema):
    f = fusion(schema, kind="weighted_sum", weights={"click": 2.0, "purchase": 0.5, "like": -1})
    np.testing.assert_allclose(f(P), [1.0 + 0.1 - 0.1, 0.2 + 0.45 - 0.4, 0.0 + 0.5 - 0.5])
    assert f.formula() == "2 * click + 0.5 * purchase + -1 * like"


def test_weighted_product_by_hand_and_request_overrides(schema):
    f = fusion(schema, weights={"click": 1.0, "purchase": 2.0, "like": 0.0})
    np.testing.assert_allclose(f(P[:2]), [0.5 * 0.2**2, 0.1 * 0.9**2], rtol=1e-12)
    w = f.weights({"like": 0.5})
    np.testing.assert_allclose(w, [1.0, 2.0, 0.5])
    np.testing.assert_allclose(f(P[:2], w), [0.5 * 0.04 * 0.1**0.5, 0.1 * 0.81 * 0.4**0.5])
    assert f.formula(w) == "click ** 1 * purchase ** 2 * like ** 0.5"
    np.testing.assert_allclose(f.weights(None), [1.0, 2.0, 0.0])  # defaults untouched


def test_weight_overrides_are_checked(schema):
    f = fusion(schema, weight_bounds={"click": [0.5, 2]})
    with pytest.raises(
        WeightError, match=r"weights.click: 3.0 is outside the allowed range \[0.5, 2\]"
    ):
        f.weights({"click": 3.0})
    with pytest.raises(WeightError, match=r"weights.click: .* range \[0.5, 2\]"):
        f.weights({"click": 0.1})
    with pytest.raises(WeightError, match=r"weights.like: .* range \[0, 10\]"):
        f.weights({"like": 11})
    with pytest.raises(WeightError, match="weights.clik: unknown task"):
        f.weights({"clik": 1.0})
    with pytest.raises(WeightError, match="weights.click"):
        f.weights({"click": float("nan")})
    expr = fusion(schema, kind="expression", expression="click")
    with pytest.raises(WeightError, match="^weights: .*expression"):
        expr.weights({"click": 1.0})


def test_expression_by_hand(schema):
    f = fusion(schema, kind="expression", expression="click * purchase ** 0.5 + 0.1 * like")
    np.testing.assert_allclose(f(P), P[:, 0] * P[:, 1] ** 0.5 + 0.1 * P[:, 2], rtol=1e-12)
    assert f.formula() == "click * purchase ** 0.5 + 0.1 * like"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-(click - 1) / 2", lambda c, p, lk: -(c - 1) / 2),
        ("log(purchase + 1) + exp(-like)", lambda c, p, lk: np.log(p + 1) + np.exp(-lk)),
        ("sqrt(like) * 2 ** 3", lambda c, p, lk: np.sqrt(lk) * 8),
        (
            "min(click, purchase, like) + max(click, like)",
            lambda c, p, lk: np.minimum(np.minimum(c, p), lk) + np.maximum(c, lk),
        ),
        ("clip(purchase, 0.2, 0.5)", lambda c, p, lk: np.clip(p, 0.2, 0.5)),
        ("3", lambda c, p, lk: np.full_like(c, 3.0)),
        ("1e-3 * click", lambda c, p, lk: 1e-3 * c),
    ],
)
def test_expression_operators_and_functions(text, expected):
    expr = compile_expression(text, TASKS)
    cols = {t: P[:, j] for j, t in enumerate(TASKS)}
    np.testing.assert_allclose(expr(cols, len(P)), expected(*P.T), rtol=1e-12)


def test_expression_non_finite_rows_stay_per_row():
    expr = compile_expression("log(click)", TASKS)
    out = expr({t: P[:, j] for j, t in enumerate(TASKS)}, len(P))
    assert np.isfinite(out[:2]).all() and out[2] == -np.inf


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("__import__('os')", "'__import__' is not allowed"),
        ("__import__('os').system('true')", "attribute access is not allowed"),
        ("click.real", "attribute access is not allowed (at 'click.real')"),
        ("().__class__", "attribute access"),
        ("open('x')", "function 'open' is not allowed"),
        ("eval('1')", "function 'eval' is not allowed"),
        ("exec('import os')", "function 'exec' is not allowed"),
        ("log(click).conjugate()", "attribute access"),
        ("lambda: 1", "lambda is not allowed"),
        ("click if like else purchase", "ifexp is not allowed"),
        ("click[0]", "subscript is not allowed"),
        ("[click]", "list is not allowed"),
        ("click < 1", "compare is not allowed"),
        ("click and like", "boolop is not allowed"),
        ("'abc'", "constant 'abc' is not a number"),
        ("True + click", "constant True is not a number"),
        ("click % 2", "operator '%' is not allowed"),
        ("click // 2", "operator '//' is not allowed"),
        ("not click", "operator 'not' is not allowed"),
        ("~click", "operator '~' is not allowed"),
        ("+click", "operator 'unary +' is not allowed"),
        ("clik * 2", "unknown name 'clik'"),
        ("log", "function 'log' must be called"),
        ("log(click, 2)", "log() takes 1 argument(s), got 2"),
        ("min(click)", "min() takes at least 2 argument(s)"),
        ("log(x=click)", "positional arguments only"),
        ("log(*click)", "positional arguments only"),
        ("click *", "invalid syntax"),
        ("(click", "invalid syntax"),
        ("x := 1", "invalid syntax"),
        ("f'{click}'", "joinedstr is not allowed"),
    ],
)
def test_expression_parser_refuses_and_names_the_token(text, token):
    with pytest.raises(ConfigError) as info:
        compile_expression(text, TASKS)
    assert token in str(info.value)
    assert str(info.value).startswith("serve.expression: ")


def test_expression_limits():
    with pytest.raises(ConfigError, match="longer than"):
        compile_expression("click + " * 400 + "click", TASKS)
    compile_expression("(" * 150 + "click" + ")" * 150, TASKS)  # parentheses are no nodes
    for deep in ("-" * 100 + "click", "log(" * 80 + "click" + ")" * 80):
        with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
            compile_expression(deep, TASKS)


def test_fusion_file_round_trip(tmp_path, schema):
    path = tmp_path / "fusion.yaml"
    path.write_text(
        "serve:\n  kind: expression\n  expression: 'click * purchase ** 0.5 + 0.1 * like'\n"
        "  max_candidates: 50\n  required_fields: [user]\n  probabilities: joint\n"
    )
    cfg = load_serve_config(path, schema)
    assert (cfg.kind, cfg.max_candidates, cfg.required_fields, cfg.probabilities) == (
        "expression",
        50,
        ["user"],
        "joint",
    )
    again = tmp_path / "again.yaml"
    import yaml

    again.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_serve_config(again, schema) == cfg
    product = serve_config({"weights": {"like": 0.5}}, schema)
    again.write_text(yaml.safe_dump(product.to_dict()))
    assert load_serve_config(again, schema) == product


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"kind": "product"}, "serve.kind 'product' is not one of"),
        ({"wieghts": {}}, "unknown key(s) serve.wieghts"),
        ({"weights": {"clik": 1}}, "serve.weights: unknown task(s) 'clik'"),
        ({"weights": {"click": "a"}}, "serve.weights.click must be a finite number"),
        (
            {"weights": {"click": 20}, "weight_bounds": {"click": [0, 5]}},
            "serve.weights.click = 20 is outside its weight_bounds [0, 5]",
        ),
        ({"weight_bounds": {"click": [2, 1]}}, "min 2 is greater than max 1"),
        ({"weight_bounds": {"click": 3}}, "serve.weight_bounds.click must be [min, max]"),
        ({"max_candidates": 0}, "serve.max_candidates must be a positive integer"),
        ({"required_fields": ["nope"]}, "serve.required_fields: 'nope' is not a field"),
        ({"probabilities": "both"}, "serve.probabilities 'both' is not one of"),
        ({"kind": "expression"}, "needs serve.expression"),
        (
            {"kind": "expression", "expression": "click", "weights": {"click": 1}},
            "serve.weights is not used",
        ),
        ({"expression": "click"}, "needs serve.kind: expression"),
        ({"kind": "expression", "expression": "__import__('os')"}, "'__import__' is not allowed"),
    ],
)
def test_serve_section_errors_name_the_key(section, message, schema):
    with pytest.raises(ConfigError) as info:
        serve_config(section, schema)
    assert message in str(info.value)


def test_fusion_file_errors(tmp_path, schema):
    with pytest.raises(ConfigError, match="cannot read fusion file"):
        load_serve_config(tmp_path / "missing.yaml", schema)
    bad = tmp_path / "bad.yaml"
    bad.write_text("fusion:\n  kind: weighted_sum\n")
    with pytest.raises(ConfigError, match="single 'serve' key, found fusion"):
        load_serve_config(bad, schema)
    bad.write_text("serve: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_serve_config(bad, schema)


def test_fusion_is_vectorised_over_many_candidates(schema):
    rows = np.random.default_rng(0).random((200_000, 3))
    for section in (
        {},
        {"kind": "weighted_sum"},
        {"kind": "expression", "expression": "click * max(purchase, like)"},
    ):
        out = fusion(schema, **section)(rows)
        assert out.shape == (200_000,) and np.isfinite(out).all()


def test_core_does_not_import_the_serving_extras():
    import subprocess
    import sys

    code = (
        "import sys, mtlrec, mtlrec.cli, mtlrec.train.run, mtlrec.models, mtlrec.serve.fusion;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'uvicorn', 'onnx', 'onnxruntime', 'httpx', 'starlette'));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
