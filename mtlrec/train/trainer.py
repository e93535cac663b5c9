"""The training loop: batches, balancer, evaluation, early stopping, checkpoints.

Model selection reads the validation split only; the test split is never seen here (the run
evaluates it once, after training, with the restored best model).

Training batches come from a :class:`~mtlrec.data.source.BatchSource` (tensors in memory or a
Parquet stream). Under torchrun every rank runs this loop on its part of each global batch; the
synchronisation points (losses, gradients, evaluation, early stopping) are described in
:mod:`mtlrec.train.distributed`.
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

from mtlrec.balance.base import Balancer, check_compile
from mtlrec.config import TrainConfig, train_config
from mtlrec.data.source import BatchSource, as_source
from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError, MTLRecError
from mtlrec.models.base import MTLModel
from mtlrec.train import distributed as dist
from mtlrec.train.checkpoint import save_torch
from mtlrec.train.meta import MetaLoop
from mtlrec.train.metrics import monitor_value, task_metrics

if TYPE_CHECKING:
    from mtlrec.train.diagnostics import GradientMonitor

log = logging.getLogger(__name__)


class TrainingDiverged(MTLRecError):
    """A task's loss became NaN or infinite."""


@dataclass
class EpochRecord:
    """One epoch: mean training loss per task, validation metrics, the monitored figure, time and
    throughput."""

    epoch: int
    train_loss: dict[str, float]
    valid: dict[str, dict[str, float]]
    monitor: float
    seconds: float
    samples_per_second: float


