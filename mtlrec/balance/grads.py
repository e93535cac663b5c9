"""Per-task gradients on the shared parameters, and writing a combined gradient back.

Every gradient method starts the same way: one ``torch.autograd.grad`` call per task over the
shared parameters plus that task's own parameters (nothing accumulates into ``.grad`` on the
way). The shared part is flattened into a [T, D] matrix; the methods combine it, and
:meth:`TaskGrads.write_shared` puts the result back; each task's own layers get its own gradient,
times the method's factor for that task where it has one (:meth:`TaskGrads.write_own`).

Gradients are dense: the flat matrix needs them so (embedding tables use ``sparse=False`` in this
codebase, so nothing is densified that was not dense already).

Data parallelism (torchrun): each rank's losses are its share of the global-batch loss
(:func:`mtlrec.train.distributed.sync_losses`), so its task gradients are shares too.
:func:`task_gradients` sums the [T, D] matrix and the task-specific gradients over ranks before
any method looks at them: the surgery then runs on the global per-task gradients and every rank
computes the same update (T x D floats per step instead of the D of a plain backward). The
update is written as a 1/world share, because the trainer sums every ``.grad`` over ranks after
the balancer (which also covers what a balancer adds with a plain backward, such as a model's
auxiliary loss).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mtlrec.balance.base import Balancer
from mtlrec.models.base import MTLModel
from mtlrec.train import distributed as dist


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    """``param.grad += grad`` with backward's conventions (None means nothing yet)."""
    grad = grad.detach()
    if param.grad is None:
        param.grad = grad.clone()
    else:
        param.grad.add_(grad)


def flatten(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat vector; a missing (None) gradient is zeros, a sparse one is densified."""
    parts = [
        torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        if g is None
        else (g.to_dense() if g.is_sparse else g).reshape(-1)
        for g, p in zip(grads, params)
    ]
    if not parts:
        return torch.zeros(0)
    return torch.cat(parts)


@dataclass
class TaskGrads:
    """Each task's gradient, split into the shared part (flat) and its own parameters' part.

    ``matrix``: [T, D] gradients of the shared parameters, zeros where a task does not reach one.
    ``used``: [T, P] True where task t's loss reaches shared tensor p at all.
    ``own``: per task, the gradients of that task's own parameters (None where unused).
    ``share``: the factor applied when writing into ``.grad`` (1 / world under data parallelism,
    where the matrix already holds the global gradients and the trainer sums ``.grad`` again).
    ``present``: [T] bool on the CPU, False for a task absent this step (loss exactly 0 and an
    all-zero gradient; :mod:`mtlrec.balance.base`); set by :meth:`GradientBalancer.backward`
    before ``combine``.
    """

    shared: list[nn.Parameter]
    matrix: torch.Tensor
    used: torch.Tensor
    own_params: list[list[nn.Parameter]]
    own: list[list[torch.Tensor | None]]
    share: float = 1.0
    present: torch.Tensor | None = None

    def presence(self, losses: torch.Tensor) -> torch.Tensor:
        """[T] bool (CPU): False where task t is ABSENT this step: its loss is exactly 0.0 and its
        gradient is zero on the shared parameters and on its own parameters. With data
        parallelism the losses and gradients are the global ones, so every rank agrees."""
        zero_loss = (losses.detach() == 0).cpu()
        zero_shared = ~(self.matrix != 0).any(1).cpu()
        present = ~(zero_loss & zero_shared)
        for t in (~present).nonzero().flatten().tolist():  # only the candidates: few syncs
            if any(g is not None and bool(g.any()) for g in self.own[t]):
                present[t] = True
        return present

    def present_on(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[T] bool on ``device``: :attr:`present`, or every task when it was not set (a
        ``TaskGrads`` built directly rather than by :meth:`GradientBalancer.backward`)."""
        if self.present is None:
            return torch.ones(self.matrix.shape[0], dtype=torch.bool, device=device)
        return self.present.to(device)

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.shared]

    @property
    def num_shared(self) -> int:
        return self.matrix.shape[1]

    def gram(self) -> torch.Tensor:
        """[T, T] inner products of the task gradients, in float64, on the CPU wherever the
        gradients live: the rules that read it are tiny T x T solvers with Python control flow
        (PCGrad's projections, MGDA's and Nash-MTL's iterations), so they need its values on
        the host anyway. (Before, they mixed it with CPU tensors and failed on CUDA.)"""
        g = self.matrix.double()
        return (g @ g.T).cpu()

    def per_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """Broadcast [..., P] per-tensor values to [..., D] per-coordinate values."""
        sizes = torch.tensor(self.sizes, device=values.device)
        return values.repeat_interleave(sizes, dim=-1)

    def write_shared(self, vector: torch.Tensor) -> None:
        """Accumulate the combined [D] vector into the shared parameters' ``.grad``; a tensor no
        task reaches keeps ``.grad`` untouched (None stays None, as after a plain backward)."""
        reached = self.used.any(0).tolist()
        if self.share != 1.0:
            vector = vector * self.share
        for p, g, ok in zip(self.shared, vector.split(self.sizes), reached):
            if ok:
                accumulate(p, g.reshape(p.shape).to(p.dtype))

    def write_own(self, scale: torch.Tensor | None = None) -> None:
        """Accumulate each task's own gradient into its own parameters, times ``scale[t]``."""
        for t, (params, grads) in enumerate(zip(self.own_params, self.own)):
            for p, g in zip(params, grads):
                if g is not None:
                    if self.share != 1.0:
                        g = g * self.share
                    accumulate(p, g if scale is None else g * scale[t].to(g.dtype))


