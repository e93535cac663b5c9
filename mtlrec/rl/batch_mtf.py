"""BatchRL-MTF: fusion weights chosen per request by a policy learned offline with batch RL.

Paper: Qihua Zhang, Junning Liu, Yuzhuo Dai, Yiyan Qi, Yifan Yuan, Kunlun Zheng, Fan Huang and
Xianfeng Tan, "Multi-Task Fusion via Reinforcement Learning for Long-Term User Satisfaction in
Recommender Systems", KDD 2022 (arXiv 2208.04560). Its Batch RL part is BCQ: Scott Fujimoto,
David Meger and Doina Precup, "Off-Policy Deep Reinforcement Learning without Exploration", ICML
2019, with the clipped double-Q target of TD3 (Fujimoto, van Hoof and Meger, "Addressing
Function Approximation Error in Actor-Critic Methods", ICML 2018).

The MTF task is an MDP over a recommendation session: the state is the user (profile and
behaviour), the action ``a`` the fusion weight vector ``alpha`` (one weight per task) of the
ranking formula ``f(o) = sum_k alpha_k log(o_k + beta_k)`` (the paper's Eq. 1), the reward a
weighted sum of the user's responses (Eq. 2). From logged transitions ``(s, a, r, s', done)`` the
agent learns (paper Section 3.2, Algorithm 1):

* an **action generative network** ``G = {E, D}``: a conditional VAE of the logged actions given
  the state, trained on ``||D(s, z) - a||^2 + kl_weight * KL(N(mu, sigma) || N(0, 1))`` (Eq. 3);
* an **action perturbation network** ``P(s, a, rho)`` that moves a generated action by
  ``xi in [-rho, rho]`` (Tanh output scaled by ``rho``), trained by the deterministic policy
  gradient to maximise ``Q1(s, a + xi)`` (Eq. 5);
* **twin critics** ``Q1, Q2`` with target copies, trained to the clipped double-Q target
  ``y = r + gamma * (1 - done) * max_i [lam * min_j Q'_j(s', a'_i) + (1 - lam) * max_j
  Q'_j(s', a'_i)]`` over ``n`` actions ``a'_i`` drawn from ``G(s')`` and perturbed by the target
  ``P'`` (Eqs. 6-7; ``lam = 1`` is the paper's plain minimum, BCQ's code uses 0.75);
* **policy**: draw ``n`` actions from ``G(s)``, perturb them, take the one with the highest
  ``Q1`` (Eq. 4); here the ``n`` latent draws are fixed once per agent (seeded), so the served
  weights are a deterministic function of the state. Actions live in ``[-1, 1]`` per task (the paper normalises them so) and map
  linearly to the weight box ``[low_k, high_k]``.

Hyper-parameters from the paper (Section 4.2): ``rho = 0.15``, ``gamma = 0.95``, learning rates
1e-3 (VAE), 1e-4 (perturbation), 2e-4 (critics), Adam, ReLU MLPs, Tanh on the perturbation,
target soft-update rate 0.05 every ``L = 10`` steps, mini-batch 256. From BCQ (the paper does
not give them): ``n = 10`` sampled actions, latent size ``2 * action_dim``, latent clipped to
[-0.5, 0.5] when sampling, KL weight 0.5, log-std clamped to [-4, 15].

Departures: hidden sizes (128, 128) for every network instead of BCQ's 400-300 (actor/critic)
and 750-750 (VAE), and thousands rather than the paper's 300,000 training steps, to train in
seconds on 2 CPU cores (the states and actions here are small: ~15 features, 2 tasks); the
online exploration loop (retraining daily on exploration data from real users) exists here only
as :func:`mtlrec.rl.simulator.exploration_policy` in a simulator; the Conservative-OPEstimator
(the paper's Section 4.3.1 and Algorithm 2) is :func:`conservative_ope` below: FQE with the CQL
penalty ``alpha * (Q(s, pi(s)) - Q(s, a))``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlrec.errors import ConfigError, MTLRecError


@dataclass
class BatchRLConfig:
    """Hyper-parameters; the paper's or BCQ's values unless the module docstring says otherwise."""

    hidden: tuple[int, ...] = (128, 128)
    vae_hidden: tuple[int, ...] = (128, 128)
    latent_dim: int = 0  # 0: 2 * action_dim (BCQ)
    n_actions: int = 10  # BCQ
    rho: float = 0.15  # perturbation bound (paper)
    gamma: float = 0.95  # paper
    lam: float = 1.0  # clipped double-Q: 1 = min (paper); BCQ's code: 0.75
    lr_vae: float = 1e-3  # paper
    lr_actor: float = 1e-4  # paper
    lr_critic: float = 2e-4  # paper
    tau: float = 0.05  # target soft-update rate (paper)
    target_every: int = 10  # target update every L steps (paper)
    batch_size: int = 256  # paper
    steps: int = 5000  # paper: 300,000
    kl_weight: float = 0.5  # BCQ
    seed: int = 0

    def check(self) -> None:
        for key in ("n_actions", "target_every", "batch_size", "steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"BatchRLConfig.{key} must be >= 1")
        if not 0 < self.rho <= 2:
            raise ConfigError(f"BatchRLConfig.rho must be in (0, 2], got {self.rho}")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"BatchRLConfig.gamma must be in [0, 1], got {self.gamma}")
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"BatchRLConfig.lam must be in [0, 1], got {self.lam}")
        if not 0 < self.tau <= 1:
            raise ConfigError(f"BatchRLConfig.tau must be in (0, 1], got {self.tau}")


def clipped_double_q_target(
    reward: torch.Tensor,
    done: torch.Tensor,
    q1_next: torch.Tensor,
    q2_next: torch.Tensor,
    gamma: float,
    lam: float = 1.0,
) -> torch.Tensor:
    """``y = r + gamma (1 - done) max_i [lam min(Q1', Q2') + (1 - lam) max(Q1', Q2')]``.

    ``reward``, ``done``: ``[B]``; ``q1_next``, ``q2_next``: ``[B, n]``, the target critics at
    the ``n`` candidate next actions of each row. Returns ``[B]``."""
    if q1_next.shape != q2_next.shape or q1_next.ndim != 2 or q1_next.shape[0] != len(reward):
        raise MTLRecError(
            f"clipped_double_q_target: q1_next {list(q1_next.shape)} and q2_next "
            f"{list(q2_next.shape)} must both be [batch={len(reward)}, n]"
        )
    low, high = torch.minimum(q1_next, q2_next), torch.maximum(q1_next, q2_next)
    value = (lam * low + (1 - lam) * high).max(dim=1).values
    return reward + gamma * (1 - done) * value


def _mlp(inputs: int, hidden: Sequence[int], outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(inputs, width), nn.ReLU()]
        inputs = width
    layers.append(nn.Linear(inputs, outputs))
    return nn.Sequential(*layers)


class ActionVAE(nn.Module):
    """The action generative network ``G = {E(z | s, a), D(a | s, z)}`` (conditional VAE)."""

    def __init__(self, state_dim: int, action_dim: int, latent_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = _mlp(state_dim + action_dim, hidden, 2 * latent_dim)
        self.decoder = _mlp(state_dim + latent_dim, hidden, action_dim)

    def forward(self, state: torch.Tensor, action: torch.Tensor):
        mean, log_std = self.encoder(torch.cat([state, action], 1)).chunk(2, dim=1)
        std = log_std.clamp(-4, 15).exp()
        z = mean + std * torch.randn_like(std)
        return self.decode(state, z), mean, std

    def decode(self, state: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Actions for ``state``; ``z`` defaults to N(0, 1) draws clipped to [-0.5, 0.5] (BCQ)."""
        if z is None:
            z = torch.randn(len(state), self.latent_dim).clamp(-0.5, 0.5)
        return torch.tanh(self.decoder(torch.cat([state, z], 1)))


