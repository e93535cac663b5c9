"""Name -> model class. ``@register`` adds a class; ``build_model`` makes one from config."""

from __future__ import annotations

from typing import Any

from mtlrec.data.encoder import InputLayout
from mtlrec.errors import ConfigError
from mtlrec.models.base import MTLModel, build_config
from mtlrec.schema import Schema
from mtlrec.text import summary

MODELS: dict[str, type[MTLModel]] = {}


def register(name: str):
    """Class decorator: make a model buildable by ``name``."""

    def wrap(cls: type[MTLModel]) -> type[MTLModel]:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        cls.name = name
        MODELS[name] = cls
        return cls

    return wrap


def model_class(name: str) -> type[MTLModel]:
    """The model class registered as ``name`` (a ConfigError listing the names otherwise)."""
    _load_all()
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(
    name: str, schema: Schema, layout: InputLayout, options: dict[str, Any] | None = None
) -> MTLModel:
    """The registered model ``name`` for ``schema`` and the encoder's ``layout``
    (``encoder.layout()``), with ``options`` (the ``model:`` keys) checked and converted."""
    cls = model_class(name)
    if not isinstance(layout, InputLayout):
        raise TypeError(
            f"build_model: layout must be encoder.layout(), got {type(layout).__name__}"
        )
    config = build_config(cls.Config, dict(options or {}), name)
    return cls(schema, layout, config)


def describe_models() -> dict[str, str]:
    """Name -> one-line description of every registered model (``mtlrec list models``)."""
    _load_all()
    return {name: summary(cls.__doc__) for name, cls in sorted(MODELS.items())}


def _load_all() -> None:
    # Importing the modules runs their @register decorators.
    from mtlrec.models import (  # noqa: F401
        cascade,
        cross_distill,
        debias,
        distill,
        embedding_experts,
        experts,
        fair_meta,
        funnel,
        hard,
        hierarchical,
        hierarchy_experts,
        independent,
        kernel_experts,
        meta_experts,
        multifaceted,
        prototype,
        sequential_experts,
        soft,
        sparse,
        sparse_experts,
        task_aware,
    )
