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

    forward(query (B, D), item (N, D), item_ids (N,), log_q (num_items,), positive (B,) = None) -> scalar loss.
    The candidates are usually the batch's own items (N = B, query b's positive in column b); with negatives
    gathered from every DDP process (`RetrievalTask(cross_rank_negatives=True)`) they are all processes' items
    and `positive` holds each query's column among them.
    """

    def __init__(self, temperature: float = 0.05, logq_correction: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"loss.temperature={temperature}: expected a positive number")
        self.temperature = temperature
        self.logq_correction = logq_correction

    def forward(
        self, query: Tensor, item: Tensor, item_ids: Tensor, log_q: Tensor, positive: Tensor | None = None
    ) -> Tensor:
        if positive is None:
            positive = torch.arange(len(query), device=query.device)  # (B,): the batch's own items
        logits = query @ item.T / self.temperature  # (B, N): row = query, column = candidate
        if self.logq_correction:
            logits = logits - log_q[item_ids].unsqueeze(0)
        # the query's own item elsewhere among the candidates is not a negative of it
        same = item_ids[positive].unsqueeze(1) == item_ids.unsqueeze(0)  # (B, N)
        same[torch.arange(len(query), device=query.device), positive] = False
        logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, positive)


class BPRLoss(nn.Module):
    """Bayesian personalised ranking (Rendle et al., UAI 2009, arXiv:1205.2618): -log σ(s⁺ − s⁻), averaged over
    every (positive, negative) pair.

    forward(positive (B,), negative (B, n)) -> scalar loss.
    """

    def forward(self, positive: Tensor, negative: Tensor) -> Tensor:
        return F.softplus(negative - positive.unsqueeze(1)).mean()  # softplus(-x) = -log σ(x)


# ---- next-item losses: forward(hidden (N, D), targets (N,), items (V, D), log_q (V,)) -> scalar ------------
# hidden: the sequence model's output at every supervised position; targets: the item code to predict there;
# items: the output representation of every item code (code 0, "unknown", is never a target nor a negative).


def _uniform_negatives(targets: Tensor, n: int, num_items: int) -> Tensor:
    """int64 (N, n) item codes drawn uniformly from 1..V-1, never the position's own target."""
    negatives = torch.randint(1, num_items, (len(targets), n), device=targets.device)
    clash = negatives == targets.unsqueeze(1)
    while bool(clash.any()):  # redraw the few that hit the target (expected n / (V - 1) per position)
        negatives[clash] = torch.randint(1, num_items, (int(clash.sum()),), device=targets.device)
        clash = negatives == targets.unsqueeze(1)
    return negatives


def _checked_negatives(n: int) -> int:
    if n < 1:
        raise ValueError(f"loss.n={n}: expected a positive number of negatives")
    return n


def _sampled_scores(hidden: Tensor, targets: Tensor, items: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Scores of each position's target (N,) and of `n` uniform negatives drawn for it (N, n)."""
    negatives = _uniform_negatives(targets, n, len(items))  # (N, n)
    positive = (hidden * items[targets]).sum(-1)  # (N,)
    negative = torch.einsum("nd,nkd->nk", hidden, items[negatives])  # (N, n)
    return positive, negative


class FullSoftmaxLoss(nn.Module):
    """Cross-entropy over the whole catalogue (Klenitskiy & Vasilev, RecSys 2023, "Turning Dross Into Gold
    Loss": SASRec trained this way matches BERT4Rec). Code 0 is excluded from the softmax."""

    def forward(self, hidden: Tensor, targets: Tensor, items: Tensor, log_q: Tensor | None = None) -> Tensor:
        logits = hidden @ items.T  # (N, V)
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, targets)


class UniformSampledSoftmaxLoss(nn.Module):
    """Softmax over the target and `n` uniformly sampled negatives per position (Jean et al., ACL 2015).
    Uniform sampling has a constant proposal probability, so logQ correction would change nothing here.

    Args:
        n: negatives per supervised position.
    """

    def __init__(self, n: int = 256) -> None:
        super().__init__()
        self.n = _checked_negatives(n)

    def forward(self, hidden: Tensor, targets: Tensor, items: Tensor, log_q: Tensor | None = None) -> Tensor:
        positive, negative = _sampled_scores(hidden, targets, items, self.n)  # (N,), (N, n)
        logits = torch.cat([positive.unsqueeze(1), negative], dim=1)  # (N, 1 + n): the target is class 0
        return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=hidden.device))


class InBatchSoftmaxLoss(nn.Module):
    """Softmax over the targets of every supervised position in the batch (in-batch negatives), with logQ
    correction for their popularity-proportional sampling (Yi et al., RecSys 2019) and a position's repeats of
    its own target masked — `SampledSoftmaxLoss` applied to next-item prediction.

    Args:
        logq_correction: subtract log q_j, the item's share of training positives.
    """

    def __init__(self, logq_correction: bool = True) -> None:
        super().__init__()
        self.softmax = SampledSoftmaxLoss(temperature=1.0, logq_correction=logq_correction)

    def forward(self, hidden: Tensor, targets: Tensor, items: Tensor, log_q: Tensor | None = None) -> Tensor:
        if self.softmax.logq_correction and log_q is None:
            raise ValueError("InBatchSoftmaxLoss with logq_correction needs log_q")
        return self.softmax(hidden, items[targets], targets, log_q)


class BCENegativeLoss(nn.Module):
    """Binary cross-entropy on the target and `n` uniformly sampled negatives per position — SASRec's original
    objective (Kang & McAuley, ICDM 2018) with n = 1.

    Args:
        n: negatives per supervised position.
    """

    def __init__(self, n: int = 1) -> None:
        super().__init__()
        self.n = _checked_negatives(n)

    def forward(self, hidden: Tensor, targets: Tensor, items: Tensor, log_q: Tensor | None = None) -> Tensor:
        positive, negative = _sampled_scores(hidden, targets, items, self.n)  # (N,), (N, n)
        # -log σ(s+) - Σ log(1 - σ(s-)), averaged over positions
        return (F.softplus(-positive) + F.softplus(negative).sum(1)).mean()


class GBCELoss(nn.Module):
    """Generalised binary cross-entropy of gSASRec (Petrov & Macdonald, RecSys 2023, arXiv:2308.07192).

    With k negatives sampled uniformly from the V − 1 other items, α = k / (V − 1) is the sampling rate and
    β = α (t (1 − 1/α) + 1/α) (0 < β <= 1); the loss is −β log σ(s⁺) − Σⱼ log(1 − σ(s⁻ⱼ)). t = 0 gives β = 1,
    plain BCE (overconfident with few negatives); t = 1 gives β = α, which calibrates the scores to the full
    catalogue.

    Args:
        n: negatives per supervised position (k).
        t: calibration parameter in [0, 1].
    """

    def __init__(self, n: int = 256, t: float = 0.75) -> None:
        super().__init__()
        _checked_negatives(n)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"loss.t={t}: expected a value in [0, 1]")
        self.n, self.t = n, t

    def beta(self, num_items: int) -> float:
        alpha = self.n / (num_items - 2)  # V counts code 0, which is never sampled: V - 1 items, V - 2 others
        return alpha * (self.t * (1 - 1 / alpha) + 1 / alpha)

    def forward(self, hidden: Tensor, targets: Tensor, items: Tensor, log_q: Tensor | None = None) -> Tensor:
        positive, negative = _sampled_scores(hidden, targets, items, self.n)  # (N,), (N, n)
        beta = self.beta(len(items))
        return (beta * F.softplus(-positive) + F.softplus(negative).sum(1)).mean()
