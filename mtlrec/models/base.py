"""What every multi-task model shares: config, inputs, losses, predictions, parameter groups.

A model is built from ``(schema, layout, config)``. ``forward(batch)`` returns a
:class:`ModelOutput` with one logit (or regression value) per task. The base class owns the
per-task losses and the conversion to probabilities, so a model only overrides them where its
paper says so (ESMM and AITM supervise entire-space probabilities, for instance).

Parameter groups: modules stored in ``self.task_modules`` (one entry per task, schema order)
belong to that task; every other parameter is shared. Gradient-surgery balancers work on the
shared ones and leave each task's own parameters with that task's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtlrec.data.encoder import InputLayout
from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.nn.embedding import InputEmbedding
from mtlrec.schema import Schema

PROB_EPS = 1e-7


@dataclass
class ModelConfig:
    """Options every model has. Subclasses add their own fields with defaults."""

    embed_dim: int = 16
    dropout: float = 0.0


@dataclass
class ModelOutput:
    """``logits``: [B, T], for a dependent task the logit of P(task | upstream positive).

    ``joint``: optional [B, T] entire-space probabilities P(task and all its upstream tasks) for
    models that predict them directly (AITM); otherwise they are derived by the chain rule.
    ``aux_loss``: an extra scalar loss the model adds (calibration, distillation, ...).
    ``extras``: tensors for diagnostics, e.g. ``{"gates": [B, T, E]}``.
    """

    logits: torch.Tensor
    joint: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class MTLModel(nn.Module):
    """Base class; subclasses set ``Config`` and implement ``forward``."""

    Config: ClassVar[type[ModelConfig]] = ModelConfig
    name: ClassVar[str] = "base"

    def __init__(self, schema: Schema, layout: InputLayout, config: ModelConfig) -> None:
        super().__init__()
        self.schema = schema
        self.layout = layout
        self.config = config
        self.num_tasks = len(schema.tasks)
        self.register_buffer(
            "is_binary", torch.tensor([t.type == "binary" for t in schema.tasks]), persistent=False
        )
        upstream = schema.upstream_index()
        self.register_buffer("upstream", torch.tensor(upstream), persistent=False)
        self.has_dependency = any(u >= 0 for u in upstream)
        self.all_binary = all(t.type == "binary" for t in schema.tasks)
        self.task_modules: nn.ModuleList = nn.ModuleList()

    # --- building blocks -----------------------------------------------------------------------
    def make_embedding(self) -> InputEmbedding:
        return InputEmbedding(self.layout, self.config.embed_dim)

    def forward(self, batch: TensorTable) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- losses ----------------------------------------------------------------------------------
    def observed_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, T] 1.0 where a task's label is observed: its upstream task is positive."""
        up = self.upstream.clamp_min(0)
        return torch.where(self.upstream >= 0, labels[:, up], torch.ones_like(labels))

    def task_losses(self, out: ModelOutput, batch: TensorTable) -> torch.Tensor:
        """[T] per-task losses: BCE (binary) or MSE (regression) over each task's observed rows."""
        labels = batch.labels
        bce = F.binary_cross_entropy_with_logits(out.logits, labels, reduction="none")
        if self.all_binary:  # fewer small ops per step: they cost more than their arithmetic
            per_row = bce
        else:
            per_row = torch.where(self.is_binary, bce, (out.logits - labels).pow(2))
        if not self.has_dependency:  # every row observed for every task
            return per_row.sum(0) / max(per_row.shape[0], 1)
        mask = self.observed_mask(labels)
        return (per_row * mask).sum(0) / mask.sum(0).clamp_min(1.0)

    def entire_space_losses(self, joint: torch.Tensor, out: ModelOutput, batch: TensorTable):
        """[T] losses where binary tasks are supervised by their entire-space probability over
        all rows (ESMM Eq. 4, AITM Eq. 8); a dependent task's label over the entire space is its
        own column, since a positive implies its upstream is positive (the encoder checks it)."""
        labels = batch.labels
        # BCE of a probability (not a logit) in fp32 and outside autocast: CUDA autocast refuses
        # F.binary_cross_entropy (train.precision=bf16 failed for every entire-space model on a
        # GPU), and bf16 rounds 1 - PROB_EPS to 1, so the clamp must happen in fp32 too. In fp32
        # training `.float()` is a no-op, so the numerics there are unchanged.
        p = joint.float().clamp(PROB_EPS, 1 - PROB_EPS)
        with torch.autocast(p.device.type, enabled=False):
            bce = F.binary_cross_entropy(p, labels.float(), reduction="none")
        mse = (out.logits - labels).pow(2)
        return torch.where(self.is_binary, bce, mse).mean(0)

    def chain_losses(self, out: ModelOutput, batch: TensorTable) -> torch.Tensor:
        """[T] entire-space losses of the chain-rule joint probabilities (ESMM's pCTCVR =
        pCTR x pCVR, generalised to any chain)."""
        return self.entire_space_losses(self.chain_joint(torch.sigmoid(out.logits)), out, batch)

    # --- predictions -----------------------------------------------------------------------------
    def predict(self, out: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, joint) predictions [B, T]: probabilities for binary tasks, values for
        regression. ``joint`` is P(task and its upstream chain); equal to ``conditional`` for
        tasks without a dependency."""
        cond = torch.where(self.is_binary, torch.sigmoid(out.logits), out.logits)
        if out.joint is not None:
            return cond, torch.where(self.upstream >= 0, out.joint, cond)
        return cond, self.chain_joint(cond)

    def chain_joint(self, cond: torch.Tensor) -> torch.Tensor:
        if not self.has_dependency:
            return cond
        cols = list(cond.unbind(1))
        for t, up in enumerate(self.upstream.tolist()):
            if up >= 0:
                cols[t] = cols[t] * cols[up]
        return torch.stack(cols, 1)

    # --- parameter groups ----------------------------------------------------------------------
    def task_parameters(self) -> list[list[nn.Parameter]]:
        if len(self.task_modules) != self.num_tasks:
            return [[] for _ in range(self.num_tasks)]
        return [list(m.parameters()) for m in self.task_modules]

    def leaf_task_parameters(self) -> list[list[nn.Parameter]]:
        """Per-task ownership for entire-space chains: a task's module is its own unless another
        task depends on it, since then it also feeds that task's joint-probability loss and is
        shared."""
        upstream_of_someone = set(self.upstream.tolist())
        return [
            [] if t in upstream_of_someone else list(m.parameters())
            for t, m in enumerate(self.task_modules)
        ]

    def shared_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for group in self.task_parameters() for p in group}
        return [p for p in self.parameters() if id(p) not in own]

    def training_only_features(self) -> tuple[str, ...]:
        """Schema features the model reads in training only (DMT's bias network over position,
        page...): scoring neither reads them nor needs the file or request to carry them."""
        return ()

    def require_binary_chain(self) -> None:
        """Cascade models need binary tasks; a regression task cannot be a funnel step."""
        bad = [t.name for t in self.schema.tasks if t.type != "binary"]
        if bad:
            raise ConfigError(f"model {self.name!r} needs binary tasks; {', '.join(bad)} is not")


@dataclass(frozen=True)
class CategoricalColumn:
    """A categorical feature's column of ``batch.cat``: local index 0 is the out-of-vocabulary
    bucket, 1..``size``-1 the values seen in training. A value's *group* is its local index - 1
    (-1: unknown)."""

    name: str
    column: int
    offset: int
    size: int  # with the out-of-vocabulary bucket

    @property
    def num_groups(self) -> int:
        return self.size - 1

    def local(self, batch: TensorTable) -> torch.Tensor:
        """[B] local index (0 = out of vocabulary)."""
        return (batch.cat[:, self.column] - self.offset).clamp(0, self.size - 1)

    def groups(self, batch: TensorTable) -> torch.Tensor:
        """[B] group of every row, -1 for an out-of-vocabulary value."""
        return self.local(batch) - 1

    def with_group(self, batch: TensorTable, group: int) -> TensorTable:
        """A copy of ``batch`` whose column holds ``group`` on every row (the counterfactual)."""
        cat = batch.cat.clone()
        cat[:, self.column] = self.offset + group + 1
        return TensorTable(cat, batch.seq, batch.num, batch.labels)


def categorical_column(
    schema: Schema, layout: InputLayout, name: str, option: str, buckets: bool = False
) -> CategoricalColumn:
    """The ``batch.cat`` column of the categorical feature ``name`` (with ``buckets``, a
    bucketised numeric feature too: its buckets are the values); a ConfigError naming ``option``
    when it is empty, unknown or of another type."""
    kinds = ("categorical", "numeric") if buckets else ("categorical",)
    embedded = schema.embedded_fields()[: layout.num_categorical]  # sequence fields come after
    usable = [f.name for f in embedded if f.type in kinds]
    kind = "categorical (or bucketised numeric)" if buckets else "categorical"
    if not name:
        raise ConfigError(
            f"{option} is required: the {kind} feature to use; choose one of: "
            f"{', '.join(usable) or '(none)'}"
        )
    for j, feat in enumerate(embedded):
        if feat.name == name and feat.type in kinds:
            return CategoricalColumn(name, j, layout.field_offsets[j], layout.field_sizes[j])
    raise ConfigError(
        f"{option}: {name!r} is not a {kind} feature of the schema; choose one of: "
        f"{', '.join(usable) or '(none)'}"
    )


def option_names(option: str) -> list[str]:
    """The feature names of a comma-separated model option (``item_fields: "item, tag"``),
    stripped, empty entries dropped."""
    return [n.strip() for n in option.split(",") if n.strip()]


def checked_option_names(option: str, key: str, allowed: Sequence[str], what: str) -> list[str]:
    """``option_names(option)``, each of which must be in ``allowed``: a ConfigError names the
    option ``key``, the names that are not, and the choices (``what``: "a sequence feature",
    "in the schema"...)."""
    names = option_names(option)
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ConfigError(
            f"{key}: {', '.join(map(repr, bad))} not {what}; choose from "
            f"{', '.join(allowed) or '(none)'}"
        )
    return names


def build_config(kind: type[ModelConfig], values: dict[str, Any], model: str) -> ModelConfig:
    """Map a config mapping onto the model's dataclass; unknown keys are named in the error."""
    from dataclasses import fields

    from mtlrec.config import as_bool, as_float

    allowed = {f.name: f for f in fields(kind)}
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key(s) model.{', model.'.join(unknown)} for model {model!r}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    converted = {}
    for key, value in values.items():
        default = allowed[key].default
        if isinstance(default, tuple) and isinstance(value, list | tuple):
            if not all(_is_whole(v) for v in value):
                raise ConfigError(
                    f"model.{key}: expected a list of integers, got {list(value)} for model {model!r}"
                )
            value = tuple(int(v) for v in value)
        elif isinstance(default, bool):  # bool("false") would be True
            value = as_bool(value, f"model.{key}")
        elif isinstance(default, int) and not isinstance(value, bool) and _is_whole(value):
            value = int(value)
        elif isinstance(default, float) and not isinstance(value, bool):
            value = as_float(value, f"model.{key}")
        elif type(value) is not type(default) and default is not None:
            raise ConfigError(
                f"model.{key}: expected {type(default).__name__}, got {value!r} for model {model!r}"
            )
        converted[key] = value
    config = kind(**converted)
    _check_common(config, model)
    return config


EXPERT_LAYERS = ("expert_hidden", "root_hidden")  # the layers of an Experts block: not empty


def _is_whole(value: Any) -> bool:
    """An int, or a float with no fractional part (YAML reads ``16.0``); never a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _check_common(config: ModelConfig, model: str) -> None:
    """Ranges every model shares: an embedding width, a dropout rate, layer widths."""
    from dataclasses import fields

    if config.embed_dim < 1:
        raise ConfigError(f"model.embed_dim must be >= 1 (got {config.embed_dim}) for {model!r}")
    if not 0 <= config.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1) (got {config.dropout}) for {model!r}")
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in EXPERT_LAYERS and not value:
            raise ConfigError(f"model.{f.name}: experts need at least one hidden layer")
        if f.name.endswith("hidden") and isinstance(value, tuple) and any(w < 1 for w in value):
            raise ConfigError(
                f"model.{f.name}: layer widths must be >= 1 (got {list(value)}) for {model!r}"
            )
