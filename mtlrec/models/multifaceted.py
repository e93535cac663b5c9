"""Multifaceted behaviour sequences read by target attention: DMT.

One Transformer per behaviour sequence (click, cart, order histories...) turns the history into an
interest vector conditioned on the candidate item; the interests join the ordinary features at the
input of a Multi-gate Mixture-of-Experts, and a training-only bias network absorbs the position
(selection) bias of the logged impressions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtlrec.data.table import TensorTable
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelConfig, ModelOutput, MTLModel, checked_option_names
from mtlrec.models.registry import register
from mtlrec.nn.experts import Experts, Gate, experts_and_gates, mix
from mtlrec.nn.mlp import MLP
from mtlrec.schema import Feature, Schema

_ITEM_WORDS = ("item",)


@dataclass
class DMTConfig(ModelConfig):
    """Defaults from the paper's released configuration (``dmt.conf``) where they carry over:
    4 heads, one encoder and one decoder block, d_ff = 4 x d_model, 4 experts of
    512-256-128, towers of 32, a bias network of 32-16, dropout 0.1 (its Transformer rate)."""

    embed_dim: int = 32  # the paper's item-id embedding width
    dropout: float = 0.1
    target_field: str = ""
    sequence_fields: str = ""
    bias_features: str = ""
    num_heads: int = 4
    num_layers: int = 1
    decoder_layers: int = 1
    ffn_hidden: int = 0  # 0: 4 x embed_dim
    num_experts: int = 4
    expert_hidden: tuple[int, ...] = (512, 256, 128)
    tower_hidden: tuple[int, ...] = (32,)
    bias_hidden: tuple[int, ...] = (32, 16)


class _MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``h`` heads with Q, K, V and output projections.

    ``valid`` [B, Lk] marks real keys. A row with no key at all (an empty history) would make
    the softmax 0/0; it attends over its padding instead (finite) and its output is then set to
    zero, so the residual around this layer passes the query through unchanged."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, valid: torch.Tensor):
        batch, lq, dim = query.shape
        lk = memory.shape[1]
        has_keys = valid.any(-1)  # [B]
        mask = (valid | ~has_keys.unsqueeze(-1)).view(batch, 1, 1, lk)
        q = self.query(query).view(batch, lq, self.heads, -1).transpose(1, 2)
        kv = self.key_value(memory).view(batch, lk, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # [B, h, Lk, d / h] each
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = self.out(ctx.transpose(1, 2).reshape(batch, lq, dim))
        return out * has_keys.view(batch, 1, 1).to(out.dtype)


class _Block(nn.Module):
    """Post-norm Transformer block: ``h = LN(x + MHA(x, M, M))``, ``LN(h + FFN(h))``, with
    ``FFN(h) = ReLU(h W1 + b1) W2 + b2``. Self-attention when ``M`` is ``x`` (encoder), target
    attention when ``x`` is the target item and ``M`` the encoded sequence (decoder)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attention = _MultiHeadAttention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x + self.attention(x, memory, valid))
        return self.norm2(h + self.ffn(h))


class InterestTransformer(nn.Module):
    """One facet's Deep Interest Transformer: behaviour sequence + target item -> interest [B, D].

    Encoder input ``sqrt(d) e_j + p_r(j)``: the scaled item embedding plus a learned position
    embedding indexed by recency ``r(j)`` (0 = the most recent behaviour, i.e. the last real token
    of the history, whatever its length and however it is padded)."""

    def __init__(self, dim: int, max_len: int, config: DMTConfig, ffn: int) -> None:
        super().__init__()
        self.scale = math.sqrt(dim)
        self.positions = nn.Parameter(torch.empty(max_len, dim))
        nn.init.xavier_uniform_(self.positions)  # as the authors' code
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        heads = config.num_heads
        self.encoder = nn.ModuleList(
            _Block(dim, heads, ffn, config.dropout) for _ in range(config.num_layers)
        )
        self.decoder = nn.ModuleList(
            _Block(dim, heads, ffn, config.dropout) for _ in range(config.decoder_layers)
        )

    def forward(self, target: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor):
        """``target`` [B, D], ``seq`` [B, L, D] (zero rows at padding), ``valid`` [B, L] bool."""
        ones = valid.to(torch.int64)
        recency = ones.sum(-1, keepdim=True) - ones.cumsum(-1)  # real tokens after position j
        h = self.dropout(seq * self.scale + F.embedding(recency, self.positions))
        for block in self.encoder:
            h = block(h, h, valid)
        z = self.dropout(target.unsqueeze(1) * self.scale)
        for block in self.decoder:
            z = block(z, h, valid)
        return z.squeeze(1)


