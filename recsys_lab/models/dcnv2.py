"""DCN-V2: explicit, bounded-degree feature crosses (a cross network) combined with a DNN, for CTR ranking."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.fields import FieldEmbedding
from recsys_lab.modules.mlp import MLP

STRUCTURES = ("stacked", "parallel")


class CrossLayer(nn.Module):
    """DCN-V2's cross layer (eq. 1): x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l, with a full d x d matrix W_l.

    Each layer raises the polynomial degree of the crosses by one; the residual x_l keeps the lower degrees.

    Args:
        dim: d, the width of x_0 and x_l.

    forward(x0, x) -> (B, d), both inputs (B, d).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)  # W_l, b_l

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.linear(x) + x  # (B, d)


class MixtureCrossLayer(nn.Module):
    """DCN-V2's mixture of low-rank cross experts, DCN-Mix (eqs. 3-4 of the paper):

        x_{l+1} = sum_i G_i(x_l) E_i(x_l) + x_l,
        E_i(x_l) = x_0 ⊙ (U_i g(C_i g(V_i^T x_l)) + b_l),

    with U_i, V_i (d, r), C_i (r, r), the bias b_l shared by the experts of a layer, g = tanh and the gate
    G(x_l) = softmax(W_g x_l) over the K experts. The paper leaves g and G open ("nonlinear activation";
    "sigmoid or softmax"): tanh keeps the projected interaction bounded, and the softmax makes the mixture a
    convex combination, so a layer's scale does not grow with K. With K = 1 the gate is constantly 1 and is
    left out: one low-rank expert with the nonlinear projection (not eq. 2's plain U V^T, which has no g, C).

    Args:
        dim: d, the width of x_0 and x_l.
        low_rank: r, the rank of each expert's projection.
        num_experts: K.

    forward(x0, x) -> (B, d), both inputs (B, d).
    """

    def __init__(self, dim: int, low_rank: int, num_experts: int) -> None:
        super().__init__()
        self.V = nn.Parameter(torch.empty(num_experts, dim, low_rank))
        self.C = nn.Parameter(torch.empty(num_experts, low_rank, low_rank))
        self.U = nn.Parameter(torch.empty(num_experts, low_rank, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        for weight in (self.V, self.C, self.U):
            for expert in weight:  # Xavier per expert matrix: fans are that matrix's, not the stack's
                nn.init.xavier_uniform_(expert)
        self.gate = nn.Linear(dim, num_experts, bias=False) if num_experts > 1 else None

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        h = torch.tanh(torch.einsum("bd,kdr->bkr", x, self.V))  # (B, K, r): V_i^T x_l, every expert at once
        h = torch.tanh(torch.einsum("bkr,krs->bks", h, self.C))  # (B, K, r)
        experts = x0.unsqueeze(1) * (torch.einsum("bkr,krd->bkd", h, self.U) + self.bias)  # (B, K, d)
        if self.gate is None:
            return experts.squeeze(1) + x  # (B, d)
        gates = torch.softmax(self.gate(x), dim=-1)  # (B, K)
        return (gates.unsqueeze(-1) * experts).sum(dim=1) + x  # (B, d)


class DCNv2(nn.Module):
    """DCN-V2 (Wang et al., WWW 2021, arXiv:2008.13535).

    x_0 is every field of the schema side by side (`FieldEmbedding`: sparse lookups, masked means of seq
    features, linear projections of dense features; d = F * D). The paper feeds dense features into x_0 as they
    are; projecting them to D makes every field the same width, so the field embedding is the one DeepFM uses.
    The cross network is `num_cross_layers` of `CrossLayer` (full rank), or of `MixtureCrossLayer` when
    `low_rank` is set. Then, as in the paper's fig. 1:

    - stacked: x_0 -> cross network -> DNN -> logit;
    - parallel: cross network (x_0) and DNN (x_0) side by side, concatenated -> logit.

    Args:
        schema: the dataset's features; every sparse, seq and dense feature becomes a field.
        embedding_dim: D, the width of every field.
        num_cross_layers: cross layers (the paper searches 1-4).
        mlp_hidden: hidden widths of the DNN (ReLU); empty gives the cross network alone ("stacked" only).
        dropout: dropout after each hidden layer of the DNN.
        structure: "stacked" or "parallel".
        low_rank: None for full-rank cross layers (eq. 1), or r for the mixture of low-rank experts (eqs. 3-4).
        num_experts: K experts per mixture layer; needs `low_rank`.

    forward(batch) -> logits (B,).
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 16,
        num_cross_layers: int = 3,
        mlp_hidden: list[int] = [400, 400],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        dropout: float = 0.0,
        structure: str = "stacked",
        low_rank: int | None = None,
        num_experts: int = 1,
    ) -> None:
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"DCNv2: structure='{structure}': expected one of {', '.join(STRUCTURES)}")
        if num_cross_layers < 1:
            raise ValueError(f"DCNv2: num_cross_layers={num_cross_layers}: expected a positive integer")
        if low_rank is not None and low_rank < 1:
            raise ValueError(f"DCNv2: low_rank={low_rank}: expected a positive integer or null (full rank)")
        if num_experts < 1 or (low_rank is None and num_experts != 1):
            raise ValueError(
                f"DCNv2: num_experts={num_experts}: expected 1 for full-rank cross layers, or a positive "
                "integer together with low_rank (the mixture of low-rank experts)"
            )
        if structure == "parallel" and not mlp_hidden:
            raise ValueError("DCNv2: structure='parallel' needs a DNN: mlp_hidden is empty")
        self.structure = structure
        self.fields = FieldEmbedding(schema, embedding_dim)
        dim = self.fields.num_fields * embedding_dim  # d
        self.cross = nn.ModuleList(
            CrossLayer(dim) if low_rank is None else MixtureCrossLayer(dim, low_rank, num_experts)
            for _ in range(num_cross_layers)
        )
        self.dnn = MLP(dim, mlp_hidden, dropout=dropout)
        head_dim = self.dnn.output_dim if structure == "stacked" else dim + self.dnn.output_dim
        self.head = nn.Linear(head_dim, 1)

    def forward(self, batch: Batch) -> Tensor:
        x0 = self.fields(batch).flatten(1)  # (B, F, D) -> (B, d)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)  # (B, d)
        if self.structure == "stacked":
            h = self.dnn(x)  # (B, hidden[-1]), or (B, d) without a DNN
        else:
            h = torch.cat([x, self.dnn(x0)], dim=-1)  # (B, d + hidden[-1])
        return self.head(h).squeeze(-1)  # (B,)
