"""A semi-synthetic session simulator for multi-task fusion (MTF) policies, grounded in MovieLens.

Why a simulator: BatchRL-MTF (Zhang et al., "Multi-Task Fusion via Reinforcement Learning for
Long-Term User Satisfaction in Recommender Systems", KDD 2022) learns from logs in which the
fusion weights of every request were recorded, and is judged by online A/B tests. No public
dataset logs fusion weights, and none can be replayed under new weights, so every experiment here
is **semi-synthetic**: the users' responses come from a model, not from people.

The grounding (``movielens_world``): two MTL models trained by this library on
``movielens-100k`` (tasks ``like`` = rating >= 4 and ``rating``):

* the **world** model, trained on (nearly) all ratings, stands for the truth: for any user and
  movie it gives the probability of a like and the expected rating;
* the **ranker** model, trained on the chronological training split only, gives the predictions
  that the fusion sees, so the ranking is imperfect (as a deployed MTL model is).

The session MDP (the paper's Section 2, with what MovieLens allows):

* a session is a sequence of requests by one user. At each request ``K`` candidate movies are
  drawn uniformly from the catalogue minus the movies consumed earlier in the session;
* the **action** is the fusion weight vector ``alpha`` (one weight per task); candidates are
  ranked by the paper's Eq. (1), ``f(o) = sum_k alpha_k log(o_k + beta_k)`` over the ranker's
  predictions ``o`` (with ``beta = 0`` this orders candidates exactly like the library's
  ``weighted_product`` fusion, ``prod_k o_k ** alpha_k``, so a learned action is a request's
  ``weights`` override for ``mtlrec serve``);
* the user consumes the top-ranked movie and responds: a like drawn with the world model's
  probability, a rating drawn around its expected value (noise ``response_noise``, clipped to
  the task's range); the two draws share a Gaussian factor (``response_correlation``) so a liked
  movie tends to be rated higher;
* **stickiness**: the user leaves after each consumption with a probability that falls with
  satisfaction: ``logit(leave) = logit(leave_base) - leave_mood * mood - sum leave_weights *
  response + leave_fatigue * t - leave_activity * activity_u``, where ``mood`` is an exponential
  average of the normalised responses (``mood_weights``) and ``activity_u`` the user's
  standardised log number of ratings in the data; a session also ends after ``max_steps``;
* **reward** (the paper's Eq. (2), ``r = sum_i w_i v_i``): ``v`` = (1 for the consumed item:
  "play", the stickiness term; the like: the activeness term; the rating mapped to [-1, 1]: the
  graded satisfaction, in the role of the paper's play integrity), weights ``reward_weights``.

The **state** (the paper: user profile + interaction history of the last 500 videos): the user's
profile (age, gender, activity, mean rating and like rate in the data), the session so far (step,
mood, mean and last normalised response per task) and, a departure, a summary of the current
candidates' predictions (mean and max per task), since the best weights depend on them.

Departures from the paper, all forced by the data: semi-synthetic users (two MTL models plus the
leave and response rules above instead of real people; :func:`sharpen` makes the world's truth
more decisive than the fitted model, whose probabilities sit near the base rate); two tasks (the paper fuses 12
predictions); the like and the rating are the only behaviours (no play time, shares, comments or
skips), so play time becomes "one more item consumed" and play integrity the normalised rating;
the reward weights are set by hand, not by a regression on future dwell time; one item per
request; the candidate summary in the state.

Everything is vectorised across sessions (numpy arrays ``[sessions, ...]``); only the loop over
the steps of a session is Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlrec.errors import ConfigError, MTLRecError

#: A fusion policy: states ``[N, S]`` -> weights ``[N, T]`` (task units, task order of the world).
Policy = Callable[[np.ndarray], np.ndarray]
LOG_EPS = 1e-7  # as the library's weighted_product fusion clamps (mtlrec.serve.fusion)
PLAY = "play"  # the reward term for consuming an item (stickiness)


@dataclass
class SimWorld:
    """What the simulator knows of users and items.

    ``truth`` and ``ranker``: ``[U, M, T]`` per-task outputs of the world and ranker models for
    every simulated user and catalogue item (probabilities for binary tasks, values for
    regression tasks); ``profile``: ``[U, P]`` static user features; ``activity``: ``[U]`` the
    users' standardised activity (lower leave rate for active users)."""

    tasks: list[str]
    binary: list[bool]
    truth: np.ndarray
    ranker: np.ndarray
    profile: np.ndarray
    profile_names: list[str]
    activity: np.ndarray
    items: np.ndarray | None = None  # item ids (for reports only)
    users: np.ndarray | None = None

    def __post_init__(self) -> None:
        t = len(self.tasks)
        if len(set(self.tasks)) != t or t == 0:
            raise ConfigError(f"SimWorld.tasks: expected distinct task names, got {self.tasks}")
        if len(self.binary) != t:
            raise ConfigError(f"SimWorld.binary: {len(self.binary)} flags for {t} tasks")
        if self.truth.ndim != 3 or self.truth.shape[2] != t:
            raise ConfigError(
                f"SimWorld.truth: expected [users, items, {t}] (tasks {', '.join(self.tasks)}), "
                f"got shape {list(self.truth.shape)}"
            )
        if self.ranker.shape != self.truth.shape:
            raise ConfigError(
                f"SimWorld.ranker: shape {list(self.ranker.shape)} differs from truth's "
                f"{list(self.truth.shape)}"
            )
        users = self.truth.shape[0]
        if self.profile.ndim != 2 or self.profile.shape[0] != users:
            raise ConfigError(f"SimWorld.profile: expected [{users}, P], got {self.profile.shape}")
        if len(self.profile_names) != self.profile.shape[1]:
            raise ConfigError("SimWorld.profile_names: one name per profile column")
        if self.activity.shape != (users,):
            raise ConfigError(f"SimWorld.activity: expected [{users}], got {self.activity.shape}")
        for j, name in enumerate(self.tasks):
            if self.binary[j] and not ((self.truth[..., j] >= 0) & (self.truth[..., j] <= 1)).all():
                raise ConfigError(
                    f"SimWorld.truth: task {name!r} is binary; values must be in [0, 1]"
                )


