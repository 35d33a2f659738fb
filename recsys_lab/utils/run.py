"""Run plumbing for `train.py` and `scripts/evaluate.py`: callbacks and loggers from config, what a run
records (metadata in checkpoints, the training setup, reference metrics) and its results table."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger


def instantiate_callbacks(cfg: DictConfig | None) -> list[pl.Callback]:
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c and "_target_" in c]


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c and "_target_" in c]


class RunMetadata(pl.Callback):
    """Stamps every checkpoint with the run's resolved config, git commit and data fingerprint, so
    `scripts/evaluate.py` can rebuild the exact model and data from the checkpoint alone."""

    def __init__(self, info: dict) -> None:
        self.info = info

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["recsys_lab_run"] = self.info


def stage_metrics(trainer: pl.Trainer, view, stage: str) -> tuple[dict[str, float], dict[str, float]]:
    """What the last `trainer.test`/`validate` logged for `stage`, and the reference scores (oracle and
    popularity AUC) on the same rows when the view scores the stage on logged impressions."""
    from recsys_lab.metrics.reference import reference_aucs

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
    # the test analysis's slices and gaps, handed to the loggers directly (RecTask._log_stage)
    extra = getattr(trainer.lightning_module, "analysis_metrics", None) or {}
    metrics |= {k: v for k, v in extra.items() if k.startswith(f"{stage}/")}
    reference = {}
    scored = view.reference_scores(stage)
    if scored is not None:
        labels, scores = scored
        reference = {f"{stage}/{k}": v for k, v in reference_aucs(labels, scores).items()}
    return metrics, reference


def training_summary(trainer: pl.Trainer, datamodule) -> dict[str, Any]:
    """How many rows one optimizer step sees, across processes: what DDP silently changes.

    Under DDP each of the `world_size` processes trains on its own `batch_size` rows, so one step sees the
    global batch and an epoch has world_size times fewer steps at the same learning rate (two-tower in-batch
    negatives are gathered from every process). Keep runs comparable by holding the global batch fixed
    (`data.batch_size` = single-process batch / world_size) or by scaling the learning rate with it.
    """
    world = int(trainer.world_size)
    accumulate = int(trainer.accumulate_grad_batches)
    examples = len(datamodule.view.train_dataset())
    per_step = datamodule.batch_size * world * accumulate
    summary = {
        "world_size": world,
        "batch_size_per_process": datamodule.batch_size,
        "accumulate_grad_batches": accumulate,
        "global_batch": per_step,
        "train_examples": examples,
        "optimizer_steps_per_epoch": math.ceil(
            math.ceil(examples / (datamodule.batch_size * world)) / accumulate
        ),
    }
    if datamodule.negatives is not None and type(datamodule.view).__name__ == "CTRView":
        summary["rows_per_example"] = 1 + datamodule.negatives.n  # a positive and its sampled negatives
    return summary


def best_score(trainer: pl.Trainer) -> float | None:
    callback = trainer.checkpoint_callback
    if callback is None or callback.best_model_score is None:
        return None
    value = float(callback.best_model_score)
    return None if math.isnan(value) else value


def monitor_mode(trainer: pl.Trainer, monitor: str) -> str:
    """ "max" or "min" for `monitor`: the checkpoint callback's mode, so the best epoch of the timing is the
    checkpointed one; without that callback, "min" for a loss and "max" otherwise."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.monitor == monitor:
        return callback.mode
    return "min" if monitor.endswith("loss") else "max"


def package_versions(packages: dict[str, str]) -> dict[str, str]:
    """{label: the installed version of its distribution} ("not installed" when missing): what a service or an
    export records about the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for label, distribution in packages.items():
        try:
            out[label] = version(distribution)
        except PackageNotFoundError:
            out[label] = "not installed"
    return out


def git_commit() -> str:
    """HEAD of the code's repository, with '+dirty' when there are uncommitted changes; 'unknown' outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (subprocess.SubprocessError, OSError):
        return "unknown"


def write_results(results: dict, output_dir: Path) -> Path:
    """results.json in the run directory, and a table on the console."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print_results(results)
    return path


def print_results(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"results: {results.get('model')} ({results.get('task')})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    sliced: dict[str, dict[str, float]] = {}  # "test/slice/<grouping>/<group>" -> {metric: value}
    for key, value in sorted(results["metrics"].items()):
        if "/slice/" in key:
            row, metric = key.rsplit("/", 1)
            sliced.setdefault(row, {})[metric] = value
        else:
            table.add_row(key, f"{value:.4f}")
    protocol = Table(title="protocol")
    protocol.add_column("key")
    protocol.add_column("value")
    for key, value in results.get("protocol", {}).items():
        protocol.add_row(key, str(value))
    for key, value in (results.get("training") or {}).items():
        protocol.add_row(f"training.{key}", str(value))
    for key in ("seed", "git_commit", "data_fingerprint", "best_checkpoint", "output_dir"):
        protocol.add_row(key, str(results.get(key)))
    console = Console(width=120)
    console.print(table)
    if sliced:
        console.print(_slice_table(sliced))
    console.print(protocol)


def _slice_table(sliced: dict[str, dict[str, float]]):
    """The slices as one row per group (the size first, then each metric), in the order they were logged."""
    from rich.table import Table

    metrics = list(dict.fromkeys(m for values in sliced.values() for m in values))
    sizes = [m for m in metrics if m in ("queries", "impressions")]
    table = Table(title="slices (test/slice/<grouping>/<group>; gaps are test/gap/...)")
    table.add_column("grouping / group")
    for metric in sizes + [m for m in metrics if m not in sizes]:
        table.add_column(metric, justify="right")
    for row, values in sliced.items():
        cells = [values.get(m) for m in sizes + [m for m in metrics if m not in sizes]]
        name = row.split("/slice/", 1)[1]
        table.add_row(
            name,
            *[
                "" if v is None else f"{v:.0f}" if m in sizes else f"{v:.4f}"
                for m, v in zip(sizes + [m for m in metrics if m not in sizes], cells, strict=True)
            ],
        )
    return table
