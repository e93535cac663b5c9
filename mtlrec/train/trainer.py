"""The training loop: batches, balancer, evaluation, early stopping, checkpoints.

Model selection reads the validation split only; the test split is never seen here (the run
evaluates it once, after training, with the restored best model).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtlrec.balance.base import Balancer
from mtlrec.config import TrainConfig
from mtlrec.data.table import TensorTable
from mtlrec.errors import MTLRecError
from mtlrec.models.base import MTLModel
from mtlrec.train.checkpoint import save_torch
from mtlrec.train.metrics import monitor_value, task_metrics

if TYPE_CHECKING:
    from mtlrec.train.diagnostics import GradientMonitor

log = logging.getLogger(__name__)


class TrainingDiverged(MTLRecError):
    """A task's loss became NaN or infinite."""


@dataclass
class EpochRecord:
    epoch: int
    train_loss: dict[str, float]
    valid: dict[str, dict[str, float]]
    monitor: float
    seconds: float
    samples_per_second: float


@dataclass
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    best_monitor: float = -math.inf
    stopped_early: bool = False


@torch.no_grad()
def predict(
    model: MTLModel, table: TensorTable, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, joint) predictions [N, T] for a whole split, without autograd."""
    was_training = model.training
    model.eval()
    cond_parts, joint_parts = [], []
    for batch in table.batches(batch_size):
        cond, joint = model.predict(model(batch))
        cond_parts.append(cond)
        joint_parts.append(joint)
    model.train(was_training)
    return torch.cat(cond_parts), torch.cat(joint_parts)


def evaluate(model: MTLModel, table: TensorTable, batch_size: int) -> dict[str, dict[str, float]]:
    cond, joint = predict(model, table, batch_size)
    return task_metrics(model.schema, table.labels, cond, joint)


class Trainer:
    def __init__(
        self,
        model: MTLModel,
        balancer: Balancer,
        config: TrainConfig,
        checkpoint_path: Path | None = None,
        on_epoch: Callable[[EpochRecord], None] | None = None,
        monitor: GradientMonitor | None = None,
    ) -> None:
        self.model = model
        self.balancer = balancer
        self.config = config
        self.checkpoint_path = checkpoint_path
        self.on_epoch = on_epoch
        # Optional diagnostics (train.diagnose); None keeps the step loop at one `if`.
        self.monitor = monitor
        params = [p for p in model.parameters() if p.requires_grad]
        # A balancer that changes the update rule itself (AdaTask) supplies the optimizer.
        custom = balancer.make_optimizer(params, lr=config.lr, weight_decay=config.weight_decay)
        self.optimizer = (
            custom
            if custom is not None
            else torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        )
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, config.lr_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.result = FitResult()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.start_epoch = 0
        self.bad_epochs = 0
        # Mid-epoch position, so a run killed between epoch checkpoints resumes exactly: the
        # generator state that drew this epoch's order, the steps done, the running loss sum.
        self.epoch_generator_state: torch.Tensor | None = None
        self.step_in_epoch = 0
        self.loss_sum: torch.Tensor | None = None

    # --- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "next_epoch": self.start_epoch,
            "epoch_generator": self.epoch_generator_state,
            "step_in_epoch": self.step_in_epoch,
            "loss_sum": self.loss_sum,
            "bad_epochs": self.bad_epochs,
            "best_state": self.best_state,
            "result": self.result,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch = state["next_epoch"]
        self.epoch_generator_state = state["epoch_generator"]
        self.step_in_epoch = state["step_in_epoch"]
        self.loss_sum = state["loss_sum"]
        self.bad_epochs = state["bad_epochs"]
        self.best_state = state["best_state"]
        self.result = state["result"]

    # --- the loop --------------------------------------------------------------------------------
    def fit(self, train: TensorTable, valid: TensorTable) -> FitResult:
        cfg = self.config
        names = self.model.schema.task_names
        progress = _Progress(enabled=cfg.progress)
        for epoch in range(self.start_epoch, cfg.epochs):
            self.model.train()
            started = time.perf_counter()
            if self.step_in_epoch == 0:  # a fresh epoch (not one resumed midway)
                self.epoch_generator_state = self.generator.get_state()
                self.loss_sum = torch.zeros(len(names))
            else:  # redraw the interrupted epoch's order, then skip the batches already done
                self.generator.set_state(self.epoch_generator_state)
            skip = steps = self.step_in_epoch
            loss_sum = self.loss_sum
            total = train.num_batches(cfg.batch_size)
            with progress.task(f"epoch {epoch + 1}/{cfg.epochs}", total) as advance:
                batches = train.batches(cfg.batch_size, shuffle=True, generator=self.generator)
                for batch in itertools.islice(batches, skip, None):
                    out = self.model(batch)
                    losses = self.model.task_losses(out, batch)
                    self._check_finite(losses.detach(), epoch, steps)
                    if self.monitor is not None:  # before the balancer frees the graph
                        self.monitor.on_step(self.model, losses)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.balancer.backward(losses, out.aux_loss)
                    self.optimizer.step()
                    loss_sum += losses.detach()
                    steps += 1
                    advance(1)
                    if cfg.checkpoint_every and steps % cfg.checkpoint_every == 0:
                        self.step_in_epoch = steps
                        self._save()
            self.step_in_epoch = 0
            mean_loss = loss_sum / max(steps, 1)
            self.scheduler.step()
            seconds = time.perf_counter() - started
            metrics = evaluate(self.model, valid, cfg.eval_batch_size)
            value = monitor_value(metrics, cfg.monitor)
            if self.monitor is not None:
                self.monitor.on_epoch(epoch + 1, self.model, valid, cfg.eval_batch_size)
            record = EpochRecord(
                epoch=epoch + 1,
                train_loss=dict(zip(names, mean_loss.tolist())),
                valid=metrics,
                monitor=value,
                seconds=seconds,
                samples_per_second=len(train) / seconds if seconds > 0 else math.inf,
            )
            self.result.history.append(record)
            if value > self.result.best_monitor:
                self.result.best_monitor = value
                self.result.best_epoch = epoch + 1
                self.best_state = copy.deepcopy(self.model.state_dict())
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
            self.start_epoch = epoch + 1
            if self.on_epoch:
                self.on_epoch(record)
            self._save()
            if self.bad_epochs > cfg.patience:
                self.result.stopped_early = True
                break
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.result

    def _save(self) -> None:
        if self.checkpoint_path is not None:
            save_torch(self.state(), self.checkpoint_path)

    def _check_finite(self, losses: torch.Tensor, epoch: int, step: int) -> None:
        """Stop before a non-finite loss reaches the weights (one cheap check per step)."""
        bad = ~torch.isfinite(losses)
        if bad.any():
            t = int(bad.nonzero()[0])
            raise TrainingDiverged(
                f"epoch {epoch + 1} step {step + 1}: loss of task "
                f"{self.model.schema.task_names[t]!r} is {losses[t].item()}; lower train.lr or "
                "check the labels (the last good checkpoint is kept)"
            )


class _Progress:
    """A rich progress bar on a terminal; silent otherwise (logs get one line per epoch)."""

    def __init__(self, enabled: bool) -> None:
        import sys

        self.enabled = enabled and sys.stderr.isatty()

    def task(self, label: str, total: int):
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            if not self.enabled:
                yield lambda n: None
                return
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=True,
            ) as bar:
                tid = bar.add_task(label, total=total)
                counter = [0]

                def advance(n: int) -> None:
                    counter[0] += n
                    if counter[0] % 20 == 0 or counter[0] == total:
                        bar.update(tid, completed=counter[0])

                yield advance

        return ctx()
