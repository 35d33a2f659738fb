"""SampledSoftmaxLoss against hand-computed values and a loop-by-loop numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys_lab.modules.losses import SampledSoftmaxLoss

# A B = 3 batch whose rows 0 and 2 hold the same item (id 2), so each is not a negative of the other.
QUERY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)  # (B, D)
ITEM = torch.tensor([[0.8, 0.6], [0.0, 1.0], [0.8, 0.6]], dtype=torch.float64)  # (B, D)
ITEM_IDS = torch.tensor([2, 5, 2])  # (B,)
SAMPLING_PROB = torch.tensor([0.1, 0.05, 0.4, 0.1, 0.05, 0.3], dtype=torch.float64)  # (num_items,)
LOG_Q = SAMPLING_PROB.log()


def _hand_computed(temperature: float, logq_correction: bool) -> float:
    """Mean over rows of log(1 + sum_neg exp(logit_neg - logit_pos)), written out row by row.

    Dot products: row 0: pos q0.v0 = 0.8, neg q0.v1 = 0 (v2 is the same item: masked);
    row 1: pos q1.v1 = 1, negs q1.v0 = q1.v2 = 0.6; row 2: pos q2.v2 = 0.96, neg q2.v1 = 0.8 (v0 masked).
    logQ subtracts log q_j from each column, so a negative's term is multiplied by q_pos / q_neg:
    rows 0 and 2: q(2) / q(5) = 0.4 / 0.3 = 4/3; row 1: q(5) / q(2) = 3/4 for each of its two negatives.
    """
    rows = [((0.0 - 0.8), 4 / 3, 1), ((0.6 - 1.0), 3 / 4, 2), ((0.8 - 0.96), 4 / 3, 1)]
    losses = []
    for gap, ratio, n_neg in rows:
        factor = ratio if logq_correction else 1.0
        losses.append(math.log(1 + n_neg * factor * math.exp(gap / temperature)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 0.05])
@pytest.mark.parametrize("logq_correction", [True, False])
def test_hand_computed(temperature: float, logq_correction: bool) -> None:
    loss = SampledSoftmaxLoss(temperature=temperature, logq_correction=logq_correction)
    value = loss(QUERY, ITEM, ITEM_IDS, LOG_Q).item()
    assert value == pytest.approx(_hand_computed(temperature, logq_correction), rel=1e-12)


def test_pinned_values() -> None:
    # The hand formula above, evaluated once; a second anchor in case both drift together.
    corrected = SampledSoftmaxLoss(0.5)(QUERY, ITEM, ITEM_IDS, LOG_Q).item()
    assert corrected == pytest.approx(0.4769046490, rel=1e-9)
    uncorrected = SampledSoftmaxLoss(0.5, logq_correction=False)(QUERY, ITEM, ITEM_IDS, LOG_Q).item()
    assert uncorrected == pytest.approx(0.4569803204, rel=1e-9)


def _numpy_reference(
    query: np.ndarray, item: np.ndarray, ids: np.ndarray, log_q: np.ndarray, temperature: float, correct: bool
) -> float:
    """Eq. 3 of Yi et al. (2019), one (row, column) at a time: s_ij = <q_i, v_j> / tau - log q(id_j)."""
    total = 0.0
    for i in range(len(ids)):
        terms = []
        for j in range(len(ids)):
            if j != i and ids[j] == ids[i]:
                continue  # the same item is not a negative of itself
            s = float(query[i] @ item[j]) / temperature - (log_q[ids[j]] if correct else 0.0)
            terms.append(s)
        positive = float(query[i] @ item[i]) / temperature - (log_q[ids[i]] if correct else 0.0)
        total += np.log(np.sum(np.exp(terms))) - positive
    return total / len(ids)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_reference_with_repeats(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(8, 4, generator=g, dtype=torch.float64), dim=1)
    ids = torch.tensor([3, 1, 3, 0, 1, 3, 2, 4])  # three copies of item 3, two of item 1
    table = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    item = table[ids]  # (B, D): a repeated item has one embedding
    log_q = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), dim=0)  # (num_items,)
    for temperature in (0.1, 0.7):
        for correct in (True, False):
            expected = _numpy_reference(
                query.numpy(), item.numpy(), ids.numpy(), log_q.numpy(), temperature, correct
            )
            value = SampledSoftmaxLoss(temperature, logq_correction=correct)(query, item, ids, log_q).item()
            assert value == pytest.approx(expected, rel=1e-10), (temperature, correct)


def test_logq_correction_favours_rare_negatives() -> None:
    # One query, two candidates at the same similarity: after the correction, a rare negative (small q)
    # competes harder than a popular one, so the loss is larger: exp(-log q) grows as q shrinks.
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    item = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([0, 1])
    loss = SampledSoftmaxLoss(temperature=1.0)
    rare_negative = loss(query[:1].expand(2, 2), item, ids, torch.tensor([0.5, 0.01]).log().double())
    popular_negative = loss(query[:1].expand(2, 2), item, ids, torch.tensor([0.5, 0.49]).log().double())
    assert rare_negative.item() > popular_negative.item() + 0.5


def test_all_repeats_leave_only_the_positive() -> None:
    # Every row holds the same item: every other column is masked, the softmax has one term, the loss is 0.
    g = torch.Generator().manual_seed(3)
    query, item = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    ids = torch.full((4,), 7)
    value = SampledSoftmaxLoss(temperature=0.2)(query, item, ids, torch.zeros(10)).item()
    assert value == 0.0


def test_temperature_scales_logits() -> None:
    # <q, v> / tau: dividing by tau = 0.25 is the same as using 4 q at tau = 1.
    g = torch.Generator().manual_seed(4)
    query, item = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    ids, log_q = torch.tensor([0, 1, 2, 1, 3]), torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    cold = SampledSoftmaxLoss(temperature=0.25)(query, item, ids, log_q)
    scaled = SampledSoftmaxLoss(temperature=1.0)(4 * query, item, ids, log_q)
    torch.testing.assert_close(cold, scaled)
    assert not torch.isclose(cold, SampledSoftmaxLoss(temperature=1.0)(query, item, ids, log_q))
    with pytest.raises(ValueError, match="temperature"):
        SampledSoftmaxLoss(temperature=0.0)
