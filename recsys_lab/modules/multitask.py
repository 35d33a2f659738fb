"""What the multi-task rankers share: which labels get a head, and one tower per head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from recsys_lab.data.schema import Schema
from recsys_lab.modules.mlp import MLP


def head_labels(schema: Schema, labels: Sequence[str] | None, key: str = "model.net.labels") -> list[str]:
    """The labels a multi-task model predicts, first = the head `forward` returns.

    None means every label of the dataset, in schema order (click, purchase on the simulator; the single
    "label" of implicit data, where a multi-task model then trains one head). ValueError naming `key` and the
    dataset's labels for an empty list, a repeated label or a label the dataset does not have.
    """
    chosen = list(schema.labels) if labels is None else list(labels)
    missing = [label for label in chosen if label not in schema.labels]
    if not chosen or missing or len(set(chosen)) != len(chosen):
        why = f"{missing} not in" if missing else "need distinct labels, at least one, of"
        raise ValueError(f"{key}={chosen}: {why} this dataset's labels {list(schema.labels)}")
    return chosen


class Towers(nn.Module):
    """One MLP tower per task, each ending in one logit: the task-specific top of every multi-task model.

    Args:
        num_tasks: T, one tower each.
        input_dim: width of each tower's input.
        hidden: hidden widths of every tower (ReLU).
        dropout: dropout after each hidden layer.

    forward(inputs) takes T tensors (B, input_dim) (one per task, or the same one T times) -> T logits (B,).
    """

    def __init__(self, num_tasks: int, input_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.towers = nn.ModuleList(
            MLP(input_dim, hidden, dropout=dropout, output_dim=1) for _ in range(num_tasks)
        )

    def forward(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        return [tower(x).squeeze(-1) for tower, x in zip(self.towers, inputs, strict=True)]  # T x (B,)
