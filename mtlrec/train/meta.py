"""Meta-training over scenarios (MAML-style episodes) and fine-tuning on a new scenario.

MetaHeac (Zhu et al., KDD 2021) trains a general model "from a meta-learning perspective" over
many small tasks, then adapts it to a new task from a few rows. Here a task is a scenario: a
value of the model's scenario feature (``model.scenario_feature``). With ``train.meta: true``
:class:`~mtlrec.train.trainer.Trainer` asks :class:`MetaLoop` for each step's losses instead of
running the plain forward; everything else (balancer, outer optimizer, evaluation, early
stopping, checkpoints, resume) is the ordinary loop.

One episode per training batch:

1. The batch's rows are grouped by scenario; scenarios with at least two rows are eligible and
   ``train.meta_tasks`` of them are drawn (0: all), from a generator seeded by (seed, epoch,
   step), so a resumed run draws the same episodes.
2. Each drawn scenario's rows are split in batch order (the batch is already shuffled):
   the first ``train.meta_support`` fraction is the support set, the rest the query set.
3. Inner update, per scenario: ``train.inner_steps`` SGD steps of size ``train.inner_lr`` on
   the parameters the model names in ``meta_parameter_names()`` (the others stay at theta),
   on the support loss sum_t L_t (plus the model's auxiliary loss):
   theta'_s = theta - inner_lr * grad L_support(theta).
4. Outer loss: the query losses at theta'_s, per task, averaged over the drawn scenarios; the
   trainer's balancer and optimizer (Adam by default, ``train.lr``) take the step on theta.

First-order approximation (FOMAML): the support gradient is treated as a constant
(``grad.detach()``), so the outer gradient is grad L_query(theta'_s) applied to theta; no
second derivatives. The PaddleRec port of the authors' code (github.com/simuler/MetaHeac) does
the same: its fast weights are built from ``weight.grad``, outside the graph. A batch in which no scenario has two rows falls
back to the plain loss on the whole batch. Validation and test score theta itself (no
per-scenario adaptation); :func:`adapt` gives the fine-tuned model for a new scenario.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch.func import functional_call

from mtlrec.config import TrainConfig
from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelOutput, MTLModel
from mtlrec.train import distributed as dist


@runtime_checkable
class ScenarioModel(Protocol):
    """What a model declares to be meta-trainable (:class:`mtlrec.models.meta_experts.MetaHeac`)."""

    num_scenarios: int  # 0: the model has no scenario feature

    def scenario_ids(self, batch: TensorTable) -> torch.Tensor | None:
        """[B] scenario index of every row, or None when the model has no scenarios."""
        ...

    def meta_parameter_names(self) -> list[str]:
        """Names of the parameters the inner step adapts."""
        ...


def support_loss(model: MTLModel, out: ModelOutput, rows: TensorTable) -> torch.Tensor:
    """The inner-step objective: the sum of the per-task losses (plus the auxiliary loss)."""
    loss = model.task_losses(out, rows).sum()
    return loss if out.aux_loss is None else loss + out.aux_loss


class MetaLoop:
    """Per-step losses of meta-training (see the module docstring)."""

    def __init__(self, model: MTLModel, config: TrainConfig) -> None:
        if not isinstance(model, ScenarioModel):
            raise ConfigError(
                f"train.meta: model {model.name!r} has no scenarios to meta-train over; "
                "use model 'metaheac' with model.scenario_feature"
            )
        if model.num_scenarios < 1:
            raise ConfigError(
                f"train.meta: model {model.name!r} needs model.scenario_feature (the categorical "
                "feature whose values are the meta-learning tasks)"
            )
        if dist.world() > 1:
            raise ConfigError("train.meta: meta-training runs in one process, not under torchrun")
        self.model = model
        self.config = config
        wanted = set(model.meta_parameter_names())
        self.names = [n for n, p in model.named_parameters() if n in wanted and p.requires_grad]
        self.episodes_run = 0
        self.fallbacks = 0  # batches without an eligible scenario (plain loss)

    def episode(
        self, batch: TensorTable, generator: torch.Generator
    ) -> list[tuple[TensorTable, TensorTable]]:
        """(support, query) per drawn scenario of one batch."""
        ids = self.model.scenario_ids(batch)
        order = torch.argsort(ids, stable=True)  # grouped by scenario, batch order inside
        _, counts = torch.unique_consecutive(ids[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        groups = [
            order[s : s + c] for s, c in zip(starts.tolist(), counts.tolist(), strict=True) if c > 1
        ]
        cap = self.config.meta_tasks
        if cap and len(groups) > cap:
            pick = torch.randperm(len(groups), generator=generator)[:cap].sort().values
            groups = [groups[i] for i in pick.tolist()]
        out = []
        for rows in groups:
            n = len(rows)
            n_support = min(max(round(self.config.meta_support * n), 1), n - 1)
            out.append((batch.take(rows[:n_support]), batch.take(rows[n_support:])))
        return out

    def adapted(self, support: TensorTable) -> dict[str, torch.Tensor]:
        """theta'_s: the inner SGD steps on ``support`` (first order: gradients detached)."""
        params = dict(self.model.named_parameters())
        fast = {n: params[n] for n in self.names}
        for _ in range(self.config.inner_steps):
            out = functional_call(self.model, fast, (support,))
            grads = torch.autograd.grad(
                support_loss(self.model, out, support), list(fast.values()), allow_unused=True
            )
            fast = {
                n: p if g is None else p - self.config.inner_lr * g.detach()
                for (n, p), g in zip(fast.items(), grads, strict=True)
            }
        return fast

    def losses(
        self, batch: TensorTable, epoch: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-task query losses [T] of one episode (attached to theta) and the auxiliary loss."""
        seed = (self.config.seed * 1_000_003 + epoch * 100_003 + step) % (2**63)
        episode = self.episode(batch, torch.Generator().manual_seed(seed))
        if not episode:
            self.fallbacks += 1
            out = self.model(batch)
            return self.model.task_losses(out, batch), out.aux_loss
        task_losses, aux = [], []
        for support, query in episode:
            out = functional_call(self.model, self.adapted(support), (query,))
            task_losses.append(self.model.task_losses(out, query))
            if out.aux_loss is not None:
                aux.append(out.aux_loss)
        self.episodes_run += 1
        losses = torch.stack(task_losses).mean(0)
        return losses, torch.stack(aux).mean() if aux else None


def adapt(
    model: MTLModel,
    rows: TensorTable,
    steps: int,
    lr: float,
    on_step: Callable[[int, MTLModel], bool | None] | None = None,
) -> MTLModel:
    """Fine-tune a copy of ``model`` on the rows of a new scenario (the paper's online stage).

    ``steps`` full-batch SGD steps of size ``lr`` on the support objective (sum of the task
    losses), over the parameters the model adapts in its inner step (``meta_parameter_names``;
    every parameter for a model without one). ``model`` is left unchanged. ``on_step(k, tuned)``
    is called after step k with the copy in eval mode; returning True stops early. Returns the
    copy in eval mode. A scenario value the encoder has never seen maps to the feature's
    out-of-vocabulary row, so that row's scenario embedding is the one adapted (it is still at
    its initial zero when no training row was out of vocabulary).
    """
    if steps < 0 or not lr > 0:
        raise ConfigError(f"adapt: steps must be >= 0 and lr > 0 (got {steps}, {lr})")
    tuned = copy.deepcopy(model)
    names = (
        set(tuned.meta_parameter_names())
        if isinstance(tuned, ScenarioModel)
        else {n for n, _ in tuned.named_parameters()}
    )
    params = [p for n, p in tuned.named_parameters() if n in names and p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    for step in range(steps):
        tuned.train()
        optimizer.zero_grad(set_to_none=True)
        support_loss(tuned, tuned(rows), rows).backward()
        optimizer.step()
        if on_step is not None:
            tuned.eval()
            if on_step(step + 1, tuned):
                break
    tuned.zero_grad(set_to_none=True)
    tuned.eval()
    return tuned