@dataclass
class SimulatorConfig:
    """The simulated users' behaviour; every value is this module's choice (see its docstring)."""

    candidates: int = 20
    max_steps: int = 40
    response_noise: float = 0.5  # std of a regression response around the world's value
    response_correlation: float = 0.7  # shared Gaussian factor of the responses of one item
    value_range: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"rating": (1.0, 5.0)}
    )
    reward_weights: dict[str, float] = field(
        default_factory=lambda: {PLAY: 1.0, "like": 1.0, "rating": 1.0}
    )
    mood_weights: dict[str, float] = field(default_factory=lambda: {"rating": 1.0})
    mood_rate: float = 0.5
    leave_base: float = 0.15
    leave_mood: float = 4.0
    leave_weights: dict[str, float] = field(default_factory=lambda: {"like": 0.5})
    leave_fatigue: float = 0.05
    leave_activity: float = 0.5
    beta: dict[str, float] = field(default_factory=dict)  # fusion smoothing bias (Eq. 1)

    def check(self, world: SimWorld, num_items: int) -> None:
        """Every task name must be a world task; numbers in range. Errors name the key."""
        tasks = world.tasks
        named = {
            "reward_weights": set(self.reward_weights) - {PLAY},
            "mood_weights": set(self.mood_weights),
            "leave_weights": set(self.leave_weights),
            "beta": set(self.beta),
            "value_range": set(self.value_range),
        }
        for key, names in named.items():
            unknown = sorted(names - set(tasks))
            if unknown:
                extra = f" (or {PLAY!r})" if key == "reward_weights" else ""
                raise ConfigError(
                    f"SimulatorConfig.{key}: unknown task(s) {', '.join(map(repr, unknown))}; "
                    f"tasks are {', '.join(tasks)}{extra}"
                )
        for j, name in enumerate(tasks):
            if not world.binary[j]:
                lo, hi = self.value_range.get(name, (math.nan, math.nan))
                if not lo < hi:
                    raise ConfigError(
                        f"SimulatorConfig.value_range: regression task {name!r} needs a range "
                        "(lo, hi) with lo < hi, e.g. {'rating': (1, 5)}"
                    )
        if not 1 <= self.candidates <= num_items:
            raise ConfigError(
                f"SimulatorConfig.candidates: {self.candidates} is not in 1..{num_items} (items)"
            )
        if self.max_steps < 1:
            raise ConfigError("SimulatorConfig.max_steps must be >= 1")
        if not 0 < self.leave_base < 1:
            raise ConfigError("SimulatorConfig.leave_base must be in (0, 1)")
        if not 0 <= self.response_correlation <= 1:
            raise ConfigError("SimulatorConfig.response_correlation must be in [0, 1]")
        if not 0 <= self.mood_rate <= 1:
            raise ConfigError("SimulatorConfig.mood_rate must be in [0, 1]")


