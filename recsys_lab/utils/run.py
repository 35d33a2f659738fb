"""Run plumbing for `train.py` and `scripts/evaluate.py`: config checks, loggers, callbacks, results."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what was expected."""


def validate_config(cfg: DictConfig) -> None:
    """Reject values Lightning or torch would accept with a surprising meaning (max_epochs=-1 trains forever),
    or reject only after the data is prepared (a negative learning rate)."""
    trainer = cfg.get("trainer") or {}
    for key in ("max_epochs", "min_epochs"):
        value = trainer.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"trainer.{key}={value}: expected a positive integer (or null)")
    if cfg.get("seed") is not None and not isinstance(cfg.seed, int):
        raise ConfigError(f"seed={cfg.seed}: expected an integer")
    optimizer = (cfg.get("model") or {}).get("optimizer") or {}
    lr = optimizer.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ConfigError(f"model.optimizer.lr={lr}: expected a positive number")


def check_optimizer(task: pl.LightningModule) -> None:
    """Build the optimizer (and scheduler) once, so a bad argument stops before training with its key."""
    try:
        task.configure_optimizers()
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.optimizer / model.scheduler: {err}") from None


def check_metric_names(cfg: DictConfig, task) -> None:
    """`monitor` (and `optimized_metric`) must be something the task logs: checked before training."""
    logged = task.metric_names("val")
    allowed = [*logged, "train/loss"]
    if cfg.monitor not in allowed:
        raise ConfigError(f"monitor={cfg.monitor}: this run logs {allowed}; choose one of them (or null)")
    metric = cfg.get("optimized_metric")
    if metric is not None and metric not in [*allowed, *task.metric_names("test")]:
        raise ConfigError(f"optimized_metric={metric}: this run logs {allowed} and their test/ versions")


def load_checkpoint(path: str) -> dict:
    """A checkpoint file read safely (`weights_only=True`); ConfigError naming `ckpt_path` if it is missing,
    truncated or not a PyTorch checkpoint."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"ckpt_path={path}: no such checkpoint file")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        # Only the error's kind: torch's own text suggests `weights_only=False`, never safe for an unknown file.
        raise ConfigError(
            f"ckpt_path={path}: not a readable checkpoint ({type(err).__name__}: the file is truncated, corrupt "
            "or not a PyTorch Lightning checkpoint written by train.py)"
        ) from None


def user_error_message(err: BaseException) -> str | None:
    """One line for errors caused by input (config values, files, caches, checkpoints); None for bugs.

    Errors raised deliberately by recsys_lab (a ValueError naming a key, a SourceError naming a file, a
    cache or checkpoint error) and file-system errors are input errors; anything raised deep inside a library
    keeps its traceback (set RECSYS_LAB_TRACEBACK=1 to see it for input errors too)."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return user_error_message(err.__cause__)
    if isinstance(err, ConfigError):
        return f"config error: {err}"
    if isinstance(err, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return f"error: {err}"
    if isinstance(err, (ValueError, RuntimeError)) and _raised_by_recsys_lab(err):
        return f"error: {err}"
    return None


def _raised_by_recsys_lab(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "recsys_lab" in Path(tb.tb_frame.f_code.co_filename).parts


def instantiate_callbacks(cfg: DictConfig | None) -> list[pl.Callback]:
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c and "_target_" in c]


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c and "_target_" in c]


def wandb_logger(mode: str = "auto", **kwargs: Any):
    """A WandbLogger that never waits on a network it does not have.

    mode "auto": the WANDB_MODE environment variable if set, else "online" when an API key is configured
    (WANDB_API_KEY or a netrc entry), else "offline" into the run directory (`wandb sync` it later).
    """
    from pytorch_lightning.loggers import WandbLogger

    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key() else "offline")
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"logger.wandb.mode='{mode}': expected auto, online, offline or disabled")
    Path(kwargs.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
    return WandbLogger(offline=mode == "offline", mode=mode, **kwargs)


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs even when a job fails, so one failed multirun job does not poison the next (and the
    offline run log is flushed to disk before the job returns)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish()
    import wandb

    if wandb.run is not None:
        wandb.finish()


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
    reference = {}
    scored = view.reference_scores(stage)
    if scored is not None:
        labels, scores = scored
        reference = {f"{stage}/{k}": v for k, v in reference_aucs(labels, scores).items()}
    return metrics, reference


def training_summary(trainer: pl.Trainer, datamodule) -> dict[str, Any]:
    """How many rows one optimizer step sees, across processes: what DDP silently changes.

    Under DDP each of the `world_size` processes trains on its own `batch_size` rows, so one step sees the
    global batch and an epoch has world_size times fewer steps at the same learning rate; in-batch negatives
    (two-tower) come from the process's own batch only. Keep runs comparable by holding the global batch fixed
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
    for key, value in sorted(results["metrics"].items()):
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
    console.print(protocol)