def task_gradients(model: MTLModel, losses: torch.Tensor) -> TaskGrads:
    """One ``autograd.grad`` per task over (shared + that task's own) parameters; the graph is
    kept for a later auxiliary backward."""
    shared = trainable(model.shared_parameters())
    own_params = [trainable(group) for group in model.task_parameters()]
    rows, used, own = [], [], []
    for t in range(losses.shape[0]):
        params = shared + own_params[t]
        if params and losses[t].requires_grad:
            grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        else:
            grads = (None,) * len(params)
        rows.append(flatten(grads[: len(shared)], shared).to(losses.device))
        used.append([g is not None for g in grads[: len(shared)]])
        own.append(list(grads[len(shared) :]))
    matrix = torch.stack(rows)
    used_mask = torch.tensor(used, dtype=torch.bool).reshape(len(rows), len(shared))
    share = 1.0
    if dist.active():  # sum the ranks' shares: the methods see the global task gradients
        matrix, used_mask, own = _all_reduce_task_grads(matrix, used_mask, own, own_params)
        share = 1.0 / dist.world()
    return TaskGrads(
        shared=shared, matrix=matrix, used=used_mask, own_params=own_params, own=own, share=share
    )


def _all_reduce_task_grads(
    matrix: torch.Tensor,
    used: torch.Tensor,
    own: list[list[torch.Tensor | None]],
    own_params: list[list[nn.Parameter]],
) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor | None]]]:
    """Sum the [T, D] matrix, the [T, P] "reached" flags and every task-specific gradient over
    ranks, in bucketed flat all-reduces (a gradient stays None only if it is None everywhere)."""
    flat_own = [g for grads in own for g in grads]
    like = [p for params in own_params for p in params]
    reduced = dist.all_reduce_flat(
        [matrix, used.to(matrix.dtype), *flat_own], like=[matrix, matrix, *like]
    )
    matrix_sum, used_sum, rest = reduced[0], reduced[1], reduced[2:]
    assert matrix_sum is not None and used_sum is not None
    out_own, k = [], 0
    for grads in own:
        out_own.append(list(rest[k : k + len(grads)]))
        k += len(grads)
    return matrix_sum, used_sum > 0, out_own


def backward_aux(aux_loss: torch.Tensor | None) -> torch.Tensor:
    """A model's own extra loss, added with weight 1 by a plain backward; returns it detached."""
    if aux_loss is None:
        return torch.zeros(())
    if aux_loss.requires_grad:
        aux_loss.backward()
    return aux_loss.detach()


class GradientBalancer(Balancer):
    """Base of the methods that need each task's gradient on the shared parameters.

    A subclass implements :meth:`combine`: from the per-task gradients it returns the update for
    the shared parameters ([D]) and the factor of each task's own-parameter gradient ([T], or
    None for the task's plain gradient). ``grads.present`` marks the tasks present this step
    (at least one is; an absent task's gradient is zero, and the method leaves it out of its
    combination and its state). Without shared parameters that any task reaches
    (``single-task``) there is nothing to combine and every task's own parameters get its plain
    gradient.
    """

    per_task_backward = True

    def transform(self, losses: torch.Tensor) -> torch.Tensor:
        """The losses whose gradients are combined (DB-MTL takes their logarithm)."""
        return losses

    def combine(
        self, grads: TaskGrads, losses: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, aux_loss: torch.Tensor | None = None) -> torch.Tensor:
        grads = task_gradients(self.model, self.transform(losses))
        grads.present = grads.presence(losses)
        scale = None
        if bool(grads.used.any()):  # some task reaches a shared parameter
            if bool(grads.present.any()):
                shared, scale = self.combine(grads, losses.detach())
            else:  # every task absent: nothing to combine, no state to update
                shared = torch.zeros_like(grads.matrix[0])
            grads.write_shared(shared)
        grads.write_own(scale)
        aux = backward_aux(aux_loss)
        weights = torch.ones_like(losses) if scale is None else scale.to(losses)
        return (weights * losses.detach()).sum() + aux.to(losses)
