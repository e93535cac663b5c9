import math

import pytest
import torch

from mtlrec.balance import build_balancer
from mtlrec.data.encoder import Encoder
from mtlrec.errors import ConfigError
from mtlrec.models import MTLModel, build_model, describe_models
from mtlrec.models.base import ModelOutput
from mtlrec.nn.experts import Experts, Gate, experts_and_gates, mix
from mtlrec.schema import Schema, Task
from mtlrec.train.metrics import auc
from mtlrec.train.trainer import predict
from tests.conftest import funnel_frame
from tests.model_properties import assert_own_gradients, assert_partition

ALL = ["single-task", "shared-bottom", "omoe", "mmoe", "cgc", "ple", "esmm", "aitm"]
CASCADE = {"esmm", "aitm"}


def test_registry_has_the_issue_models():
    assert set(ALL) <= set(describe_models())


def test_unknown_model_and_option_are_named(funnel_tables):
    enc, _, _ = funnel_tables
    with pytest.raises(ConfigError, match="unknown model 'mmeo'"):
        build_model("mmeo", enc.schema, enc.layout())
    with pytest.raises(ConfigError, match="model.num_expert"):
        build_model("mmoe", enc.schema, enc.layout(), {"num_expert": 3})


@pytest.mark.parametrize(
    "name, options, needle",
    [
        ("mmoe", {"embed_dim": 0}, "model.embed_dim must be >= 1"),
        ("ple", {"dropout": 1.0}, r"model.dropout must be in \[0, 1\)"),
        ("mmoe", {"expert_hidden": []}, "model.expert_hidden: experts need at least one"),
        ("mfh", {"root_hidden": []}, "model.root_hidden: experts need at least one"),
        ("shared-bottom", {"tower_hidden": [8, 0]}, r"model.tower_hidden: layer widths .*\[8, 0\]"),
        ("cgc", {"expert_hidden": ["wide"]}, "model.expert_hidden: expected a list of integers"),
        ("mmoe", {"num_experts": 2.5}, "model.num_experts: expected int, got 2.5"),
        ("dmtl", {"distill": "false"}, None),  # bool("false") is True: the text must be read
        ("dmtl", {"distill": "maybe"}, "model.distill must be true or false"),
        ("mmoe", {"dropout": True}, "model.dropout: expected float, got True"),
    ],
)
def test_option_values_out_of_range_are_named(funnel_tables, name, options, needle):
    enc, _, _ = funnel_tables
    if needle is None:
        assert build_model(name, enc.schema, enc.layout(), options).config.distill is False
        return
    with pytest.raises(ConfigError, match=needle):
        build_model(name, enc.schema, enc.layout(), options)


def test_whole_floats_and_empty_towers_are_accepted(funnel_tables):
    enc, _, _ = funnel_tables
    model = build_model("mmoe", enc.schema, enc.layout(), {"num_experts": 4.0, "tower_hidden": []})
    assert model.config.num_experts == 4 and isinstance(model.config.num_experts, int)