@dataclass
class Transitions:
    """Logged transitions ``(s, a, r, s', done)``; ``action`` holds fusion weights (task units)."""

    state: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_state: np.ndarray
    done: np.ndarray
    first: np.ndarray  # True on the first request of a session (initial states, for OPE)
    session: np.ndarray  # session index within its rollout

    def __len__(self) -> int:
        return len(self.reward)

    def subset(self, rows: np.ndarray) -> Transitions:
        return Transitions(
            **{k: getattr(self, k)[rows] for k in Transitions.__dataclass_fields__}  # type: ignore[arg-type]
        )

    @staticmethod
    def concat(parts: list[Transitions]) -> Transitions:
        return Transitions(
            **{
                k: np.concatenate([getattr(p, k) for p in parts])
                for k in Transitions.__dataclass_fields__
            }
        )


@dataclass
class Rollout:
    """Per-session outcomes of one rollout (arrays ``[sessions]``) and, if asked, the transitions."""

    returns: np.ndarray  # undiscounted session return
    discounted: np.ndarray  # discounted with the rollout's gamma
    lengths: np.ndarray  # items consumed
    positives: dict[str, np.ndarray]  # binary tasks: positive responses per session (likes)
    transitions: Transitions | None = None

    def summary(self) -> dict[str, float]:
        out = {
            "return_mean": float(self.returns.mean()),
            "return_std": float(self.returns.std(ddof=1)) if len(self.returns) > 1 else 0.0,
            "discounted_return_mean": float(self.discounted.mean()),
            "length_mean": float(self.lengths.mean()),
            "length_std": float(self.lengths.std(ddof=1)) if len(self.lengths) > 1 else 0.0,
            "sessions": len(self.returns),
        }
        for task, counts in self.positives.items():
            out[f"{task}_per_session"] = float(counts.mean())
            out[f"{task}_per_session_std"] = float(counts.std(ddof=1)) if len(counts) > 1 else 0.0
        return out


def fused_scores(
    predictions: np.ndarray, weights: np.ndarray, beta: np.ndarray | None = None
) -> np.ndarray:
    """The paper's Eq. (1), ``sum_k alpha_k log(o_k + beta_k)``: predictions ``[N, K, T]`` and
    weights ``[N, T]`` -> scores ``[N, K]``. Arguments of the log are clamped to ``1e-7`` like the
    library's ``weighted_product``, so with ``beta = 0`` the order is that fusion's."""
    if weights.ndim != 2 or weights.shape[1] != predictions.shape[2]:
        raise ConfigError(
            f"fusion weights: expected [sessions, {predictions.shape[2]}] (one weight per task), "
            f"got shape {list(weights.shape)}"
        )
    shifted = predictions if beta is None else predictions + beta
    return np.einsum("nkt,nt->nk", np.log(np.maximum(shifted, LOG_EPS)), weights)


