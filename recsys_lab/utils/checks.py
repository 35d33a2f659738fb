"""Checks that turn bad run input into one clear line: config values, metric names, checkpoint files,
unwritable output folders, and the message `train.py` prints instead of a traceback."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what was expected."""


class ModelMismatchError(TypeError):
    """A model config paired with a task it cannot serve (a pair scorer under a task that needs encoders, a
    single-head model under the multi-task task); the message names the model and what it lacks."""


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
    _check_fitted_runs_in_one_process(cfg)
    _check_finetune_target(cfg)


def _check_finetune_target(cfg: DictConfig) -> None:
    """`model/finetune=...` only means something for a model that loads a pretrained encoder: say so in one
    line instead of a constructor error deep inside instantiation."""
    net = (cfg.get("model") or {}).get("net") or {}
    if net.get("finetune") is None or not net.get("_target_"):
        return
    try:
        accepts = "finetune" in inspect.signature(hydra.utils.get_class(net._target_)).parameters
    except Exception:  # an unknown target fails with its own error when the model is built
        return
    if not accepts:
        raise ConfigError(
            f"model/finetune (model.net.finetune): {net._target_} has no pretrained encoder to fine-tune; "
            "it applies to models with a `finetune` argument (bert_cross_encoder)"
        )


def _check_fitted_runs_in_one_process(cfg: DictConfig) -> None:
    """A model fitted in closed form (FittedTask) has no trainable parameter, which DDP refuses to wrap; there
    is nothing to distribute, so say which trainer to use instead of failing inside every process."""
    target = (cfg.get("model") or {}).get("_target_")
    trainer = cfg.get("trainer") or {}
    strategy, devices = str(trainer.get("strategy") or ""), trainer.get("devices")
    several = "ddp" in strategy or (
        isinstance(devices, int) and not isinstance(devices, bool) and devices != 1
    )
    if not target or not several:
        return
    try:
        takes_no_steps = getattr(hydra.utils.get_class(target), "takes_no_steps", False)
    except Exception:  # an unknown target fails with its own error when the task is built
        return
    if takes_no_steps:
        raise ConfigError(
            f"trainer.strategy={strategy or None}, trainer.devices={devices}: {target} is fitted in closed form "
            "in one process (no gradient steps to distribute); use trainer=default, cpu or gpu"
        )


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


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint of a run: the path itself if it is a file, else the run's best checkpoint (results.json's
    `best_checkpoint`), else its `checkpoints/last.ckpt`. ConfigError naming the path when there is none."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"run {path}: no such run directory or checkpoint file")
    results = path / "results.json"
    if results.is_file():
        best = json.loads(results.read_text()).get("best_checkpoint")
        if best and Path(best).is_file():
            return Path(best)
        if best and (path / "checkpoints" / Path(best).name).is_file():  # a run dir that was moved
            return path / "checkpoints" / Path(best).name
    last = path / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    raise ConfigError(
        f"run {path}: no checkpoint (neither results.json's best_checkpoint nor checkpoints/last.ckpt); "
        "train with the default callbacks, which save one"
    )


def load_run_checkpoint(path: str | Path) -> tuple[Path, dict, dict]:
    """A run directory's (or checkpoint file's) checkpoint written by train.py: the file, the checkpoint and
    its run metadata (the resolved config, git commit, data fingerprint); ConfigError naming the path if there
    is none or it was not written by train.py."""
    file = find_checkpoint(path)
    checkpoint = load_checkpoint(str(file))
    info = checkpoint.get("recsys_lab_run")
    if info is None:
        raise ConfigError(f"run {path}: {file} was not written by recsys_lab's train.py (no run metadata)")
    return file, checkpoint, info


def user_error_message(err: BaseException) -> str | None:
    """One line for errors caused by input (config values, files, caches, checkpoints); None for bugs.

    Errors raised deliberately by recsys_lab (a ValueError naming a key, a SourceError naming a file, a
    cache or checkpoint error) and file-system errors are input errors; anything raised deep inside a library
    keeps its traceback (set RECSYS_LAB_TRACEBACK=1 to see it for input errors too)."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return user_error_message(err.__cause__)
    if isinstance(err, ConfigError):
        return f"config error: {err}"
    if isinstance(err, ModelMismatchError):
        return f"error: {err}"
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