def _train(model: MTLModel, table, steps: int, lr: float = 0.01, balancer: str = "ew"):
    torch.manual_seed(0)
    bal = build_balancer(balancer, model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    history = []
    while len(history) < steps:
        for batch in table.batches(256, shuffle=True, generator=gen):
            out = model(batch)
            losses = model.task_losses(out, batch)
            opt.zero_grad()
            total = bal.backward(losses, out.aux_loss)
            opt.step()
            history.append(float(total))
            if len(history) == steps:
                break
    return history


@pytest.mark.parametrize("name", ALL)
def test_every_model_learns_the_planted_funnel_signal(name, funnel_tables):
    enc, train, valid = funnel_tables
    torch.manual_seed(0)
    model = build_model(name, enc.schema, enc.layout(), {"embed_dim": 8})
    with torch.no_grad():
        before = float(model.task_losses(model(train), train).sum())
    history = _train(model, train, steps=120)
    with torch.no_grad():
        after = float(model.task_losses(model(train), train).sum())
    assert after < before * 0.8, (before, after, history[:3], history[-3:])
    cond, joint = predict(model, valid, 4096)
    assert cond.shape == joint.shape == (len(valid), 2)
    assert ((cond >= 0) & (cond <= 1)).all() and ((joint >= 0) & (joint <= 1)).all()
    labels = valid.labels
    clicked = labels[:, 0] == 1
    assert auc(labels[:, 0].numpy(), cond[:, 0].numpy()) > 0.75
    assert auc(labels[clicked, 1].numpy(), cond[clicked, 1].numpy()) > 0.75


@pytest.mark.parametrize("name", sorted(set(ALL) - CASCADE))
def test_parallel_models_fit_binary_and_regression(name, parallel_schema):
    frame = funnel_frame(2000, seed=5)
    enc = Encoder(parallel_schema).fit(frame)
    table = enc.transform(frame)
    model = build_model(name, enc.schema, enc.layout(), {"embed_dim": 8})
    history = _train(model, table, steps=80)
    assert sum(history[-10:]) < sum(history[:10])
    out = model(table.head(7))
    assert out.logits.shape == (7, 2)


@pytest.mark.parametrize("name", sorted(CASCADE))
def test_cascade_models_reject_regression_tasks(name, parallel_schema):
    enc = Encoder(parallel_schema).fit(funnel_frame(100))
    with pytest.raises(ConfigError, match="binary"):
        build_model(name, enc.schema, enc.layout())


@pytest.mark.parametrize("name", ALL)
def test_shared_and_task_parameters_partition_the_model(name, funnel_tables):
    enc, _, _ = funnel_tables
    assert_partition(build_model(name, enc.schema, enc.layout()))


@pytest.mark.parametrize("name", ALL)
def test_task_parameters_get_gradient_only_from_their_task(name, funnel_tables):
    """A parameter declared task-specific must not receive gradient from another task."""
    enc, train, _ = funnel_tables
    assert_own_gradients(build_model(name, enc.schema, enc.layout()), train.head(256))


def test_single_task_shares_nothing(funnel_tables):
    enc, _, _ = funnel_tables
    assert build_model("single-task", enc.schema, enc.layout()).shared_parameters() == []


def test_batched_experts_equal_a_loop_of_mlps():
    torch.manual_seed(0)
    experts = Experts(3, 5, (4, 2))
    x = torch.randn(6, 5)
    out = experts(x)
    for e in range(3):
        h = x
        for w, b in zip(experts.weights, experts.biases):
            h = torch.relu(h @ w[e] + b[e, 0])
        assert torch.allclose(out[:, e], h, atol=1e-6)


@pytest.mark.parametrize("width", [4, 100])  # 2 x 3 x 4 < 400: broadcast; 2 x 3 x 100: bmm
def test_gates_and_batched_mix_equal_one_gate_at_a_time(width):
    torch.manual_seed(0)
    gates = [Gate(5, 3) for _ in range(2)]
    x, experts = torch.randn(6, 5), torch.randn(6, 3, width)
    stacked = torch.stack([g(x) for g in gates], 1)
    assert stacked.shape == (6, 2, 3)
    mixed = mix(stacked, experts)
    for t, gate in enumerate(gates):
        alone = torch.softmax(x @ gate.linear.weight.T + gate.linear.bias, -1)
        assert torch.allclose(stacked[:, t], alone, atol=1e-6)
        by_hand = sum(alone[:, e : e + 1] * experts[:, e] for e in range(3))
        assert torch.allclose(mixed[:, t], by_hand, atol=1e-6)
        assert torch.allclose(mix(alone, experts), by_hand, atol=1e-6)


@pytest.mark.parametrize("hidden, num_gates", [((4,), 2), ((4, 3), 1), ((4, 3), 3)])
def test_experts_and_gates_in_one_gemm_equal_them_apart(hidden, num_gates):
    """The fused first-layer GEMM gives the same outputs and the same gradients on every
    parameter (and the input) as running the experts and the gates separately."""
    torch.manual_seed(0)
    experts = Experts(4, 5, hidden)
    gates = [Gate(5, 4) for _ in range(num_gates)]
    params = [*experts.parameters(), *(p for g in gates for p in g.parameters())]
    x = torch.randn(6, 5, requires_grad=True)
    grad_out = torch.randn(6, 4, hidden[-1]), torch.randn(6, num_gates, 4)

    def outputs_and_grads(fused: bool):
        out = (
            experts_and_gates(experts, gates, x)
            if fused
            else (experts(x), torch.stack([g(x) for g in gates], 1))
        )
        grads = torch.autograd.grad(out, [x, *params], grad_out)
        return out, grads

    (h, g), grads = outputs_and_grads(fused=True)
    (h_ref, g_ref), grads_ref = outputs_and_grads(fused=False)
    assert h.shape == (6, 4, hidden[-1]) and g.shape == (6, num_gates, 4)
    assert torch.allclose(h, h_ref, atol=1e-6) and torch.allclose(g, g_ref, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)


def test_mmoe_output_follows_the_paper_per_task(funnel_tables):
    """y_k = h^k(sum_i g^k(x)_i f_i(x)) (MMoE Eq. 5-6), computed task by task by hand."""
    enc, train, _ = funnel_tables
    torch.manual_seed(0)
    model = build_model("mmoe", enc.schema, enc.layout(), {"num_experts": 3})
    batch = train.head(7)
    x = model.embedding(batch)
    experts = model.experts(x)
    logits = model(batch).logits
    for t, tower in enumerate(model.task_modules):
        g = torch.softmax(model.gates[t].linear(x), -1)
        expected = tower(sum(g[:, e : e + 1] * experts[:, e] for e in range(3)))
        assert torch.allclose(logits[:, t : t + 1], expected, atol=1e-5)


def test_mmoe_gates_are_per_task_distributions(funnel_tables):
    enc, train, _ = funnel_tables
    model = build_model("mmoe", enc.schema, enc.layout(), {"num_experts": 4})
    gates = model(train.head(10)).extras["gates"]
    assert gates.shape == (10, 2, 4)
    assert torch.allclose(gates.sum(-1), torch.ones(10, 2))
    omoe = build_model("omoe", enc.schema, enc.layout(), {"num_experts": 4})
    g = omoe(train.head(10)).extras["gates"]
    assert torch.equal(g[:, 0], g[:, 1])


def test_ple_levels_and_cgc(funnel_tables):
    enc, train, _ = funnel_tables
    ple = build_model("ple", enc.schema, enc.layout(), {"num_levels": 3})
    assert len(ple.lower) == 2
    assert ple(train.head(4)).extras["gates"].shape == (4, 2, 4)
    with pytest.raises(ConfigError, match="CGC"):
        build_model("cgc", enc.schema, enc.layout(), {"num_levels": 2})


def test_esmm_joint_is_ctr_times_cvr_and_loss_is_entire_space(funnel_tables):
    enc, train, _ = funnel_tables
    model = build_model("esmm", enc.schema, enc.layout())
    batch = train.head(64)
    out = model(batch)
    cond, joint = model.predict(out)
    assert torch.allclose(joint[:, 1], cond[:, 0] * cond[:, 1])
    losses = model.task_losses(out, batch)
    y = batch.labels
    expected = torch.nn.functional.binary_cross_entropy(joint[:, 1], y[:, 1])
    assert losses[1].item() == pytest.approx(expected.item(), rel=1e-4)


def test_aitm_calibration_penalty_matches_the_paper(funnel_tables):
    enc, train, _ = funnel_tables
    model = build_model("aitm", enc.schema, enc.layout(), {"calibration_weight": 0.6})
    out = model(train.head(64))
    y = out.joint
    expected = 0.6 * torch.relu(y[:, 1] - y[:, 0]).mean()
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    cond, joint = model.predict(out)
    # the conditional CVR is the ratio of entire-space probabilities (clipped to [0, 1])
    ratio = (joint[:, 1] / joint[:, 0]).clamp(max=1 - 1e-7)
    assert torch.allclose(cond[:, 1], ratio, atol=1e-5)


@pytest.mark.parametrize("second", [Task("purchase"), Task("score", "regression")])
def test_parallel_task_losses_are_per_task_means(second, parallel_schema):
    """Without a dependency every row counts: BCE-with-logits or squared error, averaged."""
    schema = Schema(features=parallel_schema.features, tasks=[Task("click"), second])
    frame = funnel_frame(50, seed=2)
    enc = Encoder(schema).fit(frame)
    batch = enc.transform(frame)
    model = build_model("shared-bottom", enc.schema, enc.layout())
    logits = torch.randn(len(batch), 2)
    losses = model.task_losses(ModelOutput(logits=logits), batch)
    y = batch.labels
    click = -(
        y[:, 0] * logits[:, 0].sigmoid().log() + (1 - y[:, 0]) * (-logits[:, 0]).sigmoid().log()
    )
    if second.type == "binary":
        score = -(
            y[:, 1] * logits[:, 1].sigmoid().log() + (1 - y[:, 1]) * (-logits[:, 1]).sigmoid().log()
        )
    else:
        score = (logits[:, 1] - y[:, 1]) ** 2
    assert torch.allclose(losses, torch.stack([click.mean(), score.mean()]), atol=1e-5)


def test_default_losses_mask_unobserved_rows(funnel_tables):
    enc, train, _ = funnel_tables
    model = build_model("shared-bottom", enc.schema, enc.layout())
    batch = train.head(200)
    logits = torch.zeros(200, 2)
    logits[:, 1] = torch.where(batch.labels[:, 0] == 1, 0.0, 50.0)  # wild where unobserved
    losses = model.task_losses(ModelOutput(logits=logits), batch)
    assert losses[1].item() == pytest.approx(math.log(2), rel=1e-5)
