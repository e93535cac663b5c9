"""Reinforcement learning for multi-task fusion: BatchRL-MTF and a semi-synthetic simulator.

BatchRL-MTF (Zhang et al., "Multi-Task Fusion via Reinforcement Learning for Long-Term User
Satisfaction in Recommender Systems", KDD 2022) picks the fusion weights of every request from the
user's state with a policy learned offline by BCQ (Fujimoto et al., ICML 2019) from logged
sessions. It is the layer after an MTL ranking model: the model predicts every task for the
candidates, the policy chooses the weights, the fused score ranks the candidates.

* :mod:`mtlrec.rl.batch_mtf`: the agent (:class:`BatchRLMTF`), its clipped double-Q target and
  the Conservative-OPEstimator;
* :mod:`mtlrec.rl.simulator`: semi-synthetic sessions on MovieLens-100K (no public dataset logs
  fusion weights), fixed and exploring logging policies.
"""

from mtlrec.rl.batch_mtf import (
    BatchRLConfig,
    BatchRLMTF,
    clipped_double_q_target,
    conservative_ope,
)
from mtlrec.rl.simulator import (
    FusionSimulator,
    Rollout,
    SimulatorConfig,
    SimWorld,
    Transitions,
    exploration_policy,
    fixed_policy,
    fused_scores,
    movielens_world,
    sharpen,
)

__all__ = [
    "BatchRLConfig",
    "BatchRLMTF",
    "FusionSimulator",
    "Rollout",
    "SimWorld",
    "SimulatorConfig",
    "Transitions",
    "clipped_double_q_target",
    "conservative_ope",
    "exploration_policy",
    "fixed_policy",
    "fused_scores",
    "sharpen",
    "movielens_world",
]
