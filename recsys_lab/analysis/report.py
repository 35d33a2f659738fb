"""What a run leaves behind for the paper beyond results.json: per-query values, curves and plots, and the
record of where it ran (`environment`), written by `train.py` at the end of a run.

Files in the run directory:

- `per_query.parquet`: one row per test query (ranking; CTR: per test user) with every metric — the input of
  the paired tests of `scripts/compare.py`;
- `curves.json`: metric@K for K = 1..`evaluation.curves_max_k` (ranking);
- `plots/*.png`: metric@K curves and recommendation frequency against item popularity (ranking); calibration
  curve and score distributions of positives and negatives (CTR); training curves (both).

W&B: the plots are logged as images and the per-query file is saved with the run, so that
`scripts/compare.py --wandb-group` finds it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_lab.analysis.evaluation import TestAnalysis

PACKAGES = {
    "torch": "torch",
    "pytorch_lightning": "pytorch-lightning",
    "hydra": "hydra-core",
    "torchmetrics": "torchmetrics",
    "transformers": "transformers",
    "polars": "polars",
    "numpy": "numpy",
    "scipy": "scipy",
    "wandb": "wandb",
}


def environment(deterministic: bool | str | None = None) -> dict[str, Any]:
    """Where the run ran: Python, OS, CPU, GPU, threads, library versions and the determinism setting."""
    from recsys_lab.utils.run import package_versions

    gpu = None
    if torch.cuda.is_available():
        gpu = {
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        }
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "deterministic": deterministic,
        "packages": package_versions(PACKAGES),
    }


def cpu_name() -> str:
    """The CPU model (Linux reads /proc/cpuinfo; elsewhere platform.processor(), else the machine type)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def save_analysis(
    analysis: TestAnalysis, output_dir: str | Path, history: list[dict[str, float]]
) -> dict[str, str]:
    """Write the test analysis's files (and plots, with `evaluation.plots`) into the run directory; returns
    the paths written by name. `history` is the per-epoch record of `TrainingClock` (the training curves)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results, spec = analysis.results, analysis.spec
    written: dict[str, str] = {}
    if "per_query" in results:
        path = output_dir / "per_query.parquet"
        results["per_query"].write_parquet(path)
        written["per_query"] = str(path)
    if "curves" in results:
        path = output_dir / "curves.json"
        path.write_text(json.dumps(results["curves"]))
        written["curves"] = str(path)
    if spec.plots:
        written |= _plots(analysis, output_dir / "plots", history)
    return written


def _plots(analysis: TestAnalysis, folder: Path, history: list[dict[str, float]]) -> dict[str, str]:
    from recsys_lab.analysis import plots

    results, out = analysis.results, {}
    if "curves" in results:
        curves = results["curves"]
        metrics = {m: curves[m] for m in ("recall", "ndcg", "hit", "precision", "mrr")}
        out["plot_metric_at_k"] = plots.metric_curves(
            metrics, curves["k"], folder / "metric_at_k.png", "test"
        )
    if "exposure" in results:
        k, exposure = results["exposure"]
        counts = analysis.data.item_counts.numpy()
        # code 0 is the unknown item: never recommended, not a catalogue item
        out["plot_popularity_bias"] = plots.popularity_bias(
            counts[1:], exposure[1:], folder / "popularity_bias.png", k=k
        )
    if "predictions" in results:
        logits, labels = results["predictions"]
        probs = 1.0 / (1.0 + np.exp(-logits))
        out["plot_calibration"] = plots.calibration(
            probs, labels, folder / "calibration.png", n_bins=analysis.spec.calibration_bins
        )
        out["plot_score_distributions"] = plots.score_distributions(
            logits, labels, folder / "score_distributions.png", "test logits"
        )
    # the losses, and the validation metrics at the smallest cut-off (all of them would crowd the figure)
    k = f"@{analysis.ks[0]}"
    curves = [
        {n: v for n, v in epoch.items() if n == "epoch" or n.startswith("train/") or _headline(n, k)}
        for epoch in history
    ]
    if any(len(epoch) > 1 for epoch in curves):
        out["plot_training_curves"] = plots.training_curves(curves, folder / "training_curves.png")
    return {k: str(v) for k, v in out.items()}


def _headline(name: str, k: str) -> bool:
    """A validation metric the training-curves plot shows: unsliced, at the smallest cut-off or without one."""
    if not name.startswith("val/") or name.count("/") > 1:
        return False
    return "@" not in name or name.endswith(k)


def log_to_loggers(loggers: list, written: dict[str, str]) -> None:
    """The plots as W&B images and the per-query file saved with the W&B run (other loggers: nothing)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        for name, path in written.items():
            if name.startswith("plot_"):
                logger.log_image(key=f"plots/{name[5:]}", images=[path])
        if "per_query" in written:
            run = logger.experiment
            if hasattr(run, "save"):
                run.save(written["per_query"], base_path=str(Path(written["per_query"]).parent), policy="now")