def _target_feature(schema: Schema, option: str, facets: list[Feature], bias: set[str]) -> str:
    """The target item: ``option``, else the feature whose vocabulary a facet shares
    (``vocab_of``), else the first categorical feature named like "item", else the last
    categorical feature; never a bias feature."""
    categorical = [f.name for f in schema.features_of("categorical")]
    if option:
        if option not in categorical:
            raise ConfigError(
                f"model.target_field: {option!r} is not a categorical feature of the schema; "
                f"choose one of: {', '.join(categorical) or '(none)'}"
            )
        if option in bias:
            raise ConfigError(
                f"model.bias_features: {option!r} is the target item (model.target_field)"
            )
        return option
    shared = [f.vocab_of for f in facets if f.vocab_of in categorical]
    if shared and shared[0] in bias:
        raise ConfigError(
            f"model.bias_features: {shared[0]!r} is the target item (the vocabulary of the "
            f"behaviour sequences); a bias feature must not be the item being ranked"
        )
    usable = [n for n in categorical if n not in bias]
    if not usable:
        raise ConfigError(
            "model.target_field: DMT needs a categorical feature for the target item; "
            "the schema has none outside model.bias_features"
        )
    if shared:
        return shared[0]
    named = [n for n in usable if any(w in n.lower() for w in _ITEM_WORDS)]
    return named[0] if named else usable[-1]