class Perturbation(nn.Module):
    """``P(s, a, rho)``: ``a + rho * tanh(net(s, a))`` clipped to ``[-1, 1]``."""

    def __init__(self, state_dim: int, action_dim: int, hidden: Sequence[int], rho: float):
        super().__init__()
        self.net = _mlp(state_dim + action_dim, hidden, action_dim)
        self.rho = rho

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        xi = self.rho * torch.tanh(self.net(torch.cat([state, action], 1)))
        return (action + xi).clamp(-1, 1)


class TwinCritic(nn.Module):
    """``Q1(s, a)``, ``Q2(s, a)``: two independent MLPs."""

    def __init__(self, state_dim: int, action_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.q1 = _mlp(state_dim + action_dim, hidden, 1)
        self.q2 = _mlp(state_dim + action_dim, hidden, 1)

    def forward(self, state: torch.Tensor, action: torch.Tensor):
        x = torch.cat([state, action], 1)
        return self.q1(x).squeeze(1), self.q2(x).squeeze(1)

    def first(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.q1(torch.cat([state, action], 1)).squeeze(1)


def _soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.mul_(1 - tau).add_(s, alpha=tau)


class BatchRLMTF:
    """The BatchRL-MTF agent for the tasks ``tasks`` with weight box ``bounds`` (task ->
    ``(low, high)``), states of ``state_dim`` features (named by ``state_names`` if given).

    ``fit(transitions)`` learns from logged ``(s, a, r, s', done)`` with ``a`` in task units;
    ``policy(states)`` returns weights ``[N, T]``; ``serve_weights(states)`` the same as
    ``{task: weight}`` mappings, a request's ``weights`` override for ``mtlrec serve`` with a
    ``weighted_product`` fusion file whose ``weight_bounds`` hold the box (``fusion_config``)."""

    def __init__(
        self,
        state_dim: int,
        tasks: Sequence[str],
        bounds: dict[str, tuple[float, float]],
        config: BatchRLConfig | None = None,
        state_names: Sequence[str] | None = None,
    ) -> None:
        self.config = config or BatchRLConfig()
        self.config.check()
        self.tasks = list(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks: expected distinct task names, got {self.tasks}")
        unknown = sorted(set(bounds) - set(self.tasks))
        if unknown:
            raise ConfigError(
                f"bounds: unknown task(s) {', '.join(map(repr, unknown))}; tasks are "
                f"{', '.join(self.tasks)}"
            )
        missing = [t for t in self.tasks if t not in bounds]
        if missing:
            raise ConfigError(f"bounds: no (low, high) for task(s) {', '.join(missing)}")
        low = np.array([float(bounds[t][0]) for t in self.tasks])
        high = np.array([float(bounds[t][1]) for t in self.tasks])
        bad = [t for t, lo, hi in zip(self.tasks, low, high) if not lo < hi]
        if bad:
            raise ConfigError(f"bounds: low must be < high for task(s) {', '.join(bad)}")
        if state_dim < 1:
            raise ConfigError(f"state_dim must be >= 1, got {state_dim}")
        if state_names is not None and len(state_names) != state_dim:
            raise ConfigError(f"state_names: {len(state_names)} names for {state_dim} features")
        self.low, self.high = low, high
        self.state_dim = state_dim
        self.state_names = list(state_names) if state_names is not None else None
        self.action_dim = len(self.tasks)
        cfg = self.config
        latent = cfg.latent_dim or 2 * self.action_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.vae = ActionVAE(state_dim, self.action_dim, latent, cfg.vae_hidden)
            self.actor = Perturbation(state_dim, self.action_dim, cfg.hidden, cfg.rho)
            self.critic = TwinCritic(state_dim, self.action_dim, cfg.hidden)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        # the n latent draws of the policy are fixed once (seeded), so the policy is a
        # deterministic function of the state, as a serving path needs
        gen = torch.Generator().manual_seed(cfg.seed)
        self.policy_latents = torch.randn(cfg.n_actions, latent, generator=gen).clamp(-0.5, 0.5)
        self.history: list[dict[str, float]] = []

    # --- units ---------------------------------------------------------------------------------
    def normalize(self, weights: np.ndarray) -> np.ndarray:
        """Weights (task units) -> actions in ``[-1, 1]``."""
        w = self._check_actions(weights)
        return (2 * (w - self.low) / (self.high - self.low) - 1).clip(-1, 1)

    def to_weights(self, actions: np.ndarray) -> np.ndarray:
        """Actions in ``[-1, 1]`` -> weights in the box."""
        return self.low + (np.asarray(actions, np.float64) + 1) / 2 * (self.high - self.low)

    def _check_states(self, states: Any, what: str = "state") -> np.ndarray:
        s = np.asarray(states, dtype=np.float32)
        if s.ndim == 1:
            s = s[None, :]
        if s.ndim != 2 or s.shape[1] != self.state_dim:
            names = f" ({', '.join(self.state_names)})" if self.state_names else ""
            raise MTLRecError(
                f"{what} has {s.shape[-1] if s.ndim else 0} feature(s) per row; the agent expects "
                f"{self.state_dim}{names}"
            )
        if not np.isfinite(s).all():
            raise MTLRecError(f"{what} holds a NaN or infinite value")
        return s

    def _check_actions(self, actions: Any, what: str = "action") -> np.ndarray:
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[1] != self.action_dim:
            raise MTLRecError(
                f"{what} has {a.shape[-1] if a.ndim else 0} weight(s) per row; the action "
                f"dimension must equal the number of tasks, {self.action_dim} "
                f"({', '.join(self.tasks)})"
            )
        if not np.isfinite(a).all():
            raise MTLRecError(f"{what} holds a NaN or infinite weight")
        return a

    # --- training ------------------------------------------------------------------------------
    def fit(self, transitions: Any, steps: int | None = None, log_every: int = 0) -> BatchRLMTF:
        """Algorithm 1 of the paper on ``transitions`` (an object with ``state``, ``action``
        (weights, task units), ``reward``, ``next_state`` and ``done`` arrays)."""
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        s = torch.from_numpy(self._check_states(transitions.state))
        s2 = torch.from_numpy(self._check_states(transitions.next_state, "next_state"))
        a = torch.from_numpy(self.normalize(transitions.action).astype(np.float32))
        r = torch.as_tensor(np.asarray(transitions.reward, np.float32))
        d = torch.as_tensor(np.asarray(transitions.done, np.float32))
        n = len(s)
        if not (len(s2) == len(a) == len(r) == len(d) == n) or n == 0:
            raise MTLRecError(
                f"transitions: state {len(s)}, action {len(a)}, reward {len(r)}, next_state "
                f"{len(s2)} and done {len(d)} rows must be equal and non-zero"
            )
        opt_vae = torch.optim.Adam(self.vae.parameters(), lr=cfg.lr_vae)
        opt_actor = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr_actor)
        opt_critic = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_critic)
        rng = torch.Generator().manual_seed(cfg.seed + 1)
        b, k = min(cfg.batch_size, n), cfg.n_actions
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 2)  # the VAE's reparameterisation noise
            for step in range(1, steps + 1):
                rows = torch.randint(0, n, (b,), generator=rng)
                st, at, rt, s2t, dt = s[rows], a[rows], r[rows], s2[rows], d[rows]
                # (5) generative network, Eq. (3)
                recon, mean, std = self.vae(st, at)
                kl = -0.5 * (1 + torch.log(std.pow(2)) - mean.pow(2) - std.pow(2)).mean()
                vae_loss = (recon - at).pow(2).mean() + cfg.kl_weight * kl
                opt_vae.zero_grad()
                vae_loss.backward()
                opt_vae.step()
                # (8) perturbation network by the deterministic policy gradient, Eq. (5)
                with torch.no_grad():
                    sampled = self.vae.decode(st)
                actor_loss = -self.critic.first(st, self.actor(st, sampled)).mean()
                opt_actor.zero_grad()
                actor_loss.backward()
                opt_actor.step()
                # (6, 7, 9) critics to the clipped double-Q target, Eqs. (6)-(7)
                with torch.no_grad():
                    rep = s2t.repeat_interleave(k, 0)
                    nxt = self.actor_target(rep, self.vae.decode(rep))
                    q1n, q2n = self.critic_target(rep, nxt)
                    y = clipped_double_q_target(
                        rt, dt, q1n.view(b, k), q2n.view(b, k), cfg.gamma, cfg.lam
                    )
                q1, q2 = self.critic(st, at)
                critic_loss = (q1 - y).pow(2).mean() + (q2 - y).pow(2).mean()
                opt_critic.zero_grad()
                critic_loss.backward()
                opt_critic.step()
                # (10-13) delayed soft update of the targets
                if step % cfg.target_every == 0:
                    _soft_update(self.actor_target, self.actor, cfg.tau)
                    _soft_update(self.critic_target, self.critic, cfg.tau)
                if log_every and (step % log_every == 0 or step == steps):
                    self.history.append(
                        {
                            "step": step,
                            "vae_loss": vae_loss.item(),
                            "actor_loss": actor_loss.item(),
                            "critic_loss": critic_loss.item(),
                            "q_mean": q1.mean().item(),
                        }
                    )
        return self

    # --- acting --------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, states: Any) -> np.ndarray:
        """Normalised actions ``[N, T]`` in ``[-1, 1]`` (Eq. 4): the best by ``Q1`` of the ``n``
        perturbed actions decoded from the agent's fixed latent draws."""
        s = torch.from_numpy(self._check_states(states))
        n, k = len(s), self.config.n_actions
        rep = s.repeat_interleave(k, 0)
        cand = self.actor(rep, self.vae.decode(rep, self.policy_latents.repeat(n, 1)))
        q = self.critic.first(rep, cand).view(n, k)
        best = q.argmax(dim=1)
        return cand.view(n, k, -1)[torch.arange(n), best].numpy().astype(np.float64)

    def policy(self, states: Any) -> np.ndarray:
        """Fusion weights ``[N, T]`` (task units, in the box) for states ``[N, S]``."""
        return self.to_weights(self.act(states))

    __call__ = policy

    def serve_weights(self, states: Any) -> list[dict[str, float]]:
        """One ``{task: weight}`` per state: a request's ``weights`` for ``mtlrec serve``."""
        return [dict(zip(self.tasks, map(float, row))) for row in self.policy(states)]

    def fusion_config(self) -> dict[str, Any]:
        """A ``serve:`` mapping under which the server accepts this agent's weights: the paper's
        Eq. (1) with ``beta = 0`` is the ``weighted_product`` fusion; the bounds are the box."""
        mid = (self.low + self.high) / 2
        return {
            "serve": {
                "kind": "weighted_product",
                "weights": dict(zip(self.tasks, map(float, mid))),
                "weight_bounds": {
                    t: [float(lo), float(hi)] for t, lo, hi in zip(self.tasks, self.low, self.high)
                },
            }
        }

    @torch.no_grad()
    def q_value(self, states: Any, weights: Any) -> np.ndarray:
        """``Q1(s, a)`` for weights in task units (a diagnostic; Q is learned, not true)."""
        s = torch.from_numpy(self._check_states(states))
        a = torch.from_numpy(self.normalize(weights).astype(np.float32))
        if len(a) != len(s):
            raise MTLRecError(f"{len(s)} states but {len(a)} weight rows")
        return self.critic.first(s, a).numpy().astype(np.float64)

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "config": asdict(self.config),
                "tasks": self.tasks,
                "bounds": {t: (lo, hi) for t, lo, hi in zip(self.tasks, self.low, self.high)},
                "state_dim": self.state_dim,
                "state_names": self.state_names,
                "vae": self.vae.state_dict(),
                "actor": self.actor.state_dict(),
                "critic": self.critic.state_dict(),
            },
            path,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> BatchRLMTF:
        try:
            saved = torch.load(Path(path), weights_only=False, map_location="cpu")
            cfg = saved["config"]
            cfg["hidden"], cfg["vae_hidden"] = tuple(cfg["hidden"]), tuple(cfg["vae_hidden"])
            agent = cls(
                saved["state_dim"],
                saved["tasks"],
                {t: tuple(b) for t, b in saved["bounds"].items()},
                BatchRLConfig(**cfg),
                saved["state_names"],
            )
            agent.vae.load_state_dict(saved["vae"])
            agent.actor.load_state_dict(saved["actor"])
            agent.critic.load_state_dict(saved["critic"])
        except Exception as exc:  # missing, truncated or another kind of file
            raise MTLRecError(f"{path}: not a saved BatchRL-MTF agent ({exc})") from None
        agent.actor_target = copy.deepcopy(agent.actor)
        agent.critic_target = copy.deepcopy(agent.critic)
        return agent


