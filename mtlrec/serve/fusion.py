"""Score fusion: one ranking score per candidate from its per-task predictions.

Three forms, all vectorised over the candidates (numpy on a ``[B, T]`` array, no per-row Python):

* ``weighted_sum``: ``Σ_k w_k p_k``.
* ``weighted_product``: ``Π_k p_k^{w_k}``, computed as ``exp(Σ_k w_k log p_k)``: the common
  industrial ranking formula (``pCTR^a · pCVR^b``), where a weight is an exponent and so
  scale-free across tasks whose probabilities differ by orders of magnitude. Values are clamped
  to at least ``PRODUCT_EPS`` first, so a zero probability (or a negative regression value) does
  not turn the whole score into ``-inf``/NaN.
* ``expression``: a formula over task names, e.g. ``click * purchase ** 0.5 + 0.1 * like``.

Expressions come from a config file, but they are still parsed with :mod:`ast` and compiled into a
tree of numpy operations that admits only numbers, task names, ``+ - * / **``, unary minus,
parentheses and the functions in :data:`FUNCTIONS`: nothing is ever passed to ``eval``, so a
fusion file cannot run code (``__import__('os')``, attribute access and any other call are
refused with a :class:`ConfigError` that names the offending token).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Mapping

import numpy as np

from mtlrec.errors import ConfigError, MTLRecError
from mtlrec.serve.config import ServeConfig

PRODUCT_EPS = 1e-7
MAX_EXPRESSION_CHARS = 2000
MAX_DEPTH = 64

Array = np.ndarray
Evaluator = Callable[[Mapping[str, Array]], Array | float]


def _reduce(fn: Callable[[Array, Array], Array]) -> Callable[..., Array]:
    return lambda *args: functools.reduce(fn, args)


#: name -> (min args, max args or None for any, implementation). Elementwise, like the operators.
FUNCTIONS: dict[str, tuple[int, int | None, Callable[..., Array]]] = {
    "log": (1, 1, np.log),
    "exp": (1, 1, np.exp),
    "sqrt": (1, 1, np.sqrt),
    "min": (2, None, _reduce(np.minimum)),
    "max": (2, None, _reduce(np.maximum)),
    "clip": (3, 3, np.clip),
}
_BINARY: dict[type[ast.operator], tuple[str, Callable[[Array, Array], Array]]] = {
    ast.Add: ("+", np.add),
    ast.Sub: ("-", np.subtract),
    ast.Mult: ("*", np.multiply),
    ast.Div: ("/", np.true_divide),
    ast.Pow: ("**", np.power),
}
_OPERATOR_TEXT = {
    ast.Mod: "%",
    ast.FloorDiv: "//",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitAnd: "&",
    ast.BitXor: "^",
    ast.UAdd: "unary +",
    ast.Not: "not",
    ast.Invert: "~",
}


class WeightError(MTLRecError):
    """A request's weight override is not allowed (unknown task, out of bounds, wrong kind).

    ``field`` is the request field at fault (``weights`` or ``weights.<task>``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class Expression:
    """A compiled fusion expression: call it with ``{task: values [B]}`` to get ``[B]``."""

    def __init__(self, text: str, evaluate: Evaluator, names: list[str]) -> None:
        self.text = text
        self.names = names  # the task names it reads
        self._evaluate = evaluate

    def __call__(self, columns: Mapping[str, Array], rows: int) -> Array:
        with np.errstate(all="ignore"):  # log(0), 1/0, overflow: inf/NaN, reported per row
            out = self._evaluate(columns)
        return np.broadcast_to(np.asarray(out, dtype=np.float64), (rows,)).copy()


def compile_expression(text: str, tasks: list[str], where: str = "serve.expression") -> Expression:
    """Parse and check ``text``; raises ConfigError naming the token that is not allowed."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ConfigError(f"{where}: longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        col = (exc.offset or 1) - 1
        near = text.strip()[max(col - 1, 0) : col + 10] or "end of expression"
        raise ConfigError(f"{where}: invalid syntax at column {col + 1} near {near!r}") from exc
    except (RecursionError, MemoryError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot parse ({type(exc).__name__})") from exc
    source = text.strip()
    names: list[str] = []
    task_set = set(tasks)

    def token(node: ast.AST) -> str:
        return ast.get_source_segment(source, node) or type(node).__name__

    def fail(node: ast.AST, message: str) -> ConfigError:
        return ConfigError(f"{where}: {message} (at {token(node)!r})")

    def build(node: ast.AST, depth: int) -> Evaluator:
        if depth > MAX_DEPTH:
            raise fail(node, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise fail(node, f"constant {value!r} is not a number")
            number = float(value)
            return lambda env: number
        if isinstance(node, ast.Name):
            if node.id in task_set:
                names.append(node.id)
                name = node.id
                return lambda env: env[name]
            if node.id in FUNCTIONS:
                raise fail(node, f"function {node.id!r} must be called, e.g. {node.id}(x)")
            raise fail(node, f"unknown name {node.id!r}; names are the tasks {', '.join(tasks)}")
        if isinstance(node, ast.BinOp):
            op = _BINARY.get(type(node.op))
            if op is None:
                sign = _OPERATOR_TEXT.get(type(node.op), type(node.op).__name__)
                raise fail(node, f"operator {sign!r} is not allowed; use + - * / **")
            fn = op[1]
            left, right = build(node.left, depth + 1), build(node.right, depth + 1)
            return lambda env: fn(left(env), right(env))
        if isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, ast.USub):
                sign = _OPERATOR_TEXT.get(type(node.op), type(node.op).__name__)
                raise fail(node, f"operator {sign!r} is not allowed; only unary minus is")
            operand = build(node.operand, depth + 1)
            return lambda env: np.negative(operand(env))
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute):
                raise fail(node.func, "attribute access is not allowed")
            if not isinstance(node.func, ast.Name):
                raise fail(
                    node.func, "only the functions " + ", ".join(FUNCTIONS) + " may be called"
                )
            name = node.func.id
            if name not in FUNCTIONS:
                raise fail(
                    node.func,
                    f"function {name!r} is not allowed; functions: {', '.join(FUNCTIONS)}",
                )
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                raise fail(node, f"{name}() takes positional arguments only")
            lo, hi, fn = FUNCTIONS[name]
            if len(node.args) < lo or (hi is not None and len(node.args) > hi):
                wanted = f"{lo}" if lo == hi else f"at least {lo}"
                raise fail(node, f"{name}() takes {wanted} argument(s), got {len(node.args)}")
            args = [build(a, depth + 1) for a in node.args]
            return lambda env: fn(*(a(env) for a in args))
        if isinstance(node, ast.Attribute):
            raise fail(node, "attribute access is not allowed")
        kind = type(node).__name__.lower()
        raise fail(node, f"{kind} is not allowed; use numbers, task names, + - * / ** and calls")

    try:
        evaluate = build(tree.body, 0)
    except RecursionError as exc:
        raise ConfigError(f"{where}: nested too deeply") from exc
    return Expression(source, evaluate, list(dict.fromkeys(names)))


class Fusion:
    """Fuses ``[B, T]`` predictions into ``[B]`` scores according to a :class:`ServeConfig`."""

    def __init__(self, config: ServeConfig, tasks: list[str]) -> None:
        self.config = config
        self.tasks = list(tasks)
        self.kind = config.kind
        self.expression = (
            compile_expression(config.expression or "", self.tasks)
            if config.kind == "expression"
            else None
        )
        self.default_weights = np.array(
            [config.weights.get(t, 1.0) for t in self.tasks], dtype=np.float64
        )

    def weights(self, overrides: Mapping[str, float] | None = None) -> np.ndarray:
        """The weight vector for one request: defaults with the request's checked overrides."""
        if not overrides:
            return self.default_weights
        if self.kind == "expression":
            raise WeightError("weights", "this server fuses with an expression; weights are fixed")
        w = self.default_weights.copy()
        for task, value in overrides.items():
            if task not in self.config.weights:
                raise WeightError(
                    f"weights.{task}", f"unknown task; tasks are {', '.join(self.tasks)}"
                )
            lo, hi = self.config.weight_bounds[task]
            if not np.isfinite(value) or not lo <= value <= hi:
                raise WeightError(
                    f"weights.{task}", f"{value!r} is outside the allowed range [{lo:g}, {hi:g}]"
                )
            w[self.tasks.index(task)] = value
        return w

    def __call__(self, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """``values`` [B, T] (task order of the schema) -> fused scores [B] (float64)."""
        values = np.asarray(values, dtype=np.float64)
        if self.expression is not None:
            columns = {t: values[:, j] for j, t in enumerate(self.tasks)}
            return self.expression(columns, values.shape[0])
        w = self.default_weights if weights is None else weights
        with np.errstate(all="ignore"):
            if self.kind == "weighted_sum":
                return values @ w
            return np.exp(np.log(np.maximum(values, PRODUCT_EPS)) @ w)

    def formula(self, weights: np.ndarray | None = None) -> str:
        """Human-readable formula, as /metadata and each response report it."""
        if self.expression is not None:
            return self.expression.text
        w = self.default_weights if weights is None else weights
        if self.kind == "weighted_sum":
            return " + ".join(f"{v:g} * {t}" for t, v in zip(self.tasks, w))
        return " * ".join(f"{t} ** {v:g}" for t, v in zip(self.tasks, w))
