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
