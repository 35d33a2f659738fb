"""MMoE: expert MLPs shared by every task, mixed per task by its own softmax gate, then one tower per task."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.fields import FieldEmbedding
from recsys_lab.modules.mlp import MLP
from recsys_lab.modules.multitask import Towers, head_labels


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018, "Modeling Task Relationships in Multi-task Learning
    with Multi-gate Mixture-of-Experts").

    f_t(x) = sum_k g_t(x)_k * E_k(x) with g_t(x) = softmax(W_t x) (eqs. 5-6), y_t = tower_t(f_t(x)). Every
    expert sees every task's gradient, but each task weights the experts its own way, so tasks that disagree
    can use different experts instead of fighting over one shared bottom. With one expert every gate is 1 and
    MMoE is the shared-bottom model.

    Args:
        schema: the dataset's features; every sparse, seq and dense feature becomes a field (`FieldEmbedding`).
        embedding_dim: D, the width of every field.
        num_experts: K.
        expert_hidden: hidden widths of each expert MLP (ReLU) on the flattened fields (B, F*D); the last is the
            expert output width.
        tower_hidden: hidden widths of each task's tower; each tower ends in one logit.
        dropout: dropout after every hidden layer of the experts and towers.
        labels: the labels that get a head (and a gate), first = `forward`'s; None = every label of the dataset.

    forward_heads(batch) -> {label: logits (B,)}; forward(batch) -> the first label's logits (B,);
    gates(batch) -> {label: expert weights (B, K)}, each row a softmax distribution.
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 16,
        num_experts: int = 4,
        expert_hidden: list[int] = [128, 64],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        tower_hidden: list[int] = [32],  # noqa: B006
        dropout: float = 0.0,
        labels: list[str] | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1 or not expert_hidden:
            raise ValueError(
                f"MMoE: needs model.net.num_experts >= 1 (got {num_experts}) and a non-empty "
                f"model.net.expert_hidden (got {list(expert_hidden)})"
            )
        self.labels = head_labels(schema, labels)
        self.fields = FieldEmbedding(schema, embedding_dim)
        input_dim = self.fields.num_fields * embedding_dim
        self.experts = nn.ModuleList(
            MLP(input_dim, expert_hidden, dropout=dropout) for _ in range(num_experts)
        )
        # a gate is a linear map to K scores (the paper's W_gk x, no bias) followed by a softmax
        self.gate_layers = nn.ModuleList(nn.Linear(input_dim, num_experts, bias=False) for _ in self.labels)
        self.towers = Towers(len(self.labels), expert_hidden[-1], tower_hidden, dropout)

    def _mix(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per task: the gate (B, K) and the gated mixture of expert outputs (B, H)."""
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # (B, K, H)
        gates = [torch.softmax(layer(x), dim=-1) for layer in self.gate_layers]  # T x (B, K)
        mixed = [(g.unsqueeze(-1) * experts).sum(dim=1) for g in gates]  # T x (B, H)
        return gates, mixed

    def gates(self, batch: Batch) -> dict[str, Tensor]:
        gates, _ = self._mix(self.fields(batch).flatten(1))
        return dict(zip(self.labels, gates, strict=True))

    def forward_heads(self, batch: Batch) -> dict[str, Tensor]:
        x = self.fields(batch).flatten(1)  # (B, F, D) -> (B, F*D)
        _, mixed = self._mix(x)
        return dict(zip(self.labels, self.towers(mixed), strict=True))

    def forward(self, batch: Batch) -> Tensor:
        return self.forward_heads(batch)[self.labels[0]]  # (B,)
