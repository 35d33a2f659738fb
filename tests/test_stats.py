"""recsys_lab.analysis.stats: intervals that cover, p-values equal to scipy's, corrections worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from recsys_lab.analysis import stats


def test_mean_ci_equals_scipy_t_interval():
    values = [0.21, 0.25, 0.19, 0.23, 0.22]
    mean, low, high, n = stats.mean_ci(values)
    expected = scipy_stats.t.interval(0.95, 4, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert n == 5 and mean == pytest.approx(0.22, abs=1e-15)
    assert (low, high) == pytest.approx(expected, rel=1e-13)
    _, low90, high90, _ = stats.mean_ci(values, confidence=0.9)
    assert low < low90 < high90 < high


def test_mean_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    samples = rng.normal(loc=3.0, scale=2.0, size=(2000, 5))
    covered = [low <= 3.0 <= high for _, low, high, _ in map(stats.mean_ci, samples)]
    assert 0.93 <= np.mean(covered) <= 0.97


def test_mean_ci_of_one_value_has_no_interval_and_equal_values_a_point():
    mean, low, high, n = stats.mean_ci([0.3])
    assert (mean, n) == (0.3, 1) and math.isnan(low) and math.isnan(high)
    assert stats.mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5, 3)


@pytest.mark.parametrize(
    "values, confidence, message",
    [
        ([0.1, math.nan, 0.3], 0.95, r"values contains NaN at positions \[1\]"),
        ([], 0.95, "values is empty"),
        ([0.1, 0.2], 1.0, "confidence is 1.0"),
    ],
)
def test_mean_ci_errors(values, confidence, message):
    with pytest.raises(ValueError, match=message):
        stats.mean_ci(values, confidence)


def test_paired_tests_equal_scipy_and_the_formulas():
    a = np.array([0.31, 0.52, 0.18, 0.66, 0.40, 0.25, 0.55, 0.49])
    b = np.array([0.28, 0.46, 0.20, 0.58, 0.33, 0.27, 0.51, 0.40])
    result = stats.paired_tests(a, b)
    t = scipy_stats.ttest_rel(a, b)
    w = scipy_stats.wilcoxon(a, b)
    assert result["t"] == t.statistic and result["p_t"] == t.pvalue
    assert result["w"] == w.statistic and result["p_wilcoxon"] == w.pvalue
    # by hand: d = a - b, t = mean(d) / (sd(d) / sqrt(8)) on 7 degrees of freedom
    d = a - b
    assert result["n"] == 8 and result["mean_diff"] == pytest.approx(d.mean())
    t_by_hand = d.mean() / (d.std(ddof=1) / math.sqrt(8))
    assert result["t"] == pytest.approx(t_by_hand) and result["p_t"] == pytest.approx(
        2 * scipy_stats.t.sf(t_by_hand, 7)
    )
    # d = .03 .06 -.02 .08 .07 -.02 .04 .09: the negatives hold ranks 1 and 2 (sum W = 3); the subsets of
    # ranks 1..8 summing to <= 3 are {}, {1}, {2}, {3}, {1, 2}: exact two-sided p = 2 * 5 / 2^8
    assert result["w"] == 3.0 and result["p_wilcoxon"] == pytest.approx(10 / 256)


def test_paired_tests_with_ties_and_zeros_equal_scipy():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, size=300).astype(float)  # hit@10 of 300 queries: many zero differences and ties
    b = np.where(rng.uniform(size=300) < 0.2, 1 - a, a)
    result = stats.paired_tests(a, b)
    assert result["p_t"] == scipy_stats.ttest_rel(a, b).pvalue
    assert result["p_wilcoxon"] == scipy_stats.wilcoxon(a, b).pvalue


def test_paired_tests_without_any_difference_give_p_one():
    result = stats.paired_tests([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert result["p_t"] == 1.0 and result["p_wilcoxon"] == 1.0 and result["mean_diff"] == 0.0


@pytest.mark.parametrize(
    "a, b, message",
    [
        ([0.1, 0.2], [0.1], "a has 2 values and b has 1"),
        ([0.1, math.nan], [0.1, 0.2], "a contains NaN"),
        ([0.1, 0.2], [0.1, math.inf], "b contains an infinite value"),
        ([0.1], [0.2], "at least 2 pairs"),
    ],
)
def test_paired_tests_errors(a, b, message):
    with pytest.raises(ValueError, match=message):
        stats.paired_tests(a, b)


def test_holm_by_hand():
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> running max 0.06
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    # capped at 1: 0.4 x 3 = 1.2
    np.testing.assert_allclose(stats.holm([0.4, 0.5, 0.6]), [1.0, 1.0, 1.0])


def test_benjamini_hochberg_by_hand_and_equal_to_scipy():
    # sorted: 0.005 x4/1 = 0.02, 0.01 x4/2 = 0.02, 0.03 x4/3 = 0.04, 0.04 x4/4 = 0.04 -> running min from the top
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(stats.benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = rng.uniform(size=rng.integers(1, 30)) ** 3
        np.testing.assert_allclose(
            stats.benjamini_hochberg(p), scipy_stats.false_discovery_control(p, method="bh"), rtol=1e-12
        )


def test_adjust_dispatches_and_names_the_choices():
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_array_equal(stats.adjust(p, "holm"), stats.holm(p))
    np.testing.assert_array_equal(stats.adjust(p, "bh"), stats.benjamini_hochberg(p))
    np.testing.assert_array_equal(stats.adjust(p, "none"), p)
    assert stats.adjust([], "holm").shape == (0,)
    with pytest.raises(
        ValueError, match="correction 'bonferroni' is unknown; expected one of holm, bh, none"
    ):
        stats.adjust(p, "bonferroni")
    with pytest.raises(ValueError, match=r"pvalues must lie in \[0, 1\]"):
        stats.holm([0.5, 1.5])
    with pytest.raises(ValueError, match="pvalues contains NaN"):
        stats.benjamini_hochberg([0.5, math.nan])
