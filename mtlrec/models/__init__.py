"""Multi-task models, one module per family of the taxonomy, built by name from the registry."""

from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import build_model, describe_models, model_class

__all__ = [
    "MTLModel",
    "ModelConfig",
    "ModelOutput",
    "build_model",
    "describe_models",
    "model_class",
]
