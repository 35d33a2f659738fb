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
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what was expected."""


def validate_config(cfg: DictConfig) -> None:
    """Reject values Lightning would accept with a surprising meaning (max_epochs=-1 trains forever)."""
    trainer = cfg.get("trainer") or {}
    for key in ("max_epochs", "min_epochs"):
        value = trainer.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"trainer.{key}={value}: expected a positive integer (or null)")
    if cfg.get("seed") is not None and not isinstance(cfg.seed, int):
        raise ConfigError(f"seed={cfg.seed}: expected an integer")


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


def stage_metrics(trainer: pl.Trainer, datamodule, stage: str) -> tuple[dict[str, float], dict[str, float]]:
    """What the last `trainer.test`/`validate` logged for `stage`, and the reference scores (oracle and
    popularity AUC) on the same rows when the stage is scored on logged impressions."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
    reference = {}
    if datamodule.evaluation == "impressions":
        reference = {f"{stage}/{k}": v for k, v in datamodule.reference_metrics(stage).items()}
    return metrics, reference


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
    for key in ("seed", "git_commit", "data_fingerprint", "best_checkpoint", "output_dir"):
        protocol.add_row(key, str(results.get(key)))
    console = Console(width=120)
    console.print(table)
    console.print(protocol)
