"""Figures for one training run (metric@K curves, calibration, score histograms, popularity bias, learning
curves) and for a comparison of models (bars with confidence intervals).

Every function draws on its own `matplotlib.figure.Figure` (no pyplot): there is no global figure state, so
the plots are safe to draw from a training process, a thread or a test, and need no display (savefig renders
PNG with Agg whatever the backend). Each writes one PNG, creating the parent folders, and returns the path.
Empty or mismatched inputs are a ValueError that names the argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 120


def _save(fig: Figure, path: str | Path) -> Path:
    """Write the figure as PNG and drop it (a Figure without pyplot is freed once unreferenced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    fig.clear()
    return path


def _vector(name: str, values, dtype=float) -> np.ndarray:
    array = np.asarray(values, dtype=dtype).reshape(-1)
    if array.size == 0:
        raise ValueError(f"plots: `{name}` is empty; expected at least one value")
    return array


def _same_length(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if len(a) != len(b):
        raise ValueError(
            f"plots: `{name_a}` has {len(a)} values but `{name_b}` has {len(b)}; expected equal lengths"
        )


def metric_curves(curves: dict[str, Sequence[float]], ks: Sequence[int], path, title: str = "") -> Path:
    """One line per metric (recall, ndcg, hit, ...) against the cut-off K: `curves[name][i]` is metric@ks[i]."""
    if not curves:
        raise ValueError("plots: `curves` is empty; expected {metric name: values at each K}")
    ks_array = _vector("ks", ks)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for name, values in curves.items():
        values = _vector(f"curves[{name!r}]", values)
        _same_length(f"curves[{name!r}]", values, "ks", ks_array)
        ax.plot(ks_array, values, marker="." if len(ks_array) <= 30 else None, label=name)
    ax.set_xlabel("K (length of the recommendation list)")
    ax.set_ylabel("metric@K")
    ax.set_title(title or "Ranking metrics by cut-off K")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _binary_inputs(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = _vector("probs", probs)
    labels = _vector("labels", labels)
    _same_length("probs", probs, "labels", labels)
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise ValueError("plots: `probs` must be finite probabilities in [0, 1]")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("plots: `labels` must be 0 or 1")
    return probs, labels


def _calibration_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int):
    """Per equal-width bin on [0, 1]: count, mean predicted probability and observed positive rate.

    Bin b holds the probabilities in [b/n, (b+1)/n), and a probability of exactly 1 gets a bin of its own
    (index n): the boundaries of torchmetrics' `_binning_bucketize` (`torch.bucketize(p, linspace(0, 1, n + 1),
    right=True) - 1`), so that the ECE here equals BinaryCalibrationError's. Empty bins hold NaN.
    """
    if n_bins < 1:
        raise ValueError(f"plots: `n_bins` is {n_bins}; expected at least 1")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges, probs, side="right") - 1
    counts = np.bincount(index, minlength=n_bins + 1)
    conf_sum = np.bincount(index, weights=probs, minlength=n_bins + 1)
    pos_sum = np.bincount(index, weights=labels, minlength=n_bins + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = conf_sum / counts
        accuracy = pos_sum / counts
    return counts, confidence, accuracy


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum over bins of (n_bin / N) · |acc_bin − conf_bin|, equal-width bins on [0, 1], where conf is
    the mean predicted probability of the positive class and acc the observed positive rate of the bin
    (torchmetrics' BinaryCalibrationError(norm="l1"))."""
    probs, labels = _binary_inputs(probs, labels)
    counts, confidence, accuracy = _calibration_bins(probs, labels, n_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] / len(probs) * np.abs(accuracy[filled] - confidence[filled])))


def calibration(probs: np.ndarray, labels: np.ndarray, path, n_bins: int = 15) -> Path:
    """Reliability diagram: per non-empty bin, the observed positive rate against the mean predicted
    probability (a calibrated model lies on the diagonal), with the share of samples per bin below."""
    probs, labels = _binary_inputs(probs, labels)
    counts, confidence, accuracy = _calibration_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    filled = counts > 0
    fig = Figure(figsize=(5.5, 6.0))
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.plot(confidence[filled], accuracy[filled], marker="o", label="model")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed positive rate")
    ax.set_title(f"Reliability diagram (ECE = {ece:.4f}, {n_bins} bins, N = {len(probs)})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # the bin of probabilities equal to 1 is drawn with the last bin
    shares = np.append(counts[: n_bins - 1], counts[n_bins - 1 :].sum()) / len(probs)
    ax_count.bar(edges[:-1], shares, width=1.0 / n_bins, align="edge", edgecolor="white")
    ax_count.set_xlabel("mean predicted probability")
    ax_count.set_ylabel("share of samples")
    return _save(fig, path)


def score_distributions(scores: np.ndarray, labels: np.ndarray, path, title: str = "") -> Path:
    """Density histograms of the scores of positives and of negatives, on the same bins."""
    scores = _vector("scores", scores)
    labels = _vector("labels", labels)
    _same_length("scores", scores, "labels", labels)
    if not np.all(np.isfinite(scores)):
        raise ValueError("plots: `scores` must be finite")
    positive = labels > 0.5
    bins = np.histogram_bin_edges(scores, bins=50)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for mask, name in ((~positive, "negatives"), (positive, "positives")):
        if mask.any():
            ax.hist(scores[mask], bins=bins, density=True, alpha=0.55, label=f"{name} (n = {mask.sum()})")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title or "Score distributions of positives and negatives")
    ax.legend()
    return _save(fig, path)


def top_share(train_counts: np.ndarray, rec_counts: np.ndarray, fraction: float = 0.2) -> float:
    """Share of all recommendations that go to the `fraction` most popular items by training interactions
    (ties broken by item index); NaN when nothing was recommended."""
    n_top = max(1, round(fraction * len(train_counts)))  # rounded as the evaluation's popularity bands are
    top = np.argsort(-train_counts, kind="stable")[:n_top]
    total = rec_counts.sum()
    return float(rec_counts[top].sum() / total) if total > 0 else math.nan


def popularity_bias(train_counts: np.ndarray, rec_counts: np.ndarray, path, k: int | None = None) -> Path:
    """One point per catalogue item: training interactions against times recommended in the top-k lists,
    both + 1 on log axes so that items at zero stay visible on the axis' first decade."""
    train_counts = _vector("train_counts", train_counts)
    rec_counts = _vector("rec_counts", rec_counts)
    _same_length("train_counts", train_counts, "rec_counts", rec_counts)
    if (train_counts < 0).any() or (rec_counts < 0).any():
        raise ValueError("plots: `train_counts` and `rec_counts` must be non-negative counts")
    share = top_share(train_counts, rec_counts)
    top_k = f"top-{k}" if k else "top-k"
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.scatter(train_counts + 1, rec_counts + 1, s=6, alpha=0.4, linewidths=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training interactions + 1")
    ax.set_ylabel(f"times in {top_k} lists + 1")
    ax.set_title(
        f"Popularity bias: {share:.1%} of {top_k} recommendations go to the 20% most popular items"
        if not math.isnan(share)
        else "Popularity bias: no recommendations",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="major")
    return _save(fig, path)


def training_curves(history: list[dict[str, float]], path) -> Path:
    """Per-epoch values: train/* losses in one subplot and val/* metrics in another, x = epoch.
    Each series is drawn over the epochs that logged it (a key missing from an epoch leaves a gap)."""
    if not history:
        raise ValueError("plots: `history` is empty; expected one dict per epoch with an 'epoch' key")
    if any("epoch" not in row for row in history):
        raise ValueError("plots: every `history` row needs an 'epoch' key")
    keys = sorted({key for row in history for key in row if key != "epoch"})
    groups = {
        "train": [k for k in keys if k.startswith("train/")],
        "val": [k for k in keys if k.startswith("val/")],
    }
    if not groups["train"] and not groups["val"]:
        raise ValueError(f"plots: `history` has no 'train/...' or 'val/...' keys (found {keys})")
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, (stage, names) in zip(axes, groups.items(), strict=True):
        for name in names:
            points = [(row["epoch"], row[name]) for row in history if row.get(name) is not None]
            epochs, values = zip(*points, strict=True)
            ax.plot(epochs, values, marker="." if len(points) <= 50 else None, label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_title("training loss" if stage == "train" else "validation metrics")
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {stage}/ values logged", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def bar_chart_ci(
    labels: Sequence[str],
    means: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    metric: str,
    path,
) -> Path:
    """One bar per model at its mean, with an asymmetric error bar over its confidence interval [low, high];
    a NaN bound (a single run) draws no error bar."""
    labels = [str(label) for label in labels]
    if not labels:
        raise ValueError("plots: `labels` is empty; expected one label per model")
    means = _vector("means", means)
    lows = np.asarray(lows, dtype=float).reshape(-1)
    highs = np.asarray(highs, dtype=float).reshape(-1)
    for name, values in (("means", means), ("lows", lows), ("highs", highs)):
        if len(values) != len(labels):
            raise ValueError(f"plots: `{name}` has {len(values)} values for {len(labels)} labels")
    missing = np.isnan(lows) | np.isnan(highs)
    # matplotlib wants distances below and above the bar; zero length hides the bar of a NaN interval
    below = np.where(missing, 0.0, means - lows)
    above = np.where(missing, 0.0, highs - means)
    positions = np.arange(len(labels))
    fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 2), 4.2))
    ax = fig.add_subplot()
    ax.bar(positions, means, color="tab:blue", alpha=0.8)
    shown = ~missing
    if shown.any():
        ax.errorbar(
            positions[shown],
            means[shown],
            yerr=np.vstack([below[shown], above[shown]]),
            fmt="none",
            ecolor="black",
            capsize=4,
        )
    rotate = max(map(len, labels)) > 8
    ax.set_xticks(positions, labels, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean and 95% confidence interval over seeds")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
