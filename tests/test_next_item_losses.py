"""Next-item and pairwise losses against hand-computed small cases: full softmax, uniform sampled softmax,
in-batch softmax, BCE with sampled negatives, gBCE (β from the paper's formula) and BPR."""

from __future__ import annotations

import math

import pytest
import torch

from recsys_lab.modules.losses import (
    BCENegativeLoss,
    BPRLoss,
    FullSoftmaxLoss,
    GBCELoss,
    InBatchSoftmaxLoss,
    SampledSoftmaxLoss,
    UniformSampledSoftmaxLoss,
    _uniform_negatives,
)

# 4 item codes (code 0 = unknown), 2-d representations; 2 supervised positions predicting items 1 and 3.
ITEMS = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # (V, D)
HIDDEN = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # (N, D)
TARGETS = torch.tensor([1, 3])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_full_softmax_excludes_code_zero():
    # position 0: logits over codes 1..3 = [2, 0, 2], target 1; position 1: [0, 1, 1], target 3
    expected = (-(2 - math.log(math.exp(2) + 1 + math.exp(2))) - (1 - math.log(1 + math.e + math.e))) / 2
    got = FullSoftmaxLoss()(HIDDEN, TARGETS, ITEMS)
    assert float(got) == pytest.approx(expected, abs=1e-12)  # code 0 (score 18) would dominate otherwise


def test_uniform_negatives_never_hit_the_target():
    torch.manual_seed(0)
    targets = torch.randint(1, 5, (2000,))
    negatives = _uniform_negatives(targets, 3, num_items=5)  # codes 1..4
    assert negatives.shape == (2000, 3)
    assert ((negatives >= 1) & (negatives <= 4)).all() and not (negatives == targets.unsqueeze(1)).any()
    counts = torch.bincount(negatives.reshape(-1), minlength=5)[1:].double()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.02  # uniform over the other items


def _fixed_negatives(monkeypatch, negatives: torch.Tensor) -> None:
    monkeypatch.setattr("recsys_lab.modules.losses._uniform_negatives", lambda t, n, v: negatives)


def test_uniform_sampled_softmax_hand_computed(monkeypatch):
    _fixed_negatives(monkeypatch, torch.tensor([[2, 3], [1, 2]]))
    # position 0: target score 2, negatives 0 and 2; position 1: target 1, negatives 0 and 1
    expected = (-(2 - math.log(math.exp(2) + 1 + math.exp(2))) - (1 - math.log(math.e + 1 + math.e))) / 2
    got = UniformSampledSoftmaxLoss(n=2)(HIDDEN, TARGETS, ITEMS)
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_bce_and_gbce_hand_computed(monkeypatch):
    _fixed_negatives(monkeypatch, torch.tensor([[2], [1]]))
    # position 0: s+ = 2, s- = 0; position 1: s+ = 1, s- = 0
    pos, neg = [2.0, 1.0], [0.0, 0.0]
    bce = (
        sum(-log_sigmoid(p) - math.log(1 - 1 / (1 + math.exp(-n))) for p, n in zip(pos, neg, strict=True)) / 2
    )
    assert float(BCENegativeLoss(n=1)(HIDDEN, TARGETS, ITEMS)) == pytest.approx(bce, abs=1e-12)

    gbce = GBCELoss(n=1, t=0.5)
    alpha = 1 / (4 - 2)  # one negative among the V - 2 = 2 other items (code 0 excluded)
    beta = alpha * (0.5 * (1 - 1 / alpha) + 1 / alpha)
    assert gbce.beta(4) == pytest.approx(beta) == pytest.approx(0.75)
    expected = (
        sum(
            -beta * log_sigmoid(p) - math.log(1 - 1 / (1 + math.exp(-n)))
            for p, n in zip(pos, neg, strict=True)
        )
        / 2
    )
    assert float(gbce(HIDDEN, TARGETS, ITEMS)) == pytest.approx(expected, abs=1e-12)
    # t = 0 is plain BCE; t = 1 gives beta = alpha (calibrated to the whole catalogue)
    assert GBCELoss(n=1, t=0.0).beta(4) == pytest.approx(1.0) and GBCELoss(n=1, t=1.0).beta(
        4
    ) == pytest.approx(alpha)


def test_in_batch_softmax_is_the_two_tower_loss_on_target_items():
    log_q = torch.tensor([0.0, -1.0, -2.0, -0.5], dtype=torch.float64)
    got = InBatchSoftmaxLoss(logq_correction=True)(HIDDEN, TARGETS, ITEMS, log_q)
    want = SampledSoftmaxLoss(temperature=1.0, logq_correction=True)(HIDDEN, ITEMS[TARGETS], TARGETS, log_q)
    assert float(got) == pytest.approx(float(want), abs=1e-12)
    # by hand: logits q_i . v_j - log q_j; row 0: [2 + 1, 2 + 0.5], row 1: [0 + 1, 1 + 0.5]
    hand = (-(3 - math.log(math.exp(3) + math.exp(2.5))) - (1.5 - math.log(math.exp(1) + math.exp(1.5)))) / 2
    assert float(got) == pytest.approx(hand, abs=1e-12)
    with pytest.raises(ValueError, match="needs log_q"):
        InBatchSoftmaxLoss()(HIDDEN, TARGETS, ITEMS, None)


def test_bpr_hand_computed():
    positive = torch.tensor([2.0, 0.0], dtype=torch.float64)
    negative = torch.tensor([[1.0, 3.0], [0.0, -1.0]], dtype=torch.float64)
    expected = -(log_sigmoid(1) + log_sigmoid(-1) + log_sigmoid(0) + log_sigmoid(1)) / 4
    assert float(BPRLoss()(positive, negative)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: UniformSampledSoftmaxLoss(n=0), r"loss\.n=0"),
        (lambda: BCENegativeLoss(n=0), r"loss\.n=0"),
        (lambda: GBCELoss(n=4, t=1.5), r"loss\.t=1\.5"),
    ],
)
def test_bad_loss_settings_name_their_key(make, message):
    with pytest.raises(ValueError, match=message):
        make()