class FusionSimulator:
    """Sessions of simulated users under a fusion policy (see the module docstring)."""

    def __init__(self, world: SimWorld, config: SimulatorConfig | None = None) -> None:
        self.world = world
        self.config = config or SimulatorConfig()
        self.config.check(world, world.truth.shape[1])
        self.tasks = list(world.tasks)
        cfg, t = self.config, len(self.tasks)
        self.binary = np.array(world.binary, dtype=bool)
        lo = np.array([cfg.value_range.get(n, (0.0, 1.0))[0] for n in self.tasks])
        hi = np.array([cfg.value_range.get(n, (0.0, 1.0))[1] for n in self.tasks])
        self.lo, self.hi = np.where(self.binary, 0.0, lo), np.where(self.binary, 1.0, hi)
        # normalised response: binary as 0/1, regression mapped from [lo, hi] to [-1, 1]
        self.center = np.where(self.binary, 0.0, (self.lo + self.hi) / 2)
        self.half = np.where(self.binary, 1.0, (self.hi - self.lo) / 2)
        self.beta = np.array([cfg.beta.get(n, 0.0) for n in self.tasks])
        self.w_play = cfg.reward_weights.get(PLAY, 0.0)
        self.w_reward = np.array([cfg.reward_weights.get(n, 0.0) for n in self.tasks])
        self.w_mood = np.array([cfg.mood_weights.get(n, 0.0) for n in self.tasks])
        self.w_leave = np.array([cfg.leave_weights.get(n, 0.0) for n in self.tasks])
        self.base_logit = math.log(cfg.leave_base / (1 - cfg.leave_base))
        session = ["step", "mood"]
        session += [f"mean_{n}" for n in self.tasks] + [f"last_{n}" for n in self.tasks]
        cands = [f"cand_mean_{n}" for n in self.tasks] + [f"cand_max_{n}" for n in self.tasks]
        self.state_names = list(world.profile_names) + session + cands
        self.num_tasks = t

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    # --- one rollout ---------------------------------------------------------------------------
    def rollout(
        self,
        policy: Policy,
        sessions: int,
        seed: int,
        record: bool = False,
        gamma: float = 0.95,
        users: np.ndarray | None = None,
    ) -> Rollout:
        """Run ``sessions`` sessions (users drawn uniformly, or ``users``) to their end under
        ``policy``; the same ``seed`` gives the same sessions. ``record``: keep the transitions."""
        if sessions < 1:
            raise ConfigError(f"sessions must be >= 1, got {sessions}")
        rng = np.random.default_rng(seed)
        cfg, world = self.config, self.world
        n_users, n_items, t = world.truth.shape
        user = rng.integers(0, n_users, sessions) if users is None else np.asarray(users)
        if user.shape != (sessions,) or user.min() < 0 or user.max() >= n_users:
            raise ConfigError(f"users: expected {sessions} indices in 0..{n_users - 1}")
        consumed = np.zeros((sessions, n_items), dtype=bool)
        mood = np.zeros(sessions)
        sums = np.zeros((sessions, t))
        last = np.zeros((sessions, t))
        returns = np.zeros(sessions)
        discounted = np.zeros(sessions)
        lengths = np.zeros(sessions, dtype=np.int64)
        positives = np.zeros((sessions, t))
        active = np.arange(sessions)
        cand = self._candidates(rng, consumed, active)
        state = self._state(user, active, 0, mood, sums, last, cand)
        logs: list[dict[str, np.ndarray]] = []
        for step in range(cfg.max_steps):
            weights = self._weights(policy(state))
            preds = world.ranker[user[active][:, None], cand]  # [A, K, T]
            pick = fused_scores(preds, weights, self.beta).argmax(axis=1)
            item = cand[np.arange(len(active)), pick]
            consumed[active, item] = True
            response = self._respond(rng, user[active], item)  # [A, T] raw
            norm = (response - self.center) / self.half
            reward = self.w_play + norm @ self.w_reward
            mood[active] = (1 - cfg.mood_rate) * mood[active] + cfg.mood_rate * (norm @ self.w_mood)
            logit = (
                self.base_logit
                - cfg.leave_mood * mood[active]
                - norm @ self.w_leave
                + cfg.leave_fatigue * step
                - cfg.leave_activity * world.activity[user[active]]
            )
            leave = rng.random(len(active)) < 1 / (1 + np.exp(-logit))
            done = leave | (step + 1 >= cfg.max_steps)
            sums[active] += norm
            last[active] = norm
            returns[active] += reward
            discounted[active] += gamma**step * reward
            lengths[active] += 1
            positives[active] += np.where(self.binary, response, 0.0)
            next_cand = self._candidates(rng, consumed, active)
            next_state = self._state(user, active, step + 1, mood, sums, last, next_cand)
            if record:
                logs.append(
                    {
                        "state": state,
                        "action": weights,
                        "reward": reward,
                        "next_state": next_state,
                        "done": done,
                        "first": np.full(len(active), step == 0),
                        "session": active,
                    }
                )
            keep = ~done
            active, cand, state = active[keep], next_cand[keep], next_state[keep]
            if len(active) == 0:
                break
        transitions = None
        if record:
            transitions = Transitions(
                **{k: np.concatenate([log[k] for log in logs]) for k in logs[0]}  # type: ignore[arg-type]
            )
        return Rollout(
            returns=returns,
            discounted=discounted,
            lengths=lengths,
            positives={n: positives[:, j] for j, n in enumerate(self.tasks) if self.binary[j]},
            transitions=transitions,
        )

    # --- pieces --------------------------------------------------------------------------------
    def _weights(self, weights: Any) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim == 1:
            w = w[None, :]
        if w.shape[-1] != self.num_tasks:
            raise ConfigError(
                f"policy returned {w.shape[-1]} weight(s) per request; the simulator has "
                f"{self.num_tasks} task(s): {', '.join(self.tasks)}"
            )
        if not np.isfinite(w).all():
            raise MTLRecError("policy returned a weight that is NaN or infinite")
        return w

    def _candidates(self, rng: np.random.Generator, consumed: np.ndarray, active: np.ndarray):
        """``K`` items per active session, uniformly among those not consumed in the session."""
        k = self.config.candidates
        keys = rng.random((len(active), consumed.shape[1]))
        keys[consumed[active]] = 2.0  # consumed items sort last
        return np.argpartition(keys, k - 1, axis=1)[:, :k]

    def _respond(self, rng: np.random.Generator, user: np.ndarray, item: np.ndarray) -> np.ndarray:
        """Responses ``[A, T]``: Bernoulli(p) for binary tasks, value + noise (clipped) for
        regression tasks, all sharing one Gaussian factor per consumption."""
        cfg = self.config
        truth = self.world.truth[user, item]  # [A, T]
        shared = rng.standard_normal((len(user), 1))
        own = rng.standard_normal(truth.shape)
        rho = cfg.response_correlation
        latent = rho * shared + math.sqrt(1 - rho * rho) * own  # N(0, 1) per task
        p = np.clip(truth, 1e-6, 1 - 1e-6)
        threshold = torch.special.ndtri(torch.from_numpy(1 - p)).numpy()
        binary = (latent > threshold).astype(np.float64)
        value = np.clip(truth + cfg.response_noise * latent, self.lo, self.hi)
        return np.where(self.binary, binary, value)

    def _state(self, user, active, step, mood, sums, last, cand) -> np.ndarray:
        """State rows of the active sessions (see ``state_names``)."""
        world = self.world
        u = user[active]
        preds = (world.ranker[u[:, None], cand] - self.center) / self.half  # [A, K, T]
        steps = max(step, 1)
        parts = [
            world.profile[u],
            np.full((len(active), 1), step / self.config.max_steps),
            mood[active][:, None],
            sums[active] / steps,
            last[active],
            preds.mean(axis=1),
            preds.max(axis=1),
        ]
        return np.concatenate(parts, axis=1).astype(np.float32)


