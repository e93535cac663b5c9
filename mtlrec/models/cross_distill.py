"""Cross-task knowledge distillation (CrossDistil): augmented ranking tasks teach their task.

Each task gets, next to its ordinary tower (the student), an auxiliary ranking head (the
teacher) trained to order the batch by this task's label first and the other tasks' labels
second. The teacher's scores are calibrated to probabilities and distilled into the student, so
the student learns how to rank items that share its own label, using what the other tasks know.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.experts import Experts, Gate, mix
from mtlrec.nn.mlp import MLP

BACKBONES = ("mmoe", "shared-bottom")
CORRECTIONS = ("clamp", "none")


def quadruplet_levels(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[B] rank level of each row for a task's augmented ranking task: 3 = positive on both
    tasks, 2 = positive on this task only, 1 = positive on the other task only, 0 = neither."""
    return 2 * (own > 0.5).long() + (other > 0.5).long()


def quadruplet_loss(
    scores: torch.Tensor,
    own: torch.Tensor,
    other: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The augmented ranking task's loss on one batch (CrossDistil's quadruplet loss).

    Rows are ordered (+,+) > (+,-) > (-,+) > (-,-) by (own label, other label). For every pair of
    consecutive levels present in the batch (hi above lo) the BPR term -ln sigma(r_i - r_j) is
    averaged over all pairs i in hi, j in lo; the loss is the sum of these terms (the quadruplet
    loss is the sum of its three consecutive pair terms). When a level is missing from the batch
    its neighbours become consecutive. ``mask`` [B] selects the rows the task is observed on.
    Returns a scalar, 0 when the batch has fewer than two levels.
    """
    levels = quadruplet_levels(own, other)
    onehot = (levels[:, None] == torch.arange(4, device=levels.device)).to(scores.dtype)
    if mask is not None:
        onehot = onehot * mask.to(scores.dtype)[:, None]
    counts = onehot.sum(0)
    present = [k for k in (3, 2, 1, 0) if counts[k] > 0]
    if len(present) < 2:
        return scores.sum() * 0.0
    # pair[i, j] = -ln sigma(r_i - r_j) = softplus(r_j - r_i); sums[h, l] = sum over i in h, j in l
    pair = F.softplus(scores[None, :] - scores[:, None])
    sums = onehot.T @ pair @ onehot
    terms = [sums[hi, lo] / (counts[hi] * counts[lo]) for hi, lo in zip(present, present[1:])]
    return torch.stack(terms).sum()


def correct_teacher(logit: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Error correction: a calibrated teacher logit on the wrong side of the decision boundary
    is clamped to it, so a positive's soft label is at least sigmoid(margin) and a negative's at
    most sigmoid(-margin). Within one label the teacher's order is kept; across labels it can no
    longer contradict the ground truth."""
    return torch.where(labels > 0.5, logit.clamp_min(margin), logit.clamp_max(-margin))


