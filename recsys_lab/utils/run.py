"""Run plumbing for `train.py` and `scripts/evaluate.py`: config checks, loggers, callbacks, results."""

from __future__ import annotations

import json
import math
import netrc
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
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


class WritableOutput(Callback):
    """Hydra callback: stop with one line when the run (or sweep) directory cannot be created.

    Hydra creates the job's output directory before `main` runs, so a read-only `paths.log_dir` would surface
    as a stripped traceback from inside Hydra; this checks the folder first.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(folder: str) -> None:
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write_test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise SystemExit(
                f"error: cannot write the run directory {path} ({err.strerror}); set paths.log_dir (or "
                "hydra.run.dir / hydra.sweep.dir) to a writable folder"
            ) from None


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


# W&B's own spellings of its modes (its legacy "dryrun" and "run" too) -> the mode the run starts in
_WANDB_MODES = {
    "online": "online",
    "offline": "offline",
    "disabled": "disabled",
    "shared": "shared",  # online, with several processes writing one run
    "run": "online",
    "dryrun": "offline",
}
_WANDB_DEFAULT_URL = "https://api.wandb.ai"


def wandb_logger(mode: str = "auto", probe_timeout: float = 3.0, init_timeout: float = 20.0, **kwargs: Any):
    """A WandbLogger whose run has started, that never waits on a network it does not have.

    mode "auto": the WANDB_MODE environment variable if set, else "online" when an API key is configured
    (WANDB_API_KEY or a netrc entry for the W&B host), else "offline" into the run directory (`wandb sync` it
    later). Online, the W&B host (WANDB_BASE_URL, default https://api.wandb.ai) must accept a TCP connection
    within `probe_timeout` seconds and the run must start within `init_timeout` seconds; otherwise "auto"
    falls back to offline with one printed line and an explicit "online" stops with a ConfigError. The run
    starts here, not at the first log call, so that this is settled before training.
    """
    import wandb
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    resolved = _wandb_mode(mode)
    if resolved == "offline" and kwargs.get("log_model"):
        raise ConfigError("logger.wandb.log_model: checkpoints cannot be uploaded offline; set it to false")
    save_dir = kwargs.get("save_dir", ".")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    needs_network = resolved in ("online", "shared") and getattr(rank_zero_only, "rank", 0) == 0
    if not needs_network:  # other ranks than zero never start a run
        return _start_wandb(resolved, init_timeout, kwargs)
    url = os.environ.get("WANDB_BASE_URL") or _WANDB_DEFAULT_URL
    why = _unreachable(url, probe_timeout)
    problem = f"cannot reach the W&B server {url} ({why})"
    if why is None:
        try:
            return _start_wandb(resolved, init_timeout, kwargs)
        except wandb.errors.Error as err:  # init timed out, or the server refused the key
            problem = f"the W&B run did not start online ({str(err).splitlines()[0]})"
    if mode != "auto":
        raise ConfigError(f"logger.wandb.mode={mode}: {problem}; use logger.wandb.mode=offline")
    if kwargs.get("log_model"):
        raise ConfigError(f"W&B: {problem}, and logger.wandb.log_model cannot upload checkpoints offline")
    print(f"{problem}; logging W&B offline instead (`wandb sync` the run in {save_dir} later)")
    return _start_wandb("offline", init_timeout, kwargs)


def _wandb_mode(mode: str) -> str:
    """online, offline, disabled or shared, from the config's mode (auto: the environment, then the API key)."""
    if mode == "auto":
        env = os.environ.get("WANDB_MODE")
        if not env:
            return "online" if _wandb_key() else "offline"
        if env not in _WANDB_MODES:
            raise ConfigError(f"WANDB_MODE='{env}': expected online, offline or disabled")
        return _WANDB_MODES[env]
    if mode not in _WANDB_MODES:
        raise ConfigError(f"logger.wandb.mode='{mode}': expected auto, online, offline or disabled")
    return _WANDB_MODES[mode]


def _start_wandb(mode: str, init_timeout: float, kwargs: dict[str, Any]):
    """A WandbLogger with its run started (on rank zero; the others get Lightning's dummy run)."""
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    # The mode goes to wandb.init: Lightning's `offline=True` would set WANDB_MODE=dryrun in this process's
    # environment for good, where the next job of a multirun reads it.
    logger = WandbLogger(mode=mode, settings=wandb.Settings(init_timeout=init_timeout), **kwargs)
    logger.experiment  # noqa: B018
    return logger


def _wandb_key() -> bool:
    """Whether W&B has an API key: WANDB_API_KEY, or the netrc entry `wandb login` writes for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or _WANDB_DEFAULT_URL).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _unreachable(url: str, timeout: float) -> str | None:
    """Why a TCP connection to the URL's host (or to the proxy that requests to it go through) does not open
    within `timeout` seconds; None when it opens. Name resolution has no timeout of its own, so the attempt
    runs in a thread that is abandoned at the deadline."""
    parts, via = urlsplit(url), ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts, via = urlsplit(proxy if "://" in proxy else f"http://{proxy}"), f"proxy {proxy}: "
    try:
        address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except ValueError as err:  # a malformed port
        return f"{via}{err}"
    if not parts.hostname:
        return f"{via}no host name"
    why = [f"{via}no connection within {timeout:g} s"]
    done = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            why[0] = None
        except OSError as err:
            why[0] = f"{via}{err.strerror or err}"
        done.set()

    threading.Thread(target=connect, daemon=True).start()
    done.wait(timeout)
    return why[0]


def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs even when a job fails, so one failed multirun job does not poison the next, and return
    only once the run is on disk.

    `run.finish()` returns when the wandb-core service has processed the run's last record, but the service
    writes and closes the offline transaction log (`run-*.wandb`) afterwards. `wandb.teardown()` asks the
    service to stop and waits for its process to exit; the service handles requests in order, so by then
    the log is closed. The next job starts a fresh service that reads its settings from the environment.
    """
    from pytorch_lightning.loggers import WandbLogger

    wandb = sys.modules.get("wandb")
    if wandb is None:  # never imported: no run to close
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish()
    if wandb.run is not None:
        wandb.finish()
    try:
        wandb.teardown()
    except SystemExit as err:  # the service exited with an error: say so, without hiding the job's own error
        print(f"W&B: the wandb-core service exited with code {err.code} while closing the run")


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
