"""A feed-forward stack with an injected activation, and the Dice activation of DIN."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def relu(width: int) -> nn.Module:
    """Activation factory for `MLP`. ReLU ignores the width; Dice needs it for its per-channel statistics."""
    return nn.ReLU()


class MLP(nn.Module):
    """Linear -> activation -> dropout for each hidden size, then an optional Linear output layer.

    Args:
        input_dim: width of the input (..., input_dim).
        hidden: widths of the hidden layers.
        activation: factory called with each hidden width, returning the activation module (`relu`, `Dice`).
        dropout: dropout after each hidden activation (0 adds none).
        output_dim: width of a final Linear layer without activation; None ends at the last hidden layer.
            Output (..., output_dim or hidden[-1] or input_dim).
    """

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        activation: Callable[[int], nn.Module] = relu,
        dropout: float = 0.0,
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), activation(h)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if output_dim is not None:
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
        self.layers = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Dice(nn.Module):
    """Dice activation, DIN (Zhou et al., arXiv:1706.06978, sec. 4.3): a PReLU whose rectifier point follows the data.

    out = p * x + (1 - p) * alpha * x with p = sigmoid(BatchNorm(x)): the switch between the two slopes sits at the
    batch mean of each channel instead of at 0. Batch statistics in training, running statistics in eval and for
    a training call with fewer than two samples (a batch statistic of one row is undefined; such calls happen
    for the last small batch of an epoch, or when only one history position in a batch is real).

    Args:
        dim: channels D, the last dim of the input (B, D) or (B, L, D); every leading position is a sample.
        eps: added to the variance (the paper uses 1e-8).
    """

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        # no affine: the sigmoid's input only needs centring and scaling, alpha carries the learned slope
        self.norm = nn.BatchNorm1d(dim, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        # BatchNorm1d wants channels in dim 1: fold all leading dims into one sample axis
        flat = x.reshape(-1, x.shape[-1])  # (B*L, D)
        if self.training and flat.shape[0] < 2:
            n = self.norm
            normed = F.batch_norm(flat, n.running_mean, n.running_var, training=False, eps=n.eps)
        else:
            normed = self.norm(flat)
        p = torch.sigmoid(normed).reshape(x.shape)  # (..., D)
        return p * x + (1 - p) * self.alpha * x