class PlattCalibrator(nn.Module):
    """Platt scaling r -> P r + Q of a ranking score into a probability logit, with P = exp(p)
    kept positive so calibration never reverses the teacher's order.

    ``speed``: p and Q are stored divided by it, so an optimiser whose steps are about ``lr`` in
    parameter units (Adam) moves them ``speed`` times faster than the network's weights; the
    two numbers must keep up with a teacher whose score scale drifts while it trains."""

    def __init__(self, speed: float = 1.0) -> None:
        super().__init__()
        self.speed = speed
        self.raw_log_scale = nn.Parameter(torch.zeros(()))
        self.raw_bias = nn.Parameter(torch.zeros(()))

    @property
    def scale(self) -> torch.Tensor:
        """P = exp(p) > 0."""
        return (self.raw_log_scale * self.speed).exp()

    @property
    def bias(self) -> torch.Tensor:
        """Q."""
        return self.raw_bias * self.speed

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores * self.scale + self.bias

    def loss(self, scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Log loss of the calibrated scores, with the scores detached: the upper level of the
        bi-level training moves only P and Q, the teacher below sees none of this gradient."""
        bce = F.binary_cross_entropy_with_logits(self(scores.detach()), labels, reduction="none")
        return (bce * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass
class CrossDistillConfig(ModelConfig):
    backbone: str = "mmoe"
    num_experts: int = 8
    expert_hidden: tuple[int, ...] = (16,)
    bottom_hidden: tuple[int, ...] = (64,)
    tower_hidden: tuple[int, ...] = (8,)
    rank_weight: float = 1.0
    distill_weight: float = 1.0
    warmup_steps: int = 100
    calibrate: bool = True
    calibrator_speed: float = 10.0
    correction: str = "clamp"
    correction_margin: float = 0.0


@register("cross-distill")
class CrossDistill(MTLModel):
    """CrossDistil: per-task ranking teachers, ordered by two tasks' labels, distilled into towers.

    Chenxiao Yang, Junwei Pan, Xiaofeng Gao, Tingyu Jiang, Dapeng Liu and Guihai Chen,
    "Cross-Task Knowledge Distillation in Multi-Task Recommendation", AAAI 2022
    (arXiv:2202.09852).

    Backbone: ``backbone: mmoe`` (default; shared experts, a gate per task) or ``shared-bottom``
    (one MLP, ``bottom_hidden``). On task t's representation h_t sit two heads: the student
    tower (``logits``, the prediction evaluated and served; BCE on its own label, as every
    model) and the teacher head r_t (the augmented ranking task).

    1. Task augmentation: for task t and each other task s the batch rows are ordered
       (+,+) > (+,-) > (-,+) > (-,-) by (y_t, y_s), and the teacher learns the order with the
       quadruplet loss: the sum over consecutive levels of the mean BPR term
       -ln sigma(r_i - r_j), i one level above j (:func:`quadruplet_loss`). So the teacher ranks
       by t's label first and uses s's label to order items that share t's label, without
       contradicting t (the task conflict of distilling s's prediction into t directly). The
       knowledge crosses tasks through s's labels in t's teacher; t's teacher teaches t.
    2. Calibrated distillation: ranking losses fix only differences of r, so a Platt calibrator
       per task maps r to a probability, q_t = sigmoid(P_t r_t + Q_t) (P_t = exp(p_t) > 0,
       :class:`PlattCalibrator`). It is trained bi-level: its log loss against y_t sees the
       teacher's scores detached, so P, Q follow the teacher and the teacher is trained by the
       ranking loss alone. The student then learns the calibrated soft label,
       L_KD = BCE(student logit, q_t) with q_t detached (``distill_weight``).
    3. Error correction for synchronous training: teacher and student are trained together, so
       early teacher outputs can contradict the labels; before distillation the calibrated logit
       is clamped to the label's side of the boundary (a positive's soft label >= 0.5, a
       negative's <= 0.5, :func:`correct_teacher`; ``correction: none`` turns this off,
       ``correction_margin`` moves the bound to sigmoid(+-margin)). Distillation starts only after
       ``warmup_steps`` training steps (counted in the buffer ``step``, saved with the model), so
       the student first learns from its labels while the teacher learns to rank.

    ``aux_loss`` = ``rank_weight`` x sum_t mean_s L_rank(t, s) + sum_t L_calib(t)
    + ``distill_weight`` x [step >= warmup] x sum_t L_KD(t); each over task t's observed rows (a
    ``depends_on`` task only where its upstream is positive; the other task's label is its raw
    column, i.e. the entire-space label). It is only computed when the batch has labels and
    gradients are on. ``extras``: ``teacher`` [B, T] calibrated teacher probabilities,
    ``rank_loss`` / ``calibration_loss`` / ``distill_loss`` (detached scalars), ``gates``
    [B, T, E] for the MMoE backbone.

    Ownership: task t's gate (MMoE), student tower, teacher head and calibrator are task t's;
    embeddings, experts / bottom are shared. Only t's BCE and ``aux_loss`` reach t's modules;
    the teacher head and the calibrator learn from ``aux_loss`` only.

    Departures: the paper's method section was not available to us (only its abstract,
    introduction and secondary summaries), so these forms are our reading: the consecutive-level
    BPR sum over in-batch pairs (instead of sampled quadruplets), the clamp form of the error
    correction, P kept positive, the calibrator fitted by gradient on the training batches
    (the paper's bi-level calibrator may use held-out data), its parameters moving
    ``calibrator_speed`` times faster than the network's so it keeps up with the teacher. With
    more than two tasks each teacher averages its quadruplet losses over the other tasks (the
    paper has two). ``warmup_steps``, the weights and the default MMoE backbone are ours.
    Binary tasks only. The augmented order assumes positively related tasks (like -> buy); for
    negatively related ones (Census: income vs never married) the teacher's within-label order
    works against the task.
    """

    Config = CrossDistillConfig

    def __init__(self, schema, layout, config: CrossDistillConfig) -> None:
        super().__init__(schema, layout, config)
        self._validate(config)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.embedding = self.make_embedding()
        in_dim = self.embedding.output_dim
        if config.backbone == "mmoe":
            self.experts = Experts(config.num_experts, in_dim, config.expert_hidden, config.dropout)
            dim = self.experts.output_dim
        else:
            self.bottom = MLP(in_dim, config.bottom_hidden, dropout=config.dropout)
            dim = self.bottom.output_dim
        for _ in schema.tasks:
            parts: dict[str, nn.Module] = {
                "tower": MLP(dim, config.tower_hidden, 1, dropout=config.dropout),
                "teacher": MLP(dim, config.tower_hidden, 1, dropout=config.dropout),
            }
            if config.backbone == "mmoe":
                parts["gate"] = Gate(in_dim, config.num_experts)
            if config.calibrate:
                parts["calibrator"] = PlattCalibrator(config.calibrator_speed)
            self.task_modules.append(nn.ModuleDict(parts))

    def _validate(self, config: CrossDistillConfig) -> None:
        if self.num_tasks < 2:
            raise ConfigError(
                f"model {self.name!r} needs at least two tasks to distil between; "
                f"the schema has {self.num_tasks}"
            )
        bad = [t.name for t in self.schema.tasks if t.type != "binary"]
        if bad:
            raise ConfigError(
                f"model {self.name!r} needs binary tasks (its ranking tasks order by labels); "
                f"{', '.join(bad)} is not"
            )
        if config.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone must be one of {', '.join(BACKBONES)}")
        if config.correction not in CORRECTIONS:
            raise ConfigError(f"model.correction must be one of {', '.join(CORRECTIONS)}")
        if config.backbone == "mmoe" and config.num_experts < 1:
            raise ConfigError("model.num_experts must be >= 1")
        if config.backbone == "shared-bottom" and not config.bottom_hidden:
            raise ConfigError("model.bottom_hidden must be non-empty")
        for key in ("rank_weight", "distill_weight", "correction_margin"):
            if getattr(config, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0")
        if config.warmup_steps < 0:
            raise ConfigError("model.warmup_steps must be >= 0")
        if config.calibrator_speed <= 0:
            raise ConfigError("model.calibrator_speed must be > 0")

    # --- forward ---------------------------------------------------------------------------------
    def _representations(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if self.config.backbone == "mmoe":
            expert_out = self.experts(x)
            gates = [m["gate"](x) for m in self.task_modules]
            return [mix(g, expert_out) for g in gates], torch.stack(gates, 1)
        h = self.bottom(x)
        return [h] * self.num_tasks, None

    def calibrated_logits(self, scores: torch.Tensor) -> torch.Tensor:
        """[B, T] teacher scores -> calibrated logits (identity without calibrators)."""
        if not self.config.calibrate:
            return scores
        cols = [m["calibrator"](scores[:, t]) for t, m in enumerate(self.task_modules)]
        return torch.stack(cols, 1)

    def distilling(self) -> bool:
        """Whether the warm-up is over (distillation is on for the next training step)."""
        return int(self.step) >= self.config.warmup_steps

    def forward(self, batch: TensorTable) -> ModelOutput:
        reps, gates = self._representations(self.embedding(batch))
        logits = torch.cat([m["tower"](h) for m, h in zip(self.task_modules, reps)], 1)
        scores = torch.cat([m["teacher"](h) for m, h in zip(self.task_modules, reps)], 1)
        calibrated = self.calibrated_logits(scores)
        out = ModelOutput(logits=logits, extras={"teacher": torch.sigmoid(calibrated).detach()})
        if gates is not None:
            out.extras["gates"] = gates
        on = self.distilling()
        if self.training and torch.is_grad_enabled():
            self.step += 1
        labels = batch.labels
        has_labels = labels.dim() == 2 and labels.shape[1] == self.num_tasks and len(labels) > 0
        if has_labels and torch.is_grad_enabled():
            out.aux_loss = self._aux_loss(out, scores, calibrated, labels, on)
        return out

    def _aux_loss(
        self,
        out: ModelOutput,
        scores: torch.Tensor,
        calibrated: torch.Tensor,
        labels: torch.Tensor,
        on: bool,
    ) -> torch.Tensor:
        cfg = self.config
        mask = self.observed_mask(labels)
        zero = scores.sum() * 0.0
        rank, calib, distill = zero, zero, zero
        for t in range(self.num_tasks):
            rank_t = [
                quadruplet_loss(scores[:, t], labels[:, t], labels[:, s], mask[:, t])
                for s in range(self.num_tasks)
                if s != t
            ]
            rank = rank + torch.stack(rank_t).mean()
            if cfg.calibrate:
                module = self.task_modules[t]["calibrator"]
                calib = calib + module.loss(scores[:, t], labels[:, t], mask[:, t])
        if on and cfg.distill_weight > 0:
            teacher = calibrated.detach()
            if cfg.correction == "clamp":
                teacher = correct_teacher(teacher, labels, cfg.correction_margin)
            kd = F.binary_cross_entropy_with_logits(
                out.logits, torch.sigmoid(teacher), reduction="none"
            )
            distill = ((kd * mask).sum(0) / mask.sum(0).clamp_min(1.0)).sum()
        out.extras["rank_loss"] = rank.detach()
        out.extras["calibration_loss"] = calib.detach()
        out.extras["distill_loss"] = distill.detach()
        return cfg.rank_weight * rank + calib + cfg.distill_weight * distill
