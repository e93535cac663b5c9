"""BatchRL-MTF (mtlrec.rl): the BCQ agent, its clipped double-Q target, the session simulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlrec.errors import ConfigError, MTLRecError
from mtlrec.rl import (
    BatchRLConfig,
    BatchRLMTF,
    FusionSimulator,
    SimulatorConfig,
    SimWorld,
    Transitions,
    clipped_double_q_target,
    conservative_ope,
    exploration_policy,
    fixed_policy,
    fused_scores,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["like", "rating"]
BOX = {"like": (0.0, 2.0), "rating": (0.0, 2.0)}


def random_transitions(n: int, state_dim: int, seed: int = 0) -> Transitions:
    rng = np.random.default_rng(seed)
    return Transitions(
        state=rng.normal(size=(n, state_dim)).astype(np.float32),
        action=rng.uniform(0, 2, size=(n, 2)),
        reward=rng.normal(size=n),
        next_state=rng.normal(size=(n, state_dim)).astype(np.float32),
        done=rng.random(n) < 0.3,
        first=np.zeros(n, dtype=bool),
        session=np.arange(n),
    )


def toy_world(users: int = 5, items: int = 30, seed: int = 0) -> SimWorld:
    rng = np.random.default_rng(seed)
    like = rng.uniform(0.05, 0.95, size=(users, items))
    rating = 1 + 4 * rng.uniform(size=(users, items))
    truth = np.stack([like, rating], axis=2)
    ranker = np.clip(truth + rng.normal(0, 0.2, size=truth.shape), [0.01, 0.5], [0.99, 5.5])
    return SimWorld(
        tasks=list(TASKS),
        binary=[True, False],
        truth=truth,
        ranker=ranker,
        profile=rng.normal(size=(users, 2)),
        profile_names=["p0", "p1"],
        activity=rng.normal(size=users),
    )


# --- the agent ---------------------------------------------------------------------------------
def test_policy_shapes_and_bounds_and_serving():
    from mtlrec.schema import Feature, Schema, Task
    from mtlrec.serve.config import serve_config
    from mtlrec.serve.fusion import Fusion

    agent = BatchRLMTF(4, TASKS, BOX, BatchRLConfig(steps=20, batch_size=32, seed=3))
    agent.fit(random_transitions(200, 4))
    states = np.random.default_rng(1).normal(size=(50, 4))
    weights = agent.policy(states)
    assert weights.shape == (50, 2)
    assert (weights >= 0).all() and (weights <= 2).all()
    assert agent.act(states).min() >= -1 and agent.act(states).max() <= 1
    assert agent.policy(states[0]).shape == (1, 2)  # one state as a vector
    # a learned action is a valid per-request override under the agent's fusion file
    schema = Schema(features=[Feature("user")], tasks=[Task("like"), Task("rating", "regression")])
    fusion = Fusion(serve_config(agent.fusion_config()["serve"], schema), TASKS)
    override = agent.serve_weights(states[:1])[0]
    assert set(override) == set(TASKS)
    np.testing.assert_allclose(fusion.weights(override), weights[0])


def test_clipped_double_q_target_by_hand():
    reward = torch.tensor([1.0, 2.0])
    done = torch.tensor([0.0, 1.0])
    q1 = torch.tensor([[1.0, 5.0], [3.0, 0.0]])
    q2 = torch.tensor([[2.0, 4.0], [1.0, 7.0]])
    # min over the critics: [[1, 4], [1, 0]]; max over the candidate actions: [4, 1]
    y = clipped_double_q_target(reward, done, q1, q2, gamma=0.5)
    torch.testing.assert_close(y, torch.tensor([1 + 0.5 * 4, 2.0]))
    # BCQ's soft clipping, lam = 0.75: row 0 -> max(0.75*1 + 0.25*2, 0.75*4 + 0.25*5) = 4.25
    y = clipped_double_q_target(reward, done, q1, q2, gamma=0.5, lam=0.75)
    torch.testing.assert_close(y, torch.tensor([1 + 0.5 * 4.25, 2.0]))
    with pytest.raises(MTLRecError, match="batch=2"):
        clipped_double_q_target(reward, done, q1, q2[:, :1], gamma=0.5)


def test_vae_reconstructs_logged_actions():
    rng = np.random.default_rng(0)
    state = rng.uniform(-1, 1, size=(512, 3)).astype(np.float32)
    action = 1 + 0.8 * np.tanh(state[:, :2] + state[:, 2:])  # a deterministic logging policy
    batch = random_transitions(512, 3)
    batch.state, batch.action = state, action
    agent = BatchRLMTF(3, TASKS, BOX, BatchRLConfig(steps=300, batch_size=128, seed=0))
    agent.fit(batch, log_every=1)
    losses = [h["vae_loss"] for h in agent.history]
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20])
    with torch.no_grad():
        s = torch.from_numpy(state)
        z = torch.zeros(len(s), agent.vae.latent_dim)
        recon = agent.to_weights(agent.vae.decode(s, z).numpy())
    assert np.abs(recon - action).mean() < 0.15


def toy_mdp(n: int, seed: int) -> tuple[Transitions, np.ndarray]:
    """States in [-1, 1]^2; the best action is 0.5 * s (normalised units); reward 1 - ||a - a*||^2;
    the session ends with probability 0.5 and the next state is independent of the action, so the
    best action is the myopic one. Logged actions: the best one plus N(0, 0.4) noise."""
    rng = np.random.default_rng(seed)
    state = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    best = 0.5 * state
    action = np.clip(best + rng.normal(0, 0.4, size=best.shape), -1, 1)
    reward = 1 - ((action - best) ** 2).sum(axis=1)
    batch = Transitions(
        state=state,
        action=action,
        reward=reward,
        next_state=rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        done=rng.random(n) < 0.5,
        first=np.ones(n, dtype=bool),
        session=np.arange(n),
    )
    return batch, best


def test_learned_policy_beats_the_logging_policy_on_a_toy_mdp():
    batch, _ = toy_mdp(4000, seed=0)
    box = {"a": (-1.0, 1.0), "b": (-1.0, 1.0)}  # weights = normalised actions
    cfg = BatchRLConfig(steps=800, seed=0, lr_critic=1e-3, lr_actor=1e-3, hidden=(64, 64))
    agent = BatchRLMTF(2, ["a", "b"], box, cfg).fit(batch)
    test = np.random.default_rng(9).uniform(-1, 1, size=(1000, 2)).astype(np.float32)
    chosen = agent.policy(test)
    value = 1 - ((chosen - 0.5 * test) ** 2).sum(axis=1)
    logging_value = batch.reward.mean()  # about 1 - 2 * 0.4^2 = 0.68
    assert value.mean() > logging_value + 0.1, (value.mean(), logging_value)


def test_conservative_ope_ranks_a_good_policy_above_a_bad_one():
    batch, best = toy_mdp(3000, seed=1)
    good, bad = best, -best
    nxt = 0.5 * batch.next_state
    v_good = conservative_ope(batch, good, nxt, batch.state, good, steps=800, lr=1e-3, seed=0)
    v_bad = conservative_ope(batch, bad, -nxt, batch.state, bad, steps=800, lr=1e-3, seed=0)
    assert np.isfinite(v_good) and v_good > v_bad


def test_save_and_load_keep_the_networks(tmp_path):
    agent = BatchRLMTF(4, TASKS, BOX, BatchRLConfig(steps=10, batch_size=16, seed=2))
    agent.fit(random_transitions(64, 4))
    loaded = BatchRLMTF.load(agent.save(tmp_path / "agent.pt"))
    states = np.random.default_rng(0).normal(size=(8, 4))
    weights = np.full((8, 2), 1.0)
    np.testing.assert_allclose(loaded.q_value(states, weights), agent.q_value(states, weights))
    assert loaded.tasks == TASKS
    with pytest.raises(MTLRecError, match="not a saved BatchRL-MTF agent"):
        (tmp_path / "other.pt").write_bytes(b"nope")
        BatchRLMTF.load(tmp_path / "other.pt")


def test_bad_inputs_name_the_problem():
    agent = BatchRLMTF(4, TASKS, BOX, BatchRLConfig(steps=5, batch_size=8))
    with pytest.raises(MTLRecError, match="3 feature.*expects 4"):
        agent.policy(np.zeros((2, 3)))
    wide = random_transitions(20, 4)
    wide.action = np.ones((20, 3))
    with pytest.raises(MTLRecError, match="number of tasks, 2 \\(like, rating\\)"):
        agent.fit(wide)
    with pytest.raises(ConfigError, match="unknown task.*'clicks'.*tasks are like, rating"):
        BatchRLMTF(4, TASKS, {**BOX, "clicks": (0, 1)})
    with pytest.raises(ConfigError, match="no \\(low, high\\) for task\\(s\\) rating"):
        BatchRLMTF(4, TASKS, {"like": (0, 1)})
    with pytest.raises(ConfigError, match="rho"):
        BatchRLMTF(4, TASKS, BOX, BatchRLConfig(rho=0))
    sim = FusionSimulator(toy_world())
    with pytest.raises(ConfigError, match="3 weight\\(s\\).*2 task\\(s\\): like, rating"):
        sim.rollout(fixed_policy([1.0, 1.0, 1.0]), 4, seed=0)
    with pytest.raises(ConfigError, match="reward_weights: unknown task.*'share'"):
        FusionSimulator(toy_world(), SimulatorConfig(reward_weights={"share": 1.0}))
    with pytest.raises(ConfigError, match="value_range.*'rating'"):
        FusionSimulator(toy_world(), SimulatorConfig(value_range={}))


# --- the simulator -----------------------------------------------------------------------------
def hand_world() -> SimWorld:
    """One user, three items with certain responses: (like, rating) = (1, 5), (0, 1), (1, 3)."""
    truth = np.array([[[1.0, 5.0], [0.0, 1.0], [1.0, 3.0]]])
    ranker = np.array([[[0.9, 2.0], [0.1, 5.0], [0.5, 4.0]]])
    return SimWorld(
        tasks=list(TASKS),
        binary=[True, False],
        truth=truth,
        ranker=ranker,
        profile=np.zeros((1, 1)),
        profile_names=["p"],
        activity=np.zeros(1),
    )


def certain(**overrides) -> SimulatorConfig:
    base = dict(
        candidates=3,
        max_steps=1,
        response_noise=0.0,
        leave_base=1e-9,
        leave_mood=0.0,
        leave_weights={},
        leave_fatigue=0.0,
        reward_weights={"play": 1.0, "like": 1.0, "rating": 1.0},
    )
    return SimulatorConfig(**{**base, **overrides})


def test_rewards_follow_the_definition_on_a_hand_made_case():
    sim = FusionSimulator(hand_world(), certain())
    # weights (1, 0) rank by the predicted like: item 0 -> 1 (play) + 1 (like) + (5 - 3) / 2
    out = sim.rollout(fixed_policy([1.0, 0.0]), 3, seed=0, record=True)
    np.testing.assert_allclose(out.returns, 3.0)
    np.testing.assert_allclose(out.transitions.reward, 3.0)
    assert out.transitions.done.all() and (out.lengths == 1).all()
    # weights (0, 1) rank by the predicted rating: item 1 -> 1 + 0 + (1 - 3) / 2 = 0
    np.testing.assert_allclose(sim.rollout(fixed_policy([0.0, 1.0]), 3, seed=0).returns, 0.0)
    # the reward weights are the paper's w_i: only the play term left
    only_play = FusionSimulator(hand_world(), certain(reward_weights={"play": 2.0}))
    np.testing.assert_allclose(only_play.rollout(fixed_policy([1, 0]), 2, seed=0).returns, 2.0)
    # three steps, one candidate: every item consumed once (no repeats), 3 + 0 + 2
    three = FusionSimulator(hand_world(), certain(candidates=1, max_steps=3))
    out = three.rollout(fixed_policy([1.0, 1.0]), 5, seed=1)
    np.testing.assert_allclose(out.returns, 5.0)
    np.testing.assert_allclose(out.positives["like"], 2.0)


def test_sessions_end_and_leaving_depends_on_satisfaction():
    world = toy_world()
    sim = FusionSimulator(world, SimulatorConfig(max_steps=25))
    out = sim.rollout(fixed_policy([1.0, 1.0]), 300, seed=0, record=True)
    assert (out.lengths >= 1).all() and (out.lengths <= 25).all()
    assert out.lengths.min() < 25  # users do leave
    tr = out.transitions
    assert len(tr) == out.lengths.sum() and tr.done.sum() == 300
    assert tr.first.sum() == 300
    # a policy that picks the worst-rated items keeps users for a shorter time
    bad = sim.rollout(fixed_policy([0.0, -2.0]), 300, seed=0)
    good = sim.rollout(fixed_policy([0.0, 2.0]), 300, seed=0)
    assert good.lengths.mean() > bad.lengths.mean()
    assert tr.state.shape[1] == sim.state_dim == len(sim.state_names)


def test_seeds_reproduce():
    sim = FusionSimulator(toy_world(), SimulatorConfig(max_steps=10))
    low, high = np.zeros(2), np.full(2, 2.0)
    runs = [
        sim.rollout(
            exploration_policy(fixed_policy([1, 0]), low, high, seed=4), 50, seed=7, record=True
        )
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0].returns, runs[1].returns)
    np.testing.assert_array_equal(runs[0].transitions.action, runs[1].transitions.action)
    np.testing.assert_array_equal(runs[0].transitions.state, runs[1].transitions.state)
    other = sim.rollout(fixed_policy([1, 0]), 50, seed=8)
    assert not np.array_equal(other.returns, runs[0].returns)
    # logged actions stay in the box
    assert runs[0].transitions.action.min() >= 0 and runs[0].transitions.action.max() <= 2


def test_fused_scores_match_the_weighted_product_fusion():
    rng = np.random.default_rng(0)
    preds = np.stack([rng.uniform(0.01, 0.99, (4, 6)), rng.uniform(1, 5, (4, 6))], axis=2)
    weights = rng.uniform(0, 2, (4, 2))
    scores = fused_scores(preds, weights)
    product = np.prod(preds ** weights[:, None, :], axis=2)  # weighted_product
    np.testing.assert_array_equal(scores.argmax(1), product.argmax(1))
    with pytest.raises(ConfigError, match="one weight per task"):
        fused_scores(preds, weights[:, :1])
