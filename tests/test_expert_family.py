"""The rest of the mixture-of-experts family (issue 7): each model's defining mechanism, the planted
funnel signal, gates in ``extras``, and the shared/task parameter contract of tests/test_models.py.
"""

import pytest
import torch

from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import build_model, describe_models
from mtlrec.models.prototype import PrototypeBank
from mtlrec.models.sparse_experts import smooth_step
from mtlrec.schema import Feature, Schema, Task
from tests.conftest import FUNNEL_SCHEMA, funnel_frame
from tests.model_properties import (
    assert_learns_funnel_signal,
    assert_own_gradients,
    assert_partition,
)
from tests.model_properties import train_steps as _train

torch.set_num_threads(1)

NEW = ["dselect-k", "stem", "home", "pfe", "mvke", "dmtl"]
SOFTMAX_GATES = [
    "stem",
    "home",
    "pfe",
    "mvke",
]  # dselect-k's gate also sums to 1, checked on its own
VARIANTS = [(m, {}) for m in NEW] + [
    ("dselect-k", {"per_example": False}),
    ("home", {"groups": [0, 1]}),
    ("mvke", {"item_fields": "item"}),
    ("dmtl", {"distill": False}),
]


def test_registry_has_the_new_models():
    assert set(NEW) <= set(describe_models())


@pytest.mark.parametrize("name", NEW)
def test_every_model_learns_the_planted_funnel_signal(name, funnel_tables):
    enc, train, valid = funnel_tables
    torch.manual_seed(0)
    model = build_model(name, enc.schema, enc.layout(), {"embed_dim": 8})
    assert_learns_funnel_signal(model, train, valid)


@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_shared_and_task_parameters_partition_the_model(name, options, small):
    enc, _ = small
    groups = assert_partition(build_model(name, enc.schema, enc.layout(), options))
    assert all(groups), "every task owns some parameters"


@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_task_parameters_get_gradient_only_from_their_task(name, options, small):
    """A parameter declared task-specific must not receive gradient from another task."""
    enc, table = small
    torch.manual_seed(0)
    assert_own_gradients(build_model(name, enc.schema, enc.layout(), options), table.head(256))


@pytest.mark.parametrize("name", SOFTMAX_GATES + ["dselect-k"])
def test_gates_are_per_task_distributions_over_experts(name, small):
    enc, table = small
    model = build_model(name, enc.schema, enc.layout())
    model.eval()
    with torch.no_grad():
        gates = model(table.head(10)).extras["gates"]
    assert gates.dim() == 3 and gates.shape[:2] == (10, 2)
    assert (gates >= 0).all()
    assert torch.allclose(gates.sum(-1), torch.ones(10, 2), atol=1e-5)


def test_parallel_tasks_with_regression(parallel_schema):
    frame = funnel_frame(400, seed=5)
    enc = Encoder(parallel_schema).fit(frame)
    table = enc.transform(frame)
    for name in NEW:
        model = build_model(name, enc.schema, enc.layout(), {"embed_dim": 4})
        history = _train(model, table, steps=20)
        assert sum(history[-5:]) < sum(history[:5]), name


# --- dselect-k ----------------------------------------------------------------------------------


def test_smooth_step_is_exactly_zero_and_one_outside_the_band():
    t = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    s = smooth_step(t, 1.0)
    assert s.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    inner = torch.linspace(-0.49, 0.49, 9)
    assert ((smooth_step(inner, 1.0) > 0) & (smooth_step(inner, 1.0) < 1)).all()


def _train_dselect(options: dict, small) -> torch.Tensor:
    enc, table = small
    torch.manual_seed(0)
    model = build_model(
        "dselect-k",
        enc.schema,
        enc.layout(),
        {"embed_dim": 4, "num_experts": 8, "entropy_weight": 0.5, **options},
    )
    _train(model, table, steps=150, lr=0.02)
    model.eval()
    with torch.no_grad():
        return model(table).extras["gates"]


def test_dselect_k_static_gates_select_exactly_k_experts(small):
    gates = _train_dselect({"k": 2, "per_example": False}, small)
    # static gates: one distribution per task, every row the same
    assert torch.equal(gates[0].expand_as(gates), gates)
    nonzero = (gates[0] > 0).sum(-1)
    assert nonzero.tolist() == [2, 2]
    assert torch.allclose(gates[0].sum(-1), torch.ones(2))


def test_dselect_k_per_example_gates_use_at_most_k_experts(small):
    gates = _train_dselect({"k": 2, "per_example": True}, small)
    # the entropy penalty drives every selector out of the smooth band: all but <= k weights ~ 0
    top = gates.topk(2, dim=-1).values.sum(-1)
    assert top.mean() > 0.99
    assert (gates > 1e-3).sum(-1).float().mean() <= 2.05


