"""recsys_lab.analysis.plots: every figure writes a real PNG; the ECE equals torchmetrics'; bad input is named."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryCalibrationError

from recsys_lab.analysis import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, expected):
    assert path == expected
    data = expected.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024


def test_metric_curves(tmp_path):
    ks = list(range(1, 101))
    curves = {
        name: np.sqrt(np.arange(1, 101) / 100) * scale for name, scale in [("recall", 0.5), ("ndcg", 0.3)]
    }
    target = tmp_path / "nested" / "curves.png"  # the parent folder is created
    assert_png(plots.metric_curves(curves, ks, target, title="SASRec on ML-100k"), target)


def test_calibration_and_score_distributions(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=2000)
    labels = (rng.uniform(size=2000) < probs**2).astype(float)
    assert_png(plots.calibration(probs, labels, tmp_path / "cal.png"), tmp_path / "cal.png")
    scores = rng.normal(size=2000) + 2 * labels
    assert_png(plots.score_distributions(scores, labels, tmp_path / "s.png", "DIN"), tmp_path / "s.png")


@pytest.mark.parametrize("n_bins", [15, 7])
def test_expected_calibration_error_equals_torchmetrics(n_bins):
    rng = np.random.default_rng(n_bins)
    probs = rng.uniform(size=5000)
    probs[:20] = 1.0  # torchmetrics puts a probability of exactly 1 in a bin of its own
    probs[20:40] = 0.0
    labels = (rng.uniform(size=5000) < probs**1.5).astype(float)
    expected = BinaryCalibrationError(n_bins=n_bins, norm="l1")(
        torch.tensor(probs, dtype=torch.float64), torch.tensor(labels, dtype=torch.int64)
    )
    assert plots.expected_calibration_error(probs, labels, n_bins) == pytest.approx(
        float(expected), abs=1e-12
    )


def test_expected_calibration_error_by_hand():
    # bins of width 0.5: [0.2, 0.4] -> conf 0.3, acc 0.5; [0.6, 0.8] -> conf 0.7, acc 1.0
    ece = plots.expected_calibration_error([0.2, 0.4, 0.6, 0.8], [0, 1, 1, 1], n_bins=2)
    assert ece == pytest.approx(0.5 * 0.2 + 0.5 * 0.3)


def test_popularity_bias_and_top_share(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.zipf(1.5, size=500).astype(float)
    train[:50] = 0
    recs = np.where(train > 3, train, 0)
    assert_png(plots.popularity_bias(train, recs, tmp_path / "pop.png", k=10), tmp_path / "pop.png")
    # items 0..9: the 2 most popular (20%) get 6 + 2 of 10 recommendations
    share = plots.top_share(np.arange(10.0), np.array([0, 0, 0, 0, 0, 0, 0, 2, 2, 6.0]))
    assert share == pytest.approx(0.8)
    assert math.isnan(plots.top_share(np.arange(3.0), np.zeros(3)))


def test_training_curves_allow_missing_keys(tmp_path):
    history = [
        {"epoch": 0, "train/loss": 0.9},
        {"epoch": 1, "train/loss": 0.7, "val/ndcg@10": 0.10, "val/recall@10": 0.2},
        {"epoch": 2, "train/loss": 0.6, "val/ndcg@10": 0.12},
    ]
    assert_png(plots.training_curves(history, tmp_path / "t.png"), tmp_path / "t.png")
    only_val = [{"epoch": 0, "val/auc": 0.7}, {"epoch": 1, "val/auc": 0.72}]
    assert_png(plots.training_curves(only_val, tmp_path / "v.png"), tmp_path / "v.png")


def test_bar_chart_ci_with_a_single_run_without_interval(tmp_path):
    path = plots.bar_chart_ci(
        ["sasrec", "gru4rec", "bert4rec"],
        [0.21, 0.18, 0.19],
        [0.20, 0.17, math.nan],
        [0.22, 0.19, math.nan],
        "test/ndcg@10",
        tmp_path / "bar.png",
    )
    assert_png(path, tmp_path / "bar.png")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: plots.metric_curves({}, [1, 2], p), "`curves` is empty"),
        (lambda p: plots.metric_curves({"recall": [0.1]}, [1, 2], p), "has 1 values but `ks` has 2"),
        (lambda p: plots.calibration([], [], p), "`probs` is empty"),
        (lambda p: plots.calibration([0.5, 1.5], [0, 1], p), r"probabilities in \[0, 1\]"),
        (lambda p: plots.score_distributions([0.1, 0.2], [1], p), "`scores` has 2 values but `labels` has 1"),
        (lambda p: plots.popularity_bias([], [], p), "`train_counts` is empty"),
        (lambda p: plots.training_curves([], p), "`history` is empty"),
        (lambda p: plots.training_curves([{"epoch": 0, "lr": 1.0}], p), "no 'train/...' or 'val/...'"),
        (lambda p: plots.bar_chart_ci([], [], [], [], "m", p), "`labels` is empty"),
        (lambda p: plots.bar_chart_ci(["a"], [1.0], [0.0, 1.0], [2.0], "m", p), "`lows` has 2 values"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
