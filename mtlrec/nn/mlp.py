"""A plain multi-layer perceptron, the building block of experts and towers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """Linear -> activation (-> dropout) per hidden layer; optional final linear output."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = None,
        dropout: float = 0.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = []
        dim = in_dim
        for width in hidden:
            layers += [nn.Linear(dim, width), activation()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            dim = width
        if out_dim is not None:
            layers.append(nn.Linear(dim, out_dim))
            dim = out_dim
        super().__init__(*layers)
        self.output_dim = dim