def test_dselect_k_handles_non_power_of_two_experts_and_checks_k(small):
    enc, table = small
    model = build_model("dselect-k", enc.schema, enc.layout(), {"num_experts": 5, "k": 3})
    gates = model(table.head(8)).extras["gates"]
    assert gates.shape == (8, 2, 5)
    assert torch.allclose(gates.sum(-1), torch.ones(8, 2), atol=1e-5)
    with pytest.raises(ConfigError, match="model.k"):
        build_model("dselect-k", enc.schema, enc.layout(), {"num_experts": 2, "k": 3})


# --- stem ---------------------------------------------------------------------------------------


def test_stem_all_forward_task_specific_backward(small):
    """Another task's embeddings change task t's output (all forward) but receive none of task
    t's gradient (task-specific backward); the shared table gets every task's gradient."""
    enc, table = small
    torch.manual_seed(0)
    model = build_model("stem", enc.schema, enc.layout())
    batch = table.head(64)
    out = model(batch)
    losses = model.task_losses(out, batch)
    tables = [m["embedding"].table.weight for m in model.task_modules]
    g_other = torch.autograd.grad(losses[0], tables[1], retain_graph=True)[0]
    g_own = torch.autograd.grad(losses[0], tables[0], retain_graph=True)[0]
    g_shared = torch.autograd.grad(losses[1], model.shared_embedding.table.weight)[0]
    assert g_other.abs().max() == 0 and g_own.abs().max() > 0 and g_shared.abs().max() > 0
    with torch.no_grad():
        before = model(batch).logits[:, 0].clone()
        tables[1].mul_(50.0)
        after = model(batch).logits[:, 0]
    assert not torch.allclose(before, after)
    assert out.extras["gates"].shape == (64, 2, 2 * 1 + 1)


# --- home ---------------------------------------------------------------------------------------


def test_home_groups_default_to_depends_on_roots_and_can_be_set(small):
    enc, _ = small
    schema = Schema(
        features=[Feature("user"), Feature("item")],
        tasks=[Task("click"), Task("like"), Task("buy", depends_on="click")],
    )
    assert build_model("home", enc.schema, enc.layout()).groups == [0, 0]
    assert build_model("home", enc.schema, enc.layout(), {"groups": [5, 2]}).groups == [0, 1]
    from mtlrec.models.hierarchy_experts import HoME

    assert HoME._groups(schema, ()) == [0, 1, 0]
    with pytest.raises(ConfigError, match="model.groups"):
        build_model("home", enc.schema, enc.layout(), {"groups": [0]})


def test_home_experts_are_normalised_and_feature_gates_start_at_one(small):
    enc, table = small
    torch.manual_seed(0)
    model = build_model("home", enc.schema, enc.layout())
    x = model.embedding(table.head(128))
    gated = model.feature_gate(x)
    assert torch.allclose(gated, x.unsqueeze(0).expand_as(gated))  # 2 sigmoid(0) = 1
    model.train()
    out = model.level1(gated)  # [B, E, D], Swish of batch-normalised pre-activations
    assert (out < 0).any(), "Swish, not ReLU: small negative outputs survive"
    # batch norm aligns every expert's pre-activation scale, so the experts' means are close
    means = out.mean((0, 2))
    assert (means.max() - means.min()) < 0.2


def test_home_hierarchy_mask_keeps_categories_apart(small):
    """With two categories, task 0's output does not depend on category 1's experts."""
    enc, table = small
    torch.manual_seed(0)
    model = build_model("home", enc.schema, enc.layout(), {"groups": [0, 1]})
    model.eval()
    batch = table.head(32)
    with torch.no_grad():
        before = model(batch).logits.clone()
        for w in model.category2[1].weights:
            w.mul_(3.0)
        after = model(batch).logits
    assert torch.allclose(before[:, 0], after[:, 0])
    assert not torch.allclose(before[:, 1], after[:, 1])


# --- pfe ----------------------------------------------------------------------------------------


def test_prototypes_move_to_planted_cluster_centres():
    gen = torch.Generator().manual_seed(0)
    truth = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 5.0]])
    bank = PrototypeBank(3, 2, momentum=0.8, temperature=1.0)
    bank.train()
    for step in range(40):
        which = torch.randint(0, 3, (90,), generator=gen)
        h = truth[which] + 0.5 * torch.randn(90, 2, generator=gen)
        if step == 1:
            start = bank.centres.clone()
        with torch.enable_grad():
            bank(h)
    dist = torch.cdist(truth, bank.centres)  # [true, prototype]
    assert dist.min(1).values.max() < 0.2, bank.centres
    assert sorted(dist.argmin(1).tolist()) == [0, 1, 2]  # one prototype per cluster
    assert torch.cdist(truth, start).min(1).values.max() > dist.min(1).values.max()


def test_pfe_updates_prototypes_only_in_training(small):
    enc, table = small
    torch.manual_seed(0)
    model = build_model("pfe", enc.schema, enc.layout(), {"num_prototypes": 4})
    assert not bool(model.prototypes.initialised)
    model.train()
    model(table.head(128))  # seeds the centres
    first = model.prototypes.centres.clone()
    model(table.slice(128, 256))
    assert not torch.equal(first, model.prototypes.centres)
    moved = model.prototypes.centres.clone()
    model.eval()
    with torch.no_grad():
        out = model(table.head(64))
    assert torch.equal(moved, model.prototypes.centres)
    assert out.extras["prototypes"].shape == (4, model.shared.output_dim)
    state = model.state_dict()
    assert "prototypes.centres" in state and "prototypes.initialised" in state