# --- fixed and exploring policies -------------------------------------------------------------
def fixed_policy(weights: np.ndarray | list[float]) -> Policy:
    """The same weights for every request (the grid-search baseline family)."""
    w = np.asarray(weights, dtype=np.float64)
    return lambda state: np.broadcast_to(w, (len(state), len(w)))


def exploration_policy(
    base: Policy,
    low: np.ndarray,
    high: np.ndarray,
    seed: int,
    noise: float = 0.1,
    random_share: float = 0.5,
    random_std: float = 1.0,
) -> Policy:
    """The paper's Mixed Multi-Exploration (Section 3.3) as a logging policy. Actions are drawn
    in the normalised action space ``[-1, 1]`` (the box ``[low, high]`` per task):
    a ``random_share`` of the requests get *random exploration* (Gaussian around the box centre,
    std ``random_std``), the others *action-noise exploration*: ``base``'s action plus Gaussian
    noise of std ``noise`` (the paper: N(0, 0.1)); both clipped to the box.

    Departure: the paper splits *users* between the two; here each request draws its kind, so
    one session mixes both (the logged transitions are what BCQ sees either way)."""
    rng = np.random.default_rng(seed)
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    half, mid = (high - low) / 2, (high + low) / 2

    def act(state: np.ndarray) -> np.ndarray:
        n = len(state)
        base_norm = (np.asarray(base(state), np.float64) - mid) / half
        noisy = base_norm + noise * rng.standard_normal(base_norm.shape)
        rand = random_std * rng.standard_normal(base_norm.shape)
        pick = rng.random((n, 1)) < random_share
        return mid + half * np.clip(np.where(pick, rand, noisy), -1, 1)

    return act


