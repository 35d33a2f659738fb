"""Training losses (torch only). A new loss is a new class picked with `_target_`, not a string switch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SampledSoftmaxLoss(nn.Module):
    """In-batch sampled softmax with logQ correction (Yi et al., RecSys 2019, "Sampling-Bias-Corrected Neural
    Modeling for Large Corpus Item Recommendations", eq. 3).

    The other positives of a batch serve as negatives. They are drawn in proportion to popularity, so popular
    items would be over-penalised; subtracting log q_j (the item's sampling probability) from its logit corrects
    the softmax toward the full-catalogue one. A repeated item in a batch is not a negative of itself.

    Args:
        temperature: logits are cosine / temperature.
        logq_correction: subtract log q_j (set False for the uncorrected ablation).

    forward(query (B, D), item (B, D), item_ids (B,), log_q (num_items,)) -> scalar loss.
    """

    def __init__(self, temperature: float = 0.05, logq_correction: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"loss.temperature={temperature}: expected a positive number")
        self.temperature = temperature
        self.logq_correction = logq_correction

    def forward(self, query: Tensor, item: Tensor, item_ids: Tensor, log_q: Tensor) -> Tensor:
        logits = query @ item.T / self.temperature  # (B, B): row = query, column = candidate
        if self.logq_correction:
            logits = logits - log_q[item_ids].unsqueeze(0)
        same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)  # (B, B)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(item_ids), device=logits.device))