@dataclass
class FitResult:
    """What ``Trainer.fit`` returns: the epochs run, the best one, and whether early stopping ended
    the run."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    best_monitor: float = -math.inf
    stopped_early: bool = False


@torch.no_grad()
def predict(
    model: MTLModel, table: TensorTable, batch_size: int = TrainConfig.eval_batch_size
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
    if not cond_parts:  # an empty shard of a split smaller than the number of ranks
        empty = torch.zeros(0, model.num_tasks)
        return empty, empty.clone()
    return torch.cat(cond_parts), torch.cat(joint_parts)


def evaluate(
    model: MTLModel, table: TensorTable, batch_size: int = TrainConfig.eval_batch_size
) -> dict[str, dict[str, float]]:
    """Per-task metrics of a split. With several ranks each predicts a contiguous shard and the
    predictions are gathered in order, so AUC is over the whole split (not a mean of per-shard
    AUCs); rank 0 computes the metrics and every rank receives them."""
    if not dist.active():
        cond, joint = predict(model, table, batch_size)
        return task_metrics(model.schema, table.labels, cond, joint)
    lo, hi = dist.shard_bounds(len(table), dist.rank(), dist.world())
    cond, joint = predict(model, table.slice(lo, hi), batch_size)
    both = dist.all_gather_tensor(torch.cat([cond, joint], 1))
    cond, joint = both.split(model.num_tasks, 1)
    metrics = task_metrics(model.schema, table.labels, cond, joint) if dist.is_main() else None
    return dist.broadcast_object(metrics)


def make_optimizer(
    kind: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Adam (fused into one kernel over all parameters where torch supports it: profiled ~8%
    more samples/s for the Census-sized MMoE on CPU) or plain SGD."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):  # a torch build without the fused CPU kernel
            pass
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


class Trainer:
    """Trains ``model`` with ``balancer`` on encoded tables (``Encoder.transform``): epochs of
    shuffled batches, early stopping on the validation split, best weights restored.

    Used from Python (``mtlrec train`` does all of this for you):

    1. ``seed_everything(seed)`` (mtlrec.train.run) before ``build_model``: the model's
       initialisation and dropout use torch's global generator; ``config.seed`` seeds only the
       batch order.
    2. ``build_model(name, encoder.schema, encoder.layout())``, then ``model.to(device)`` and the
       tables ``.to(device)``: the trainer trains where the model's parameters are.
    3. ``build_balancer(name, model)`` after the move (a balancer's own parameters follow the
       model's device), then ``Trainer(model, balancer, config).fit(train, valid)``.

    ``config``: a :class:`TrainConfig` (or a ``train:`` mapping); ``threads`` and ``diagnose``
    apply here too. ``fit`` trains up to ``config.epochs`` epochs in all: a second call on a
    trainer that has finished trains nothing.
    """

    def __init__(
        self,
        model: MTLModel,
        balancer: Balancer,
        config: TrainConfig | dict | None = None,
        checkpoint_path: Path | None = None,
        on_epoch: Callable[[EpochRecord], None] | None = None,
        monitor: GradientMonitor | None = None,
    ) -> None:
        if config is None:
            config = TrainConfig()
        elif isinstance(config, dict):
            config = train_config(config)
        if config.threads:
            torch.set_num_threads(config.threads)
        if monitor is None and config.diagnose:
            from mtlrec.train.diagnostics import GradientMonitor

            monitor = GradientMonitor.from_config(model, config)
        self.model = model
        # train.compile: the training forward runs through torch.compile (inductor fuses the
        # element-wise work around the matmuls: +11-22 % samples/s for MMoE single-threaded on CPU,
        # no gain at 2 threads, slower for DMT and MoSE; benchmarks/speed and README);
        # evaluation, checkpoints and meta-training use the eager module, which shares weights.
        check_compile(config.compile, balancer, monitor is not None)
        self.forward = torch.compile(model) if config.compile else model
        self.device = next(model.parameters()).device
        self.balancer = balancer
        self.config = config
        self.checkpoint_path = checkpoint_path
        self.on_epoch = on_epoch
        # Optional diagnostics (train.diagnose); None keeps the step loop at one `if`.
        self.monitor = monitor
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        # A balancer that changes the update rule itself (AdaTask) supplies the optimizer.
        custom = balancer.make_optimizer(
            params, lr=config.lr, weight_decay=config.weight_decay, optimizer=config.optimizer
        )
        self.custom_optimizer = custom is not None
        self.optimizer = (
            custom
            if custom is not None
            else make_optimizer(config.optimizer, params, config.lr, config.weight_decay)
        )
        # Data parallelism (torchrun): train.batch_size is the global batch.
        self.rank, self.world = dist.rank(), dist.world()
        dist.local_batch_size(config.batch_size, self.world)
        self._placeholder: TensorTable | None = None
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
        # train.meta: per-step losses come from meta-training episodes (mtlrec.train.meta).
        self.meta = MetaLoop(model, config) if config.meta else None

    # --- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to resume exactly (weights, optimizer, RNG states, position in the
        epoch)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            # CUDA dropout draws from the device's generator, which seeding resets on resume
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "diagnostics": self.monitor.state_dict() if self.monitor is not None else None,
            "next_epoch": self.start_epoch,
            "epoch_generator": self.epoch_generator_state,
            "step_in_epoch": self.step_in_epoch,
            "loss_sum": self.loss_sum,
            "bad_epochs": self.bad_epochs,
            "best_state": self.best_state,
            "result": self.result,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (a checkpoint) before :meth:`fit` continues the run."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.monitor is not None and state.get("diagnostics") is not None:
            self.monitor.load_state_dict(state["diagnostics"])
        self.start_epoch = state["next_epoch"]
        self.epoch_generator_state = state["epoch_generator"]
        self.step_in_epoch = state["step_in_epoch"]
        self.loss_sum = state["loss_sum"]
        self.bad_epochs = state["bad_epochs"]
        self.best_state = state["best_state"]
        self.result = state["result"]

    # --- the loop --------------------------------------------------------------------------------
    def fit(self, train: TensorTable | BatchSource, valid: TensorTable) -> FitResult:
        """Train on ``train`` (a table or a streaming source), select on ``valid``; restores the
        best epoch's weights."""
        cfg = self.config
        names = self.model.schema.task_names
        source = as_source(train, self.rank, self.world)
        progress = _Progress(enabled=cfg.progress)
        # A resumed run that had already stopped early stays stopped (a larger patience resumes)
        last = self.start_epoch if self.bad_epochs > cfg.patience else cfg.epochs
        if last == self.start_epoch and self.start_epoch < cfg.epochs:
            self.result.stopped_early = True
        for epoch in range(self.start_epoch, last):
            self.model.train()
            started = time.perf_counter()
            if self.step_in_epoch == 0:  # a fresh epoch (not one resumed midway)
                self.epoch_generator_state = self.generator.get_state()
                self.loss_sum = torch.zeros(len(names), device=self.device)
            else:  # redraw the interrupted epoch's order, then skip the batches already done
                self.generator.set_state(self.epoch_generator_state)
            skip = steps = self.step_in_epoch
            loss_sum = self.loss_sum
            total = source.num_batches(cfg.batch_size)
            with progress.task(f"epoch {epoch + 1}/{cfg.epochs}", total) as advance:
                batches = source.epoch_batches(epoch, cfg.batch_size, self.generator)
                for batch in itertools.islice(batches, skip, None):
                    batch = batch.to(self.device)  # streamed batches arrive on the CPU
                    if self.meta is None:
                        with self.autocast():
                            losses, aux_loss = self._losses(batch, source)
                    else:  # one episode: inner steps per scenario, query losses at theta'
                        losses, aux_loss = self.meta.losses(batch, epoch, steps)
                    self._check_finite(losses.detach(), epoch, steps)
                    if self.monitor is not None:  # before the balancer frees the graph
                        self.monitor.on_step(self.model, losses)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.balancer.backward(losses, aux_loss)
                    if self.world > 1:  # sum the ranks' gradient shares
                        dist.reduce_grads(self.params)
                    self.optimizer.step()
                    loss_sum += losses.detach()
                    steps += 1
                    advance(1)
                    if cfg.checkpoint_every and steps % cfg.checkpoint_every == 0:
                        self.step_in_epoch = steps
                        self._save()
            self.step_in_epoch = 0
            dist.check_replicas(self.params)
            mean_loss = loss_sum.cpu() / max(steps, 1)
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
                samples_per_second=len(source) / seconds if seconds > 0 else math.inf,
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
            stop = self.bad_epochs > cfg.patience
            if self.world > 1:  # decided on rank 0 (the metrics already are the same everywhere)
                stop = dist.broadcast_object(stop)
            if stop:
                self.result.stopped_early = True
                break
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.result

    def autocast(self) -> torch.autocast:
        """train.precision "bf16": the forward's matrix products run in bfloat16 (parameters,
        optimizer state and the backward's accumulation stay fp32; autocast keeps losses and
        softmax in fp32). On CPUs with AVX512-BF16 the large MMoE trains 2.5x faster per core
        (benchmarks/speed); overhead-bound small models gain nothing."""
        dtype = torch.bfloat16 if self.config.precision == "bf16" else None
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _losses(
        self, batch: TensorTable, source: BatchSource
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward one batch: per-task losses [T] (attached) and the model's auxiliary loss.

        With several ranks these are the global-batch values (:func:`dist.sync_losses`); a rank
        whose part of the step is empty runs one placeholder row with zero weight, so that every
        rank takes part in the step's collectives."""
        if self.world == 1:
            out = self.forward(batch)
            return self.model.task_losses(out, batch), out.aux_loss
        rows = len(batch)
        if rows == 0:
            if self._placeholder is None:
                self._placeholder = source.placeholder()
            batch = self._placeholder
        elif self._placeholder is None:
            self._placeholder = batch.head(1)
        out = self.forward(batch)
        if out.aux_loss is not None and self.custom_optimizer:
            raise ConfigError(
                f"balancer {self.balancer.name!r} with model {self.model.name!r}: a balancer that "
                "brings its own optimizer cannot be combined with a model's auxiliary loss "
                "across several processes; train with one process"
            )
        weights = dist.loss_weights(self.model, batch)
        if rows == 0:
            weights = torch.zeros_like(weights)
        return dist.sync_losses(self.model.task_losses(out, batch), weights, out.aux_loss, rows)

    def _save(self) -> None:
        if self.checkpoint_path is not None and dist.is_main():
            save_torch(self.state(), self.checkpoint_path)

    def _check_finite(self, losses: torch.Tensor, epoch: int, step: int) -> None:
        """Stop before a non-finite loss reaches the weights (one cheap check per step)."""
        bad = ~torch.isfinite(losses)
        if bad.any():
            t = int(bad.nonzero()[0])
            raise TrainingDiverged(
                f"epoch {epoch + 1} step {step + 1}: loss of task "
                f"{self.model.schema.task_names[t]!r} is {losses[t].item()}; start over "
                "(without --resume) with a lower train.lr, or check the labels"
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
