"""Statistics for comparing models: confidence intervals over seeds, paired tests over test queries, and
multiple-testing corrections. Pure functions on numbers (numpy and scipy); each docstring gives its formula.

Bad input (NaN, mismatched lengths, an unknown method) is a ValueError that names what was wrong: a NaN
dropped silently would change a published table without anyone noticing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats

CORRECTIONS = ("holm", "bh", "none")


def _finite_vector(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN at positions {np.flatnonzero(np.isnan(array)).tolist()[:10]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains an infinite value")
    return array


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, int]:
    """Mean and Student-t confidence interval of the mean: (mean, low, high, n).

        low, high = mean ∓ t_{(1 + c) / 2, n − 1} · s / √n,   s = sample standard deviation (n − 1)

    One value has no interval: (v, nan, nan, 1). NaN is an error, not dropped.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence is {confidence}; expected a level strictly between 0 and 1")
    array = _finite_vector("values", values)
    n = len(array)
    if n == 0:
        raise ValueError("values is empty; expected at least one value")
    mean = float(array.mean())
    if n == 1:
        return mean, math.nan, math.nan, 1
    half_width = scipy_stats.t.ppf((1 + confidence) / 2, n - 1) * array.std(ddof=1) / math.sqrt(n)
    return mean, float(mean - half_width), float(mean + half_width), n


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired tests of a against b on the same queries (a[i] and b[i] measured on query i).

    - paired t-test (`scipy.stats.ttest_rel`): t = mean(d) / (s_d / √n), d = a − b, n − 1 degrees of freedom;
    - Wilcoxon signed-rank (`scipy.stats.wilcoxon`, two-sided, scipy's defaults: zero differences dropped,
      the exact distribution for small samples without ties and the normal approximation otherwise).

    When every difference is zero there is no evidence of a difference: both p-values are 1.0 (scipy would
    give NaN for t and raise for Wilcoxon). Returns {"n", "mean_diff", "t", "p_t", "w", "p_wilcoxon"}.
    """
    a = _finite_vector("a", a)
    b = _finite_vector("b", b)
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} values and b has {len(b)}; paired tests need one pair per query")
    if len(a) < 2:
        raise ValueError(f"paired tests need at least 2 pairs; got {len(a)}")
    diff = a - b
    result = {"n": len(a), "mean_diff": float(diff.mean())}
    if not diff.any():
        return result | {"t": 0.0, "p_t": 1.0, "w": 0.0, "p_wilcoxon": 1.0}
    t = scipy_stats.ttest_rel(a, b)
    w = scipy_stats.wilcoxon(a, b, alternative="two-sided")
    return result | {
        "t": float(t.statistic),
        "p_t": float(t.pvalue),
        "w": float(w.statistic),
        "p_wilcoxon": float(w.pvalue),
    }


def _pvalues(pvalues) -> np.ndarray:
    p = _finite_vector("pvalues", pvalues)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"pvalues must lie in [0, 1]; got {p[(p < 0) | (p > 1)].tolist()[:5]}")
    return p


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values, in the input order.

    With p_(1) ≤ … ≤ p_(m) sorted ascending: p̃_(i) = min(1, max_{j ≤ i} (m − j + 1) · p_(j)). Rejecting
    p̃ < α controls the family-wise error rate at α under any dependence.
    """
    p = _pvalues(pvalues)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]  # (m - j + 1) p_(j) with j from 1
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg step-up adjusted p-values (q-values), in the input order.

    With p_(1) ≤ … ≤ p_(m) sorted ascending: p̃_(i) = min(1, min_{j ≥ i} m · p_(j) / j). Rejecting p̃ < α
    controls the false discovery rate at α for independent or positively dependent tests; equals
    `scipy.stats.false_discovery_control(p, method="bh")`.
    """
    p = _pvalues(pvalues)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = m * p[order] / np.arange(1, m + 1)
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return adjusted


def adjust(pvalues: Sequence[float], method: str) -> np.ndarray:
    """The p-values adjusted for multiple testing: "holm" (family-wise error), "bh" (false discovery rate)
    or "none" (returned as they are)."""
    if method == "holm":
        return holm(pvalues)
    if method == "bh":
        return benjamini_hochberg(pvalues)
    if method == "none":
        return _pvalues(pvalues)
    raise ValueError(f"correction '{method}' is unknown; expected one of {', '.join(CORRECTIONS)}")
