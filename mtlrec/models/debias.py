"""Causal (counterfactual) CVR estimators trained jointly with the click model: Multi-IPW,
Multi-DR and ESCM².

The problem they address: a conversion label is observed only where the upstream step happened
(click), and clicks are not a random sample of impressions, so a CVR model fitted on clicked rows
alone is biased over the entire space. These models reweight the clicked rows by the inverse of
the jointly estimated click propensity (IPW), optionally adding an imputed error for every
impression (doubly robust, DR), so that the CVR loss becomes an (approximately) unbiased estimate
of the loss over all impressions.

Generalised to schemas: every task with ``depends_on`` is a "conversion" whose observation
indicator is its upstream label and whose propensity is the upstream task's predicted
entire-space probability (pCTR for a click -> purchase pair; pCTR x pCart|click for a task that
depends on cart). Tasks without ``depends_on`` get plain BCE over all rows.

Shared pieces, written once and tested on hand examples: :func:`inverse_propensity`,
:func:`ipw_risk`, :func:`dr_risk`, :func:`imputation_loss`. Every average is over the whole batch
(the entire space D), as in the estimators' definitions: ``(1/|D|) sum_D o e / p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import PROB_EPS, ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.nn.mlp import MLP

IMPUTATION_MODES = ("label", "error")


def inverse_propensity(propensity: torch.Tensor, min_propensity: float) -> torch.Tensor:
    """1 / clip(p, min_propensity, 1): the IPW weight. Clipping bounds the weight (and so the
    variance) at 1 / min_propensity, at the price of a small bias for very unlikely clicks."""
    return 1.0 / propensity.clamp(min=min_propensity, max=1.0)


def ipw_risk(
    errors: torch.Tensor, observed: torch.Tensor, propensity: torch.Tensor, min_propensity: float
) -> torch.Tensor:
    """IPW estimate of the mean error over all rows (Multi-IPW's E^IPW; ESCM²'s IPS risk):
    ``mean_D(o * e / p)``, column-wise for [B, T] inputs."""
    return (observed * errors * inverse_propensity(propensity, min_propensity)).mean(0)


def dr_risk(
    errors: torch.Tensor,
    imputed: torch.Tensor,
    observed: torch.Tensor,
    propensity: torch.Tensor,
    min_propensity: float,
) -> torch.Tensor:
    """Doubly robust estimate ``mean_D(e_hat + o * (e - e_hat) / p)``: the imputed error on every
    row, corrected by the IPW-weighted residual where the label is observed. With
    ``e_hat = 0`` it is exactly :func:`ipw_risk`."""
    w = inverse_propensity(propensity, min_propensity)
    return (imputed + observed * (errors - imputed) * w).mean(0)


def imputation_loss(
    errors: torch.Tensor,
    imputed: torch.Tensor,
    observed: torch.Tensor,
    propensity: torch.Tensor,
    min_propensity: float,
) -> torch.Tensor:
    """The imputation model's own loss, ``mean_D(o * (e - e_hat)^2 / p)`` (DR joint learning,
    Wang et al., ICML 2019, used by Multi-DR and ESCM²-DR)."""
    w = inverse_propensity(propensity, min_propensity)
    return (observed * (errors - imputed).pow(2) * w).mean(0)


@dataclass
class CausalConfig(ModelConfig):
    tower_hidden: tuple[int, ...] = (64, 32)
    min_propensity: float = 0.01
    detach_propensity: bool = True


class _CausalCVR(MTLModel):
    """Shared embedding, one tower per task (the CTR tower is the propensity model), and for DR an
    imputation tower per dependent task. Subclasses choose the estimator in ``task_losses``."""

    Config = CausalConfig
    uses_imputation = False

    def __init__(self, schema, layout, config: CausalConfig) -> None:
        super().__init__(schema, layout, config)
        self.require_binary_chain()
        if not 0.0 < config.min_propensity <= 1.0:
            raise ConfigError("model.min_propensity must be in (0, 1]")
        mode = getattr(config, "imputation", "label")
        if mode not in IMPUTATION_MODES:
            raise ConfigError(
                f"model.imputation: {mode!r} is not one of {', '.join(IMPUTATION_MODES)}"
            )
        self.embedding = self.make_embedding()
        dim = self.embedding.output_dim
        upstream = self.upstream.tolist()
        for t in range(self.num_tasks):
            parts = {"tower": MLP(dim, config.tower_hidden, 1, dropout=config.dropout)}
            if self.uses_imputation and upstream[t] >= 0:
                parts["imputation"] = MLP(dim, config.tower_hidden, 1, dropout=config.dropout)
            self.task_modules.append(nn.ModuleDict(parts))

    def forward(self, batch: TensorTable) -> ModelOutput:
        x = self.embedding(batch)
        logits = torch.cat([m["tower"](x) for m in self.task_modules], 1)
        extras = {}
        if self.uses_imputation:
            raw = [
                m["imputation"](x) if "imputation" in m else torch.zeros_like(logits[:, :1])
                for m in self.task_modules
            ]
            # "label": the imputed conversion probability; "error": the imputed error (>= 0).
            act = torch.sigmoid if self.config.imputation == "label" else F.softplus
            extras["imputation"] = act(torch.cat(raw, 1))
        return ModelOutput(logits=logits, extras=extras)

    # --- the pieces of the counterfactual losses ------------------------------------------------
    def propensity(self, out: ModelOutput) -> torch.Tensor:
        """[B, T] P(observed) of each task = its upstream task's entire-space probability."""
        joint = self.chain_joint(torch.sigmoid(out.logits))
        p = joint[:, self.upstream.clamp_min(0)]
        return p.detach() if self.config.detach_propensity else p

    def counterfactual_terms(
        self, out: ModelOutput, batch: TensorTable
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([T] counterfactual risk, [T] imputation loss) of every task; zero for root tasks.

        IPW when the model has no imputation tower, DR otherwise. In DR the two parts train
        different towers, as in DR joint learning: the risk holds the imputation fixed, the
        imputation loss holds the CVR prediction fixed.
        """
        labels = batch.labels
        observed = self.observed_mask(labels)
        errors = F.binary_cross_entropy_with_logits(out.logits, labels, reduction="none")
        prop = self.propensity(out)
        min_p = self.config.min_propensity
        dependent = (self.upstream >= 0).to(errors.dtype)
        if not self.uses_imputation:
            risk = ipw_risk(errors, observed, prop, min_p)
            return risk * dependent, torch.zeros_like(risk)
        imp = out.extras["imputation"]
        if self.config.imputation == "label":
            # e_hat = CE(pCVR, r_tilde): depends on the prediction, so unclicked rows train the
            # CVR tower towards the imputed labels (DR-JL's form).
            e_hat = F.binary_cross_entropy_with_logits(out.logits, imp.detach(), reduction="none")
            # The same error with the prediction fixed, as a function of r_tilde (linear in it).
            p = torch.sigmoid(out.logits.detach().float()).clamp(PROB_EPS, 1 - PROB_EPS)
            e_hat_imp = -(imp * torch.log(p) + (1 - imp) * torch.log1p(-p))
        else:
            e_hat, e_hat_imp = imp.detach(), imp
        risk = dr_risk(errors, e_hat, observed, prop, min_p)
        imp_loss = imputation_loss(errors.detach(), e_hat_imp, observed, prop.detach(), min_p)
        return risk * dependent, imp_loss * dependent

    def root_losses(self, out: ModelOutput, batch: TensorTable) -> torch.Tensor:
        """[T] BCE over all rows (used for tasks without ``depends_on``)."""
        bce = F.binary_cross_entropy_with_logits(out.logits, batch.labels, reduction="none")
        return bce.mean(0)

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """Each tower serves its own task, unless the propensity is not detached: then the CVR
        loss reaches the upstream towers too, and those are shared."""
        if self.config.detach_propensity:
            return [list(m.parameters()) for m in self.task_modules]
        return self.leaf_task_parameters()


@register("multi-ipw")
class MultiIPW(_CausalCVR):
    """Multi-IPW: CVR loss on clicked rows weighted by 1/pCTR from the jointly trained CTR tower.

    Zhang et al., "Large-scale Causal Approaches to Debiasing Post-click Conversion Rate
    Estimation with Multi-task Learning", WWW 2020. Shared embedding with a CTR and a
    CVR tower; loss = BCE(pCTR, click) over all impressions + E^IPW, where
    E^IPW = (1/|D|) sum_D o * BCE(pCVR, y) / pCTR (the click indicator o selects clicked rows).
    Propensities are clipped at ``min_propensity`` (default 0.01, i.e. weights <= 100) and, like
    the paper, treated as fixed in the CVR loss (``detach_propensity: true``): the CTR tower is
    trained by the CTR loss only. Set it to false to let the CVR loss move the CTR tower.
    Departure: the towers are plain MLPs on the shared embedding (as in ESMM), not the paper's
    production network; tasks other than a click -> conversion pair are handled as described in
    the module docstring.
    """

    def task_losses(self, out: ModelOutput, batch: TensorTable) -> torch.Tensor:
        risk, _ = self.counterfactual_terms(out, batch)
        return torch.where(self.upstream >= 0, risk, self.root_losses(out, batch))


@dataclass
class MultiDRConfig(CausalConfig):
    imputation: str = "label"


@register("multi-dr")
class MultiDR(_CausalCVR):
    """Multi-DR: Multi-IPW plus an imputation tower; a doubly robust CVR loss over all impressions.

    Zhang et al., "Large-scale Causal Approaches to Debiasing Post-click Conversion Rate
    Estimation with Multi-task Learning", WWW 2020. Loss = BCE(pCTR, click) +
    E^DR + imputation loss, with E^DR = (1/|D|) sum_D [e_hat + o (e - e_hat) / pCTR] and the
    imputation tower fitted by (1/|D|) sum_D o (e - e_hat)^2 / pCTR (joint learning: the risk holds
    the imputation fixed, the imputation loss holds the CVR prediction fixed). Propensities:
    clipped at ``min_propensity`` and detached, as in Multi-IPW.
    ``imputation: label`` (default) predicts a conversion probability r~ and imputes
    e_hat = BCE(pCVR, r~), the form of the public DR joint-learning code: the imputed error then
    depends on the CVR prediction, so unclicked impressions train the CVR tower.
    ``imputation: error`` predicts e_hat >= 0 directly (softplus), the paper's notation read
    literally; with a feature-only e_hat the CVR tower's gradient from E^DR equals IPW's and DR
    changes only the loss value and the shared embedding (via the imputation task). Departure:
    MLP towers on a shared embedding, as in :class:`MultiIPW`.
    """

    Config = MultiDRConfig
    uses_imputation = True

    def task_losses(self, out: ModelOutput, batch: TensorTable) -> torch.Tensor:
        risk, imp = self.counterfactual_terms(out, batch)
        return torch.where(self.upstream >= 0, risk + imp, self.root_losses(out, batch))


@dataclass
class ESCM2Config(CausalConfig):
    variant: str = "ips"
    imputation: str = "label"
    counterfactual_weight: float = 0.5
    global_weight: float = 0.5


@register("escm2")
class ESCM2(_CausalCVR):
    """ESCM²: ESMM's entire-space CTR and CTCVR losses plus a counterfactual CVR regulariser.

    Wang et al., "ESCM²: Entire Space Counterfactual Multi-Task Model for Post-Click Conversion
    Rate Estimation", SIGIR 2022. Loss = L_CTR + lambda_c * R_CVR + lambda_g * L_CTCVR, where
    L_CTR = BCE(pCTR, click) and L_CTCVR = BCE(pCTR * pCVR, click & conversion) over all
    impressions (the "empirical" and "global" risks) and R_CVR is the counterfactual risk:
    ``variant: ips`` -> (1/|D|) sum_D o e / pCTR; ``variant: dr`` -> the doubly robust risk plus the
    imputation tower's loss (see :class:`MultiDR`; ``imputation`` chooses its form).
    Defaults lambda_c = lambda_g = 0.5 (``counterfactual_weight``, ``global_weight``) are those of
    the authors' public PaddleRec implementation (models/multitask/escm2, config_bigdata.yaml); the
    paper treats both as tuned hyper-parameters (that config runs the DR variant; ours defaults to
    ``ips``). Propensities clipped at ``min_propensity`` and detached. Departures from PaddleRec's
    code: its IPS weight is 1 / (pCTR x n_clicks^2) with n_clicks the batch's click count, clipped
    at 15, where ours is 1 / pCTR clipped at 1 / ``min_propensity`` (0.01 suits CTRs of a few
    percent); its DR imputes the error itself (our ``imputation: error``, default ``label``) and
    detaches nothing (``detach_propensity: false`` covers the propensity part only). Regulariser and CTCVR loss both belong to the
    conversion task, so balancers see L_CTR and lambda_g L_CTCVR + lambda_c R_CVR as its two losses.
    """

    Config = ESCM2Config

    def __init__(self, schema, layout, config: ESCM2Config) -> None:
        if config.variant not in ("ips", "dr"):
            raise ConfigError(f"model.variant: {config.variant!r} is not 'ips' or 'dr'")
        self.uses_imputation = config.variant == "dr"
        super().__init__(schema, layout, config)

    def task_losses(self, out: ModelOutput, batch: TensorTable) -> torch.Tensor:
        cfg = self.config
        risk, imp = self.counterfactual_terms(out, batch)
        joint = self.chain_joint(torch.sigmoid(out.logits))
        global_risk = self.entire_space_losses(joint, out, batch)
        dependent = cfg.global_weight * global_risk + cfg.counterfactual_weight * (risk + imp)
        return torch.where(self.upstream >= 0, dependent, global_risk)

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """The CTCVR loss reaches every upstream tower (as in ESMM), so those are shared."""
        return self.leaf_task_parameters()
