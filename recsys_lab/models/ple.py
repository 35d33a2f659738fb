"""PLE: stacked customized gate control (CGC) layers of task-specific and shared experts, one tower per task."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.fields import FieldEmbedding
from recsys_lab.modules.mlp import MLP
from recsys_lab.modules.multitask import Towers, head_labels


def _experts(n: int, input_dim: int, hidden: list[int], dropout: float) -> nn.ModuleList:
    return nn.ModuleList(MLP(input_dim, hidden, dropout=dropout) for _ in range(n))


class CGCLayer(nn.Module):
    """One extraction layer of PLE (paper sec. 4.2-4.3): per task, a gate mixes that task's own experts and the
    shared experts; in every layer but the last a shared gate also mixes all experts into the next shared input.

    Task t's experts read task t's input, the shared experts read the shared input (at the first layer all
    inputs are the same embedding). Gate t = softmax(W_t x_t) over its m_t + m_s experts (eqs. 2-4; no bias,
    as in the paper and in `MMoE`).

    Args:
        input_dim: width of every input.
        num_tasks: T.
        num_specific_experts: m_t, experts per task (0 gives MMoE-style gates over shared experts only).
        num_shared_experts: m_s.
        expert_hidden: hidden widths of each expert MLP; the last is the layer's output width.
        dropout: dropout after every hidden layer of the experts.
        shared_gate: whether to compute the shared output (every layer but the last).

    forward(task_inputs: T x (B, in), shared_input (B, in)) -> (T x (B, H), shared output (B, H) or None).
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        num_specific_experts: int,
        num_shared_experts: int,
        expert_hidden: list[int],
        dropout: float,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.specific = nn.ModuleList(
            _experts(num_specific_experts, input_dim, expert_hidden, dropout) for _ in range(num_tasks)
        )
        self.shared = _experts(num_shared_experts, input_dim, expert_hidden, dropout)
        per_task = num_specific_experts + num_shared_experts
        self.task_gates = nn.ModuleList(nn.Linear(input_dim, per_task, bias=False) for _ in range(num_tasks))
        # the shared gate selects among every expert of the layer: all tasks' and the shared ones
        all_experts = num_tasks * num_specific_experts + num_shared_experts
        self.shared_gate = nn.Linear(input_dim, all_experts, bias=False) if shared_gate else None

    def forward(self, task_inputs: list[Tensor], shared_input: Tensor) -> tuple[list[Tensor], Tensor | None]:
        shared = [expert(shared_input) for expert in self.shared]  # m_s x (B, H)
        specific = [[e(x) for e in experts] for experts, x in zip(self.specific, task_inputs, strict=True)]
        outputs = []
        for own, x, gate in zip(specific, task_inputs, self.task_gates, strict=True):
            experts = torch.stack(own + shared, dim=1)  # (B, m_t + m_s, H)
            weights = torch.softmax(gate(x), dim=-1).unsqueeze(-1)  # (B, m_t + m_s, 1)
            outputs.append((weights * experts).sum(dim=1))  # (B, H)
        if self.shared_gate is None:
            return outputs, None
        every = torch.stack([e for own in specific for e in own] + shared, dim=1)  # (B, T*m_t + m_s, H)
        weights = torch.softmax(self.shared_gate(shared_input), dim=-1).unsqueeze(-1)  # (B, T*m_t + m_s, 1)
        return outputs, (weights * every).sum(dim=1)  # T x (B, H), (B, H)


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020, "Progressive Layered Extraction (PLE): A Novel
    Multi-Task Learning (MTL) Model for Personalized Recommendations").

    `num_levels` CGC layers: explicitly separating task-specific from shared experts keeps one task's gradient
    from overwriting what another task needs (the "seesaw" the paper measures with MMoE), and stacking layers
    lets the shared representation be extracted progressively. Task t's tower reads task t's output of the
    last layer. One level is the paper's CGC model.

    Args:
        schema: the dataset's features; every sparse, seq and dense feature becomes a field (`FieldEmbedding`).
        embedding_dim: D, the width of every field.
        num_levels: number of CGC extraction layers (>= 1).
        num_specific_experts: experts per task in every layer (>= 0).
        num_shared_experts: shared experts in every layer (>= 0; specific + shared >= 1).
        expert_hidden: hidden widths of each expert MLP (ReLU); the last is the width between layers.
        tower_hidden: hidden widths of each task's tower; each tower ends in one logit.
        dropout: dropout after every hidden layer of the experts and towers.
        labels: the labels that get a head, first = `forward`'s; None = every label of the dataset.

    forward_heads(batch) -> {label: logits (B,)}; forward(batch) -> the first label's logits (B,).
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 16,
        num_levels: int = 2,
        num_specific_experts: int = 1,
        num_shared_experts: int = 1,
        expert_hidden: list[int] = [64],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        tower_hidden: list[int] = [32],  # noqa: B006
        dropout: float = 0.0,
        labels: list[str] | None = None,
    ) -> None:
        super().__init__()
        if num_levels < 1 or num_specific_experts < 0 or num_shared_experts < 0 or not expert_hidden:
            raise ValueError(
                f"PLE: needs model.net.num_levels >= 1 (got {num_levels}), expert counts >= 0 (got "
                f"{num_specific_experts}, {num_shared_experts}) and a non-empty model.net.expert_hidden"
            )
        if num_specific_experts + num_shared_experts < 1:
            raise ValueError(
                "PLE: model.net.num_specific_experts + model.net.num_shared_experts must be >= 1 (got 0)"
            )
        self.labels = head_labels(schema, labels)
        self.fields = FieldEmbedding(schema, embedding_dim)
        widths = [self.fields.num_fields * embedding_dim] + [expert_hidden[-1]] * (num_levels - 1)
        self.levels = nn.ModuleList(
            CGCLayer(
                width,
                len(self.labels),
                num_specific_experts,
                num_shared_experts,
                expert_hidden,
                dropout,
                shared_gate=level < num_levels - 1,  # the last layer's shared output has no reader
            )
            for level, width in enumerate(widths)
        )
        self.towers = Towers(len(self.labels), expert_hidden[-1], tower_hidden, dropout)

    def forward_heads(self, batch: Batch) -> dict[str, Tensor]:
        x = self.fields(batch).flatten(1)  # (B, F, D) -> (B, F*D)
        task_inputs, shared = [x] * len(self.labels), x
        for level in self.levels:
            task_inputs, shared = level(task_inputs, shared)  # T x (B, H), (B, H) or None at the last level
        return dict(zip(self.labels, self.towers(task_inputs), strict=True))

    def forward(self, batch: Batch) -> Tensor:
        return self.forward_heads(batch)[self.labels[0]]  # (B,)
