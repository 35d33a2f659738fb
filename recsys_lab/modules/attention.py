"""Pooling of a history into one vector: DIN's target attention and a masked mean."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from recsys_lab.modules.mlp import MLP, Dice


class TargetAttention(nn.Module):
    """Local activation unit of DIN (Zhou et al., arXiv:1706.06978, Fig. 2): history pooled by relevance to a target.

    An MLP scores each history item h against the target t from [h, t, h - t, h * t]; the paper's "out product"
    is read as the element-wise product, as in its released code. The weights are NOT softmax-normalised: the
    paper keeps their sum as the intensity of the user's interest in the target. Padded positions get weight
    exactly 0 and never reach the MLP, so Dice's batch statistics see only real positions and the output does
    not depend on padding ids or padding length, in training as in eval.

    Args:
        embedding_dim: E, width of history items and of the target.
        hidden: widths of the scoring MLP's hidden layers.
        activation: factory for the hidden activations, called with each width (Dice, as in the paper).

    forward(history (B, L, E), target (B, E), mask bool (B, L)) -> pooled (B, E), weights (B, L).
    """

    def __init__(
        self,
        embedding_dim: int,
        hidden: Sequence[int] = (80, 40),
        activation: Callable[[int], nn.Module] = Dice,
    ) -> None:
        super().__init__()
        self.mlp = MLP(4 * embedding_dim, hidden, activation=activation, output_dim=1)

    def forward(self, history: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        B, L, E = history.shape
        # score real positions only: gathered row by row, so the order is the same for any padding length
        h = history[mask]  # (N, E), N = number of real positions in the batch
        t = target.unsqueeze(1).expand(B, L, E)[mask]  # (N, E)
        scores = self.mlp(torch.cat([h, t, h - t, h * t], dim=-1)).squeeze(-1)  # (N,)
        weights = scores.new_zeros(B, L).masked_scatter(mask, scores)  # (B, L), 0 at padding
        # zeroing padded items too keeps the sum exact even if they hold non-finite values
        history = history.masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, L, E)
        pooled = (weights.unsqueeze(-1) * history).sum(dim=1)  # (B, E)
        return pooled, weights


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the real positions of x (B, L, D) given mask bool (B, L): (B, D); an empty history gives zeros."""
    x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, L, D)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)  # (B, 1)
    return x.sum(dim=1) / count  # (B, D)
