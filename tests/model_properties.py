"""Properties every model must keep, shared by the model test files.

Gradient methods trust ``shared_parameters()`` / ``task_parameters()``: a parameter declared as
task t's must be reached by task t's loss and by no other task's loss.
"""

from __future__ import annotations

import torch

from mtlrec.data.table import TensorTable
from mtlrec.models import MTLModel


def assert_partition(model: MTLModel) -> list[set[int]]:
    """Shared and per-task parameters are disjoint and together cover the model.

    Returns the per-task groups (as id sets) for model-specific extra checks."""
    shared = {id(p) for p in model.shared_parameters()}
    groups = [{id(p) for p in g} for g in model.task_parameters()]
    assert len(groups) == model.num_tasks
    owned = set().union(*groups)
    assert shared.isdisjoint(owned)
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            assert groups[a].isdisjoint(groups[b]), (a, b)
    assert shared | owned == {id(p) for p in model.parameters()}
    return groups


def assert_own_gradients(model: MTLModel, batch: TensorTable) -> None:
    """Each task's own parameters get gradient from its own loss and from no other task's."""
    out = model(batch)
    losses = model.task_losses(out, batch)
    for t, group in enumerate(model.task_parameters()):
        if not group:
            continue
        own = torch.autograd.grad(losses[t], group, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().max() > 0 for g in own), (
            f"task {t} loss misses its own"
        )
        for s in range(model.num_tasks):
            if s == t:
                continue
            grads = torch.autograd.grad(losses[s], group, retain_graph=True, allow_unused=True)
            assert all(g is None or g.abs().max() == 0 for g in grads), f"task {s} reaches task {t}"


def train_steps(model: MTLModel, table: TensorTable, steps: int, lr: float = 0.01) -> list[float]:
    """``steps`` Adam steps with equal loss weights over shuffled batches of 256 rows; the total
    loss of every step (for "the loss went down" checks)."""
    from mtlrec.balance import build_balancer

    torch.manual_seed(0)
    balancer = build_balancer("ew", model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    history: list[float] = []
    while len(history) < steps:
        for batch in table.batches(256, shuffle=True, generator=generator):
            out = model(batch)
            optimizer.zero_grad()
            history.append(float(balancer.backward(model.task_losses(out, batch), out.aux_loss)))
            optimizer.step()
            if len(history) == steps:
                break
    return history


def balancer_steps(
    model: MTLModel, table: TensorTable, balancer_name: str, steps: int, batch_size: int = 96
) -> tuple[list[torch.nn.Parameter], list[bool]]:
    """Train ``model`` with the balancer ``balancer_name`` for ``steps`` steps over shuffled
    batches (Adam at lr 0.01, or the optimizer the balancer brings), asserting one finite loss per
    task and a finite total at every step. Returns the trainable parameters and, for each,
    whether the steps changed it."""
    import math

    from mtlrec.balance import build_balancer
    from mtlrec.balance.grads import trainable

    balancer = build_balancer(balancer_name, model)
    params = trainable(model.parameters())
    optimizer = balancer.make_optimizer(params, lr=0.01, weight_decay=0.0) or torch.optim.Adam(
        params, lr=0.01
    )
    before = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(0)
    done = 0
    for batch in table.batches(batch_size, shuffle=True, generator=generator):
        out = model(batch)
        losses = model.task_losses(out, batch)
        assert losses.shape == (model.num_tasks,)
        assert torch.isfinite(losses).all(), losses
        optimizer.zero_grad(set_to_none=True)
        assert math.isfinite(float(balancer.backward(losses, out.aux_loss)))
        optimizer.step()
        done += 1
        if done == steps:
            break
    assert done == steps
    return params, [not torch.equal(p.detach(), b) for p, b in zip(params, before)]


def assert_learns_funnel_signal(model: MTLModel, train: TensorTable, valid: TensorTable) -> None:
    """120 steps on the planted funnel (tests/conftest.py) lower the loss and reach validation
    AUC > 0.75 on click and on purchase among clicked rows."""
    from mtlrec.train.metrics import auc

    history = train_steps(model, train, steps=120)
    assert sum(history[-10:]) < sum(history[:10])
    model.eval()
    with torch.no_grad():
        cond, _ = model.predict(model(valid))
    labels = valid.labels
    clicked = labels[:, 0] == 1
    assert auc(labels[:, 0].numpy(), cond[:, 0].numpy()) > 0.75
    assert auc(labels[clicked, 1].numpy(), cond[clicked, 1].numpy()) > 0.75