@register("dmt")
class DMT(MTLModel):
    """DMT: a Transformer per behaviour sequence with the target item as the decoder's query,
    MMoE over the interests, and a bias network added to the logits in training only.

    Gu et al., "Deep Multifaceted Transformers for Multi-objective Ranking in Large-Scale
    E-commerce Recommender Systems", CIKM 2020. The forms below follow the paper's three parts
    (multifaceted Transformers, MMoE, Bias DNN) as its authors' released code implements them
    (guyulongcs/CIKM2020_DMT: TransformerModel.py, mmoe_transformer_unbias.py, dmt.conf); the
    paper's full text was not at hand, so where text and code could differ we follow the code.

    Deep Multifaceted Transformers. Each facet k (a behaviour sequence: clicks, carts, orders)
    has its own Deep Interest Transformer. With d = ``embed_dim`` and E_k the embeddings of the
    sequence, the encoder reads H^0 = sqrt(d) E_k + P (learned positions) and applies
    ``num_layers`` blocks H' = LN(H + MHA(H, H, H)), H'' = LN(H' + FFN(H')), where
    MHA(Q, K, V) = Concat(head_1..head_h) W^O, head_i = softmax(Q W_i^Q (K W_i^K)^T /
    sqrt(d / h)) V W_i^V with padding keys masked, and FFN(x) = ReLU(x W_1 + b_1) W_2 + b_2. The
    decoder takes the target item's embedding sqrt(d) e_t as the only query and attends over the
    encoder's output: z' = LN(q + MHA(q, H, H)), u_k = LN(z' + FFN(z')) (``decoder_layers``
    blocks). u_k is facet k's interest vector. A row with an empty history gets zero attention
    output, so its u_k depends on the target item alone. A history item the training data never
    had (the vocabulary's out-of-vocabulary row) is left out like padding, from attention and
    from pooled means: it has no identity, and its untrained row would otherwise act as one
    random item that every unseen candidate "matches" (19 % of movielens-100k's test rows hold
    one). Hashed vocabularies have no such row.

    Multi-gate Mixture-of-Experts. x = [embeddings of the other categorical fields (the target
    item included), mean-pooled sequences, standardised numerics, u_1 .. u_K], as the authors'
    code concatenates its features and interests; experts f_i are ReLU MLPs, gates
    g^t(x) = softmax(W_t x), f^t(x) = sum_i g^t(x)_i f_i(x), y_t = h_t(f^t(x)) with a tower h_t
    per objective (``extras["gates"]``: [B, T, E]).

    Bias Deep Neural Network. When ``bias_features`` names features (position, page, the
    categories of neighbouring impressions...), an MLP over them gives one bias logit y_b that is
    added to every binary objective's logit in training, p_t = sigmoid(y_t + y_b), so the bias of
    where an item was shown is learned apart from relevance. Evaluation, export and serving run the
    model in eval mode and omit it: p_t = sigmoid(y_t). Bias features feed only this network,
    never the main one, so served scores do not depend on them (their columns must still be
    present when encoding, with any value).

    Options: ``target_field`` (a categorical feature; default: the feature a facet shares its
    vocabulary with through ``vocab_of``, else the first categorical feature named like "item",
    else the last categorical one), ``sequence_fields`` (comma-separated facets; default every
    sequence feature not in ``bias_features``), ``bias_features`` (comma-separated feature names
    of any type; empty: no bias network).

    Departures, plainly:

    - An item in the paper is the concatenation of its id, category, brand and shop embeddings
      (d_model 80); here each position of a sequence is one id of one sequence feature, embedded
      with the model's single ``embed_dim`` (default 32, the paper's item-id width). Matching the
      target against the histories needs the sequences to share the target's vocabulary
      (``vocab_of``); without it the model still runs, but the target and the history items live
      in different embedding rows.
    - Positions count back from the most recent behaviour (our histories are stored oldest first
      and right-padded); the authors' code numbers positions in stored order. Time-interval
      position encodings (an option of their code) are not implemented.
    - The authors' code has no output projection W^O in its attention; we keep the Transformer's.
      Dropout (``dropout``, default 0.1, their Transformer rate) applies to the encoder and
      decoder inputs and the attention weights as in their code, and also to the experts, towers
      and bias network (their config: none in the experts and towers, 0.5 in the bias network).
    - One bias logit shared by every objective, as in their code; it is not added to regression
      tasks. Their released config also adds the loss of the bias-free logits to the loss of
      the biased ones (``loss_ctr_rel_method = ctr_rel``); we train on the biased logits only
      (their ``two_head_add`` form, p_t = sigmoid(y_t + y_b)).
    - Loss weights and class weights: their config weighs CTR and CVR 1:1 and up-weights positive
      samples (clicks 15x, orders 400x). Here the balancer combines the per-task losses (``ew``,
      or ``fixed`` for the schema's task weights); no class weights. A task's meaning comes from
      the schema: with ``depends_on`` its loss covers the rows where its upstream task is positive
      (CVR after a click), while their order head is supervised over all impressions.
    - No L2 penalty on the embeddings (their ``l2_emb_lambda``); use the optimizer's weight decay.
    - The model's embedding table starts at N(0, 1/d), so that sqrt(d) e has unit scale as in the
      Transformer (their tables: Xavier; mtlrec's default: N(0, 0.01^2), with which the planted
      "target in history" signal of tests/test_dmt.py was learned in 300 steps by 4 of 6 seeds,
      against 6 of 6 with N(0, 1/d)). Positions start Xavier-uniform, as in their code.
    """

    Config = DMTConfig

    def __init__(self, schema, layout, config: DMTConfig) -> None:
        super().__init__(schema, layout, config)
        dim = config.embed_dim
        for key, least in (("num_heads", 1), ("num_layers", 0), ("decoder_layers", 1)):
            if getattr(config, key) < least:
                raise ConfigError(f"model.{key} must be >= {least} (got {getattr(config, key)})")
        if config.num_experts < 1:
            raise ConfigError(f"model.num_experts must be >= 1 (got {config.num_experts})")
        if config.ffn_hidden < 0:
            raise ConfigError(f"model.ffn_hidden must be >= 0 (got {config.ffn_hidden})")
        if dim % config.num_heads:
            raise ConfigError(
                f"model.num_heads: {config.num_heads} heads must divide model.embed_dim={dim}"
            )

        features = [f.name for f in schema.features]
        bias = checked_option_names(
            config.bias_features, "model.bias_features", features, "a feature of the schema"
        )
        bias_set = set(bias)
        self.bias_features = tuple(bias)
        sequences = schema.features_of("sequence")
        seq_names = [f.name for f in sequences]
        if config.sequence_fields.strip():
            wanted = checked_option_names(
                config.sequence_fields, "model.sequence_fields", seq_names, "a sequence feature"
            )
            clash = [n for n in wanted if n in bias_set]
            if clash:
                raise ConfigError(
                    f"model.sequence_fields: {', '.join(map(repr, clash))} also in "
                    "model.bias_features; a feature feeds one network or the other"
                )
        else:
            wanted = [n for n in seq_names if n not in bias_set]
        if not wanted:
            raise ConfigError(
                "model.sequence_fields: DMT needs at least one behaviour sequence (a sequence "
                "feature outside model.bias_features); the schema has none"
            )
        facets = [f for f in sequences if f.name in wanted]  # schema order
        self.facet_names = [f.name for f in facets]
        self.target_field = _target_feature(schema, config.target_field.strip(), facets, bias_set)

        # Columns of batch.cat / batch.num and blocks of batch.seq, split main / bias.
        cat_fields = schema.embedded_fields()[: layout.num_categorical]
        numeric = schema.features_of("numeric")
        self.target_col = [f.name for f in cat_fields].index(self.target_field)
        main_cat = [j for j, f in enumerate(cat_fields) if f.name not in bias_set]
        bias_cat = [j for j, f in enumerate(cat_fields) if f.name in bias_set]
        main_num = [j for j, f in enumerate(numeric) if f.name not in bias_set]
        bias_num = [j for j, f in enumerate(numeric) if f.name in bias_set]
        for key, cols in (
            ("main_cat", main_cat),
            ("bias_cat", bias_cat),
            ("main_num", main_num),
            ("bias_num", bias_num),
        ):
            self.register_buffer(key, torch.tensor(cols, dtype=torch.long), persistent=False)
        starts = [0]
        for length in layout.sequence_lengths:
            starts.append(starts[-1] + length)
        self.blocks = [  # (start, stop, role): pooled into the "main" or the "bias" input
            (starts[i], starts[i + 1], "bias" if f.name in bias_set else "main")
            for i, f in enumerate(sequences)
        ]
        self.facet_blocks = [
            (starts[i], starts[i + 1]) for i, f in enumerate(sequences) if f.name in wanted
        ]
        # Each position's out-of-vocabulary row (-1 for hashed vocabularies, which have none):
        # an unseen item has no identity, so it is neither a key nor part of a pooled mean.
        oov = []
        for i, f in enumerate(sequences):
            hashed = schema.vocabulary_owner(f).hash_buckets > 0
            row = -1 if hashed else layout.field_offsets[layout.num_categorical + i]
            oov += [row] * layout.sequence_lengths[i]
        self.register_buffer("oov_rows", torch.tensor(oov, dtype=torch.long), persistent=False)

        self.embedding = self.make_embedding()
        with torch.no_grad():  # N(0, 1/d): sqrt(d) e has unit scale, as in the Transformer
            self.embedding.table.weight.normal_(0.0, dim**-0.5)
            self.embedding.table.weight[0].zero_()
        ffn = config.ffn_hidden or 4 * dim
        self.transformers = nn.ModuleList(
            InterestTransformer(dim, stop - start, config, ffn) for start, stop in self.facet_blocks
        )
        main_seqs = sum(role == "main" for *_, role in self.blocks)
        in_dim = (len(main_cat) + main_seqs + len(facets)) * dim + len(main_num)
        self.experts = Experts(config.num_experts, in_dim, config.expert_hidden, config.dropout)
        self.gates = nn.ModuleList(Gate(in_dim, config.num_experts) for _ in schema.tasks)
        for _ in schema.tasks:
            self.task_modules.append(
                MLP(self.experts.output_dim, config.tower_hidden, 1, dropout=config.dropout)
            )
        bias_seqs = sum(role == "bias" for *_, role in self.blocks)
        bias_dim = (len(bias_cat) + bias_seqs) * dim + len(bias_num)
        self.bias_net = (
            MLP(bias_dim, config.bias_hidden, 1, dropout=config.dropout) if bias_set else None
        )

    def training_only_features(self) -> tuple[str, ...]:
        """The bias features: the bias network runs in training only."""
        return self.bias_features

    def forward(self, batch: TensorTable) -> ModelOutput:
        cat = self.embedding.lookup(batch.cat)  # [B, C, D]
        seq = self.embedding.lookup(batch.seq)  # [B, L, D], padding rows are zero
        valid = (batch.seq != 0) & (batch.seq != self.oov_rows)
        pooled: dict[str, list[torch.Tensor]] = {"main": [], "bias": []}
        for start, stop, role in self.blocks:
            m = valid[:, start:stop].unsqueeze(-1).to(seq.dtype)
            pooled[role].append((seq[:, start:stop] * m).sum(1) / m.sum(1).clamp_min(1.0))
        target = cat[:, self.target_col]
        interests = [
            transformer(target, seq[:, start:stop], valid[:, start:stop])
            for transformer, (start, stop) in zip(self.transformers, self.facet_blocks)
        ]
        x = torch.cat(
            [cat[:, self.main_cat].flatten(1), *pooled["main"], batch.num[:, self.main_num]]
            + interests,
            1,
        )
        expert_out, gates = experts_and_gates(self.experts, self.gates, x)
        mixed = mix(gates, expert_out)  # [B, T, D]
        logits = torch.cat([tower(mixed[:, t]) for t, tower in enumerate(self.task_modules)], 1)
        extras = {"gates": gates}
        if self.training and self.bias_net is not None:
            parts = [cat[:, self.bias_cat].flatten(1), *pooled["bias"], batch.num[:, self.bias_num]]
            bias = self.bias_net(torch.cat(parts, 1))  # [B, 1]
            logits = logits + bias * self.is_binary.to(bias.dtype)
            extras["bias_logit"] = bias.squeeze(1)
        return ModelOutput(logits=logits, extras=extras)
