"""Task- and prior-aware personalisation of a shared network: PEPNet."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel
from mtlrec.models.registry import register
from mtlrec.schema import Schema

GATE_SCALE = 2.0  # gamma of the Gate NU: gates lie in (0, 2), 1 at a neutral start


class GateNU(nn.Module):
    """PEPNet's Gate Neural Unit: delta = gamma * sigmoid(W2 ReLU(W1 x + b1) + b2), gamma = 2
    (Eq. 1-2); with gamma = 2 a gate can amplify (up to 2x) as well as damp its input."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GATE_SCALE * torch.sigmoid(self.out(torch.relu(self.hidden(x))))


@dataclass
class PEPNetConfig(ModelConfig):
    hidden: tuple[int, ...] = (64, 32)
    gate_hidden: int = 64
    domain_features: str = ""
    prior_features: str = ""


def field_positions(schema: Schema, names: str, option: str) -> list[int]:
    """Positions in ``InputEmbedding.fields`` of comma-separated feature names; empty = every
    categorical feature (or every embedded one when there is no categorical feature)."""
    embedded = [f.name for f in schema.embedded_fields()]
    if not names.strip():
        cats = {f.name for f in schema.features_of("categorical")}
        chosen = [n for n in embedded if n in cats] or embedded
        return [embedded.index(n) for n in chosen]
    out = []
    for name in (n.strip() for n in names.split(",")):
        if name not in embedded:
            raise ConfigError(
                f"model.{option}: {name!r} is not an embedded feature (categorical, bucketised "
                f"numeric or sequence); choose from: {', '.join(embedded)}"
            )
        out.append(embedded.index(name))
    return out


@register("pepnet")
class PEPNet(MTLModel):
    """PEPNet: a prior-conditioned gate on the embeddings (EPNet) and per-task gates on every
    layer of each task tower (PPNet).

    Chang et al., "PEPNet: Parameter and Embedding Personalized Network for Infusing with
    Personalized Prior Information", KDD 2023 (Kuaishou). Gate NU (Eq. 1-2):
    delta = 2 sigmoid(W2 ReLU(W1 x + b1) + b2), so every gate lies in (0, 2). EPNet (Eq. 3-4):
    delta_domain = U_ep(E(F_d) ⊕ sg(E)), O_ep = delta_domain ⊗ E, where F_d are the domain-side
    features (``domain_features``), E the general embedding (all fields) taken with stop-gradient
    sg, and the gate scales each field's embedding (and each numeric column). PPNet (Eq. 5-7):
    for task k and layer l, delta^l_k = U^l_k(E(F_p) ⊕ sg(O_ep)) with prior features F_p
    (``prior_features``: user / item / author ids in the paper), and H^{l+1}_k =
    f((delta^l_k ⊗ H^l_k) W^l_k + b^l_k), H^0_k = O_ep; every layer of a task tower, the output
    layer included, has its input gated. Gates are returned in ``extras``: ``epnet_gate``
    [B, F + N] and ``ppnet_gate_l`` [B, T, d_l].

    Options name the prior features as comma-separated feature names; empty (default) = every
    categorical feature. The paper's domain features identify the scenario (domain id and its
    statistics); with a single-domain dataset the default conditions the embedding gate on the
    categorical fields themselves.

    Ownership: the EPNet gate and the embedding are shared; task k's tower and its PPNet gates
    are its own. Departures: the paper's PPNet has one Gate NU per layer whose output is split
    across tasks; here each task has its own Gate NU per layer (same input), so its gates belong
    to it alone; EPNet scales per field (not per embedding dimension); no multi-domain
    training.
    """

    Config = PEPNetConfig

    def __init__(self, schema, layout, config: PEPNetConfig) -> None:
        super().__init__(schema, layout, config)
        if not config.hidden or config.gate_hidden < 1:
            raise ConfigError("model.hidden must be non-empty and model.gate_hidden >= 1")
        self.domain = field_positions(schema, config.domain_features, "domain_features")
        self.prior = field_positions(schema, config.prior_features, "prior_features")
        self.embedding = self.make_embedding()
        emb, units = config.embed_dim, layout.num_fields + layout.num_numeric
        self.num_fields = layout.num_fields
        general = self.embedding.output_dim
        self.epnet = GateNU(len(self.domain) * emb + general, config.gate_hidden, units)
        prior_dim = len(self.prior) * emb + general
        widths = [general, *config.hidden]
        for _ in schema.tasks:
            self.task_modules.append(
                nn.ModuleDict(
                    {
                        "gates": nn.ModuleList(
                            GateNU(prior_dim, config.gate_hidden, w) for w in widths
                        ),
                        "layers": nn.ModuleList(
                            nn.Linear(w, nxt) for w, nxt in zip(widths, [*config.hidden, 1])
                        ),
                    }
                )
            )
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def forward(self, batch: TensorTable) -> ModelOutput:
        fields, num = self.embedding.fields(batch), batch.num
        general = torch.cat([fields.flatten(1), num], 1)  # E, with gradient
        domain = fields[:, self.domain].flatten(1)
        delta = self.epnet(torch.cat([domain, general.detach()], 1))  # [B, F + N]
        f = self.num_fields
        o_ep = torch.cat([(fields * delta[:, :f, None]).flatten(1), num * delta[:, f:]], 1)
        gate_in = torch.cat([fields[:, self.prior].flatten(1), o_ep.detach()], 1)
        logits, gates = [], [[] for _ in range(len(self.config.hidden) + 1)]
        for module in self.task_modules:
            h = o_ep
            last = len(module["layers"]) - 1
            for i, (gate, layer) in enumerate(zip(module["gates"], module["layers"])):
                g = gate(gate_in)
                gates[i].append(g)
                h = layer(h * g)
                if i < last:
                    h = torch.relu(h)
                    if self.dropout is not None:
                        h = self.dropout(h)
            logits.append(h)
        extras = {"epnet_gate": delta}
        extras.update({f"ppnet_gate_{i}": torch.stack(g, 1) for i, g in enumerate(gates)})
        return ModelOutput(logits=torch.cat(logits, 1), extras=extras)
