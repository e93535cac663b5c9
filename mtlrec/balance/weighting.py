"""Fixed loss weighting: the default combination of task losses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtlrec.balance.base import Balancer, BalancerConfig, register_balancer
from mtlrec.errors import ConfigError


class _StaticWeights(Balancer):
    def _static(self) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, aux_loss: torch.Tensor | None = None) -> torch.Tensor:
        total = (self._static().to(losses) * losses).sum()
        if aux_loss is not None:
            total = total + aux_loss
        total.backward()
        return total.detach()

    @property
    def weights(self) -> torch.Tensor:
        return self._static()


@register_balancer("ew")
class EqualWeighting(_StaticWeights):
    """Equal weighting: the plain sum of task losses (the usual multi-task baseline)."""

    def _static(self) -> torch.Tensor:
        return torch.ones(self.num_tasks)


@dataclass
class FixedConfig(BalancerConfig):
    weights: dict[str, float] = field(default_factory=dict)


@register_balancer("fixed")
class FixedWeighting(_StaticWeights):
    """Fixed weights: each task's ``weight`` from the schema, overridden by ``balance.weights``."""

    Config = FixedConfig

    def __init__(self, model, config: FixedConfig) -> None:
        super().__init__(model, config)
        names = model.schema.task_names
        unknown = sorted(set(config.weights) - set(names))
        if unknown:
            raise ConfigError(
                f"balance.weights: unknown task(s) {', '.join(unknown)}; tasks are {', '.join(names)}"
            )
        self._w = torch.tensor(
            [float(config.weights.get(t.name, t.weight)) for t in model.schema.tasks]
        )

    def _static(self) -> torch.Tensor:
        return self._w