def conservative_ope(
    transitions: Any,
    actions: np.ndarray,
    next_actions: np.ndarray,
    initial: np.ndarray,
    initial_actions: np.ndarray,
    gamma: float = 0.95,
    alpha: float = 5e-4,
    steps: int = 3000,
    batch_size: int = 512,
    lr: float = 1e-4,
    hidden: Sequence[int] = (128, 128),
    seed: int = 0,
) -> float:
    """The paper's Conservative-OPEstimator (Section 4.3.1, Algorithm 2): fitted Q evaluation of
    a deterministic policy ``pi_e`` on logged transitions, with the CQL regulariser ``alpha *
    (Q(s, pi_e(s)) - Q(s, a))`` that lowers the values of actions the log does not hold; returns
    ``V = mean_i Q(s0_i, pi_e(s0_i))`` over the initial states.

    ``actions`` / ``next_actions``: ``pi_e`` at every ``state`` / ``next_state`` (the encoding
    the caller uses for actions, e.g. normalised); ``transitions.action`` in the same encoding.
    Hyper-parameters as the paper's Appendix A (lr 1e-4, batch 512, gamma 0.95, alpha 5e-4)
    except ``steps`` (the paper: 5,000) and the sizes (not given). Departure: one network with a
    target copy updated every 100 steps instead of refitting ``Q_k`` from scratch each round."""
    s = torch.as_tensor(np.asarray(transitions.state, np.float32))
    s2 = torch.as_tensor(np.asarray(transitions.next_state, np.float32))
    a = torch.as_tensor(np.asarray(transitions.action, np.float32))
    pa = torch.as_tensor(np.asarray(actions, np.float32))
    pa2 = torch.as_tensor(np.asarray(next_actions, np.float32))
    r = torch.as_tensor(np.asarray(transitions.reward, np.float32))
    d = torch.as_tensor(np.asarray(transitions.done, np.float32))
    if not (a.shape == pa.shape == pa2.shape) or len(s) != len(a):
        raise MTLRecError(
            f"conservative_ope: actions {list(pa.shape)}, next_actions {list(pa2.shape)} and the "
            f"logged actions {list(a.shape)} must have the same shape"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        q = _mlp(s.shape[1] + a.shape[1], hidden, 1)
    target = copy.deepcopy(q)
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    rng = torch.Generator().manual_seed(seed + 1)
    n, b = len(s), min(batch_size, len(s))
    for step in range(1, steps + 1):
        rows = torch.randint(0, n, (b,), generator=rng)
        with torch.no_grad():
            y = r[rows] + gamma * (1 - d[rows]) * target(
                torch.cat([s2[rows], pa2[rows]], 1)
            ).squeeze(1)
        q_data = q(torch.cat([s[rows], a[rows]], 1)).squeeze(1)
        q_pi = q(torch.cat([s[rows], pa[rows]], 1)).squeeze(1)
        loss = (q_data - y).pow(2).mean() + alpha * (q_pi - q_data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            target.load_state_dict(q.state_dict())
    s0 = torch.as_tensor(np.asarray(initial, np.float32))
    a0 = torch.as_tensor(np.asarray(initial_actions, np.float32))
    with torch.no_grad():
        return float(q(torch.cat([s0, a0], 1)).mean())
