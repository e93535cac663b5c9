"""Reusable layers: the fused input embedding, MLPs, batched experts and gates."""

from mtlrec.nn.embedding import InputEmbedding
from mtlrec.nn.experts import Experts, Gate
from mtlrec.nn.mlp import MLP

__all__ = ["InputEmbedding", "MLP", "Experts", "Gate"]