# --- mvke ---------------------------------------------------------------------------------------


def test_mvke_splits_fields_and_checks_names(small):
    enc, _ = small
    model = build_model("mvke", enc.schema, enc.layout())
    names = [f.name for f in enc.schema.embedded_fields()]
    assert [names[i] for i in model.item_index.tolist()] == ["item", "tags"]
    assert [names[i] for i in model.user_index.tolist()] == ["user"]
    custom = build_model("mvke", enc.schema, enc.layout(), {"item_fields": "tags"})
    assert [names[i] for i in custom.item_index.tolist()] == ["tags"]
    with pytest.raises(ConfigError, match="model.item_fields"):
        build_model("mvke", enc.schema, enc.layout(), {"item_fields": "nope"})
    with pytest.raises(ConfigError, match="model.item_fields"):
        build_model("mvke", enc.schema, enc.layout(), {"item_fields": "user,item,tags"})


def test_mvke_gate_is_conditioned_on_the_tag_side_only(small):
    """Two rows with the same item/tags get the same gate whatever the user; the user side still
    changes the prediction (through the kernel experts)."""
    enc, table = small
    torch.manual_seed(0)
    model = build_model("mvke", enc.schema, enc.layout(), {"num_kernels": 3})
    model.eval()
    batch = table.head(32)
    swapped = batch.take(torch.arange(32))
    swapped.cat[:, model.user_index] = batch.cat[torch.arange(32).roll(1)][:, model.user_index]
    swapped.num[:] = batch.num.roll(1, 0)
    with torch.no_grad():
        a, b = model(batch), model(swapped)
    assert a.extras["gates"].shape == (32, 2, 3)
    assert torch.allclose(a.extras["gates"], b.extras["gates"])
    assert not torch.allclose(a.logits, b.logits)


# --- dmtl ---------------------------------------------------------------------------------------


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_dmtl_distilled_student_ranks_like_the_teacher():
    """Same teacher (the student never feeds it back), two students: the one distilled from the
    teacher's pCTR x pCVR orders held-out rows more like the teacher than the one trained on the
    hard click-and-purchase label."""
    schema = Schema.from_dict(FUNNEL_SCHEMA)
    train_df, valid_df = funnel_frame(1500, seed=1), funnel_frame(500, seed=2)
    enc = Encoder(schema).fit(train_df)
    train, valid = enc.transform(train_df), enc.transform(valid_df)
    agreement, teachers = {}, []
    for distill in (True, False):
        torch.manual_seed(0)
        model = build_model("dmtl", enc.schema, enc.layout(), {"embed_dim": 8, "distill": distill})
        _train(model, train, steps=150)
        model.eval()
        with torch.no_grad():
            out = model(valid)
            joint = model.predict(out)[1][:, 1]
        teachers.append(joint)
        assert out.extras["student"].shape == (len(valid),)
        agreement[distill] = _spearman(joint, out.extras["student"])
    assert torch.allclose(teachers[0], teachers[1])
    assert agreement[True] > agreement[False] + 0.02, agreement
    assert agreement[True] > 0.9


def test_dmtl_student_loss_targets_the_detached_teacher(small):
    enc, table = small
    model = build_model("dmtl", enc.schema, enc.layout(), {"distill_weight": 0.5})
    batch = table.head(64)
    out = model(batch)
    teacher = [p for m in model.task_modules for p in m.parameters()] + list(
        model.experts.parameters()
    )
    grads = torch.autograd.grad(out.aux_loss, teacher, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    student = torch.autograd.grad(out.aux_loss, list(model.student.parameters()))
    assert any(g.abs().max() > 0 for g in student)
    with pytest.raises(ConfigError, match="model.target_task"):
        build_model("dmtl", enc.schema, enc.layout(), {"target_task": "nope"})


@pytest.mark.parametrize("name", NEW)
def test_gate_diagnostics_read_every_new_model(name, small):
    from mtlrec.train.diagnostics import GradientMonitor

    enc, table = small
    model = build_model(name, enc.schema, enc.layout())
    summary = GradientMonitor(enc.schema.task_names).gate_summary(model, table, 128)
    assert summary is not None
    assert set(summary["mean"]) == set(enc.schema.task_names)
    for row in summary["mean"].values():
        assert sum(row) == pytest.approx(1.0, abs=1e-5)


def test_home_trains_on_a_last_batch_of_one_row(small):
    enc, table = small
    model = build_model("home", enc.schema, enc.layout())
    model.train()
    out = model(table.head(1))
    model.task_losses(out, table.head(1)).sum().backward()
    assert out.logits.shape == (1, 2)