# --- the MovieLens grounding ------------------------------------------------------------------
def sharpen(world: SimWorld, like: float = 2.0, rating: float = 1.5) -> SimWorld:
    """A copy of ``world`` whose truth is more decisive than the fitted world model: binary
    tasks' logits times ``like``, regression values' deviations from the user's mean times
    ``rating`` (clipped to the observed range). The fitted model's probabilities sit near the base
    rate, which makes every response mostly noise; the ranker's predictions are left as they are.
    A departure of the simulator, stated in the benchmark."""
    truth = world.truth.copy()
    for j, binary in enumerate(world.binary):
        col = truth[..., j]
        if binary:
            p = np.clip(col, 1e-6, 1 - 1e-6)
            truth[..., j] = 1 / (1 + np.exp(-like * np.log(p / (1 - p))))
        else:
            mean = col.mean(axis=1, keepdims=True)
            truth[..., j] = np.clip(mean + rating * (col - mean), col.min(), col.max())
    return SimWorld(**{**world.__dict__, "truth": truth})


PROFILE_NAMES = ["age", "gender_m", "activity", "user_mean_rating", "user_like_rate"]


def movielens_world(
    world_run: str | Path,
    ranker_run: str | Path,
    users: int = 400,
    min_user_ratings: int = 20,
    min_item_ratings: int = 10,
    seed: int = 0,
    batch_size: int = 16384,
) -> SimWorld:
    """A :class:`SimWorld` from two finished ``movielens-100k`` runs (``world_run``: trained on
    nearly all ratings; ``ranker_run``: on the training split). ``users`` users with at least
    ``min_user_ratings`` ratings are drawn (``seed``); the catalogue is the movies with at least
    ``min_item_ratings`` ratings. Every user x movie pair is scored by both models with the
    user's profile and latest liked / other histories (as a deployed model would see them)."""
    import pandas as pd

    from mtlrec.data.datasets import load_dataset
    from mtlrec.train.predict_file import predict_frame
    from mtlrec.train.run import load_run

    _, world_enc, world_model = load_run(world_run)
    _, ranker_enc, ranker_model = load_run(ranker_run)
    tasks = [t.name for t in world_enc.schema.tasks]
    if [t.name for t in ranker_enc.schema.tasks] != tasks:
        raise ConfigError(f"{ranker_run}: its tasks differ from the world run's ({tasks})")
    splits = load_dataset("movielens-100k")
    frame = pd.concat([splits.train, splits.valid, splits.test], ignore_index=True)
    frame = frame.sort_values("timestamp", kind="stable")
    counts = frame.groupby("user")["rating"].agg(["count", "mean"])
    counts["like"] = frame.groupby("user")["like"].mean()
    eligible = counts.index[counts["count"] >= min_user_ratings].to_numpy()
    if len(eligible) == 0:
        raise ConfigError(f"no user has {min_user_ratings} ratings")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=min(users, len(eligible)), replace=False))
    item_counts = frame["movie"].value_counts()
    items = np.sort(item_counts.index[item_counts >= min_item_ratings].to_numpy())
    if len(items) == 0:
        raise ConfigError(f"no movie has {min_item_ratings} ratings")
    user_cols = ["user", "age", "gender", "occupation", "zip_region"]
    user_cols += [c for c in ("liked_history", "other_history", "history") if c in frame]
    user_rows = frame.groupby("user").tail(1).set_index("user").loc[chosen].reset_index()
    item_rows = frame.groupby("movie").tail(1).set_index("movie").loc[items].reset_index()
    pairs = user_rows[user_cols].merge(item_rows[["movie", "year", "genres"]], how="cross")

    def scores(encoder, model) -> np.ndarray:
        out = predict_frame(model, encoder, pairs, batch_size=batch_size)
        cols = [f"pred_{t}" for t in tasks]
        return out[cols].to_numpy(np.float64).reshape(len(chosen), len(items), len(tasks))

    stats = counts.loc[chosen]
    log_count = np.log(stats["count"].to_numpy(np.float64))
    activity = (log_count - log_count.mean()) / max(log_count.std(), 1e-9)
    age = user_rows["age"].to_numpy(np.float64)
    profile = np.stack(
        [
            (age - age.mean()) / max(age.std(), 1e-9),
            (user_rows["gender"].to_numpy() == "M").astype(np.float64),
            activity,
            (stats["mean"].to_numpy(np.float64) - 3) / 2,
            stats["like"].to_numpy(np.float64),
        ],
        axis=1,
    )
    binary = [t.type == "binary" for t in world_enc.schema.tasks]
    return SimWorld(
        tasks=tasks,
        binary=binary,
        truth=scores(world_enc, world_model),
        ranker=scores(ranker_enc, ranker_model),
        profile=profile,
        profile_names=list(PROFILE_NAMES),
        activity=activity,
        items=np.asarray(items).astype(str),
        users=np.asarray(chosen).astype(str),
    )
