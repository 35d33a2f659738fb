"""Callbacks that make a resumed run continue the interrupted one exactly."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint


class RandomState(pl.Callback):
    """Saves the process's random generators (torch, CUDA, numpy, Python) in every checkpoint and restores them
    when training resumes from it.

    The checkpoint is written at the end of an epoch's validation; restoring the generators there means the
    resumed run shuffles, draws dropout masks and continues exactly as the uninterrupted run would have (the
    DataModule restores its own negative sampler; Lightning skips the sanity-check validation when it resumes
    from such a checkpoint, so nothing draws in between). States are stored as tensors and plain Python values,
    so checkpoints still load with `weights_only=True`.

    `capture()`, called just before `trainer.fit` of a run that does not resume, makes fitting start from the
    generators' state at that point: Lightning's DDP re-seeds every process when it sets up (`reset_seed`), which
    would make a multi-process run shuffle differently from the single-process run of the same config. With
    the state restored at `on_fit_start`, both start the first epoch alike (a no-op in one process, where
    nothing draws in between).
    """

    def __init__(self) -> None:
        self._captured: dict[str, Any] | None = None

    def capture(self) -> None:
        self._captured = self.state_dict()

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._captured is not None:
            self.load_state_dict(self._captured)
            self._captured = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.as_tensor(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(_tuples(state_dict["python"]))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _tuples(value: Any) -> Any:
    """random.setstate needs tuples; a checkpoint round trip may hand back lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that keeps the best score of the run it resumes, even from another run directory.

    Every `train.py` run (a resumed one too) writes into its own directory. Lightning's `ModelCheckpoint` then
    forgets the best score of the epochs before the interruption, so the resumed run would pick its best
    checkpoint among the new epochs only. Here the best score and paths are restored as long as the files still
    exist; Lightning never deletes checkpoints outside the current directory, so the earlier run stays intact.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
            return
        best = {p: s for p, s in state_dict.get("best_k_models", {}).items() if Path(p).exists()}
        if best and Path(state_dict.get("best_model_path", "")).exists():
            self.best_model_path = state_dict["best_model_path"]
            self.best_model_score = state_dict["best_model_score"]
            self.best_k_models = best
            self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
            self.kth_value = state_dict.get("kth_value", self.kth_value)

    def _should_skip_saving_checkpoint(self, trainer: pl.Trainer) -> bool:
        # Lightning never saves at global step 0 ("no steps, nothing new"). A model fitted in its constructor
        # (FittedTask: `takes_no_steps`) stays at step 0 for good, so its one validated state is saved once.
        if trainer.global_step == 0 and getattr(trainer.lightning_module, "takes_no_steps", False):
            from pytorch_lightning.trainer.states import TrainerFn

            return (
                bool(trainer.fast_dev_run)
                or trainer.state.fn != TrainerFn.FITTING
                or trainer.sanity_checking
                or bool(self.best_model_path)  # saved already
            )
        return super()._should_skip_saving_checkpoint(trainer)


class TrainingClock(pl.Callback):
    """Wall-clock of a fit: seconds of training per epoch (validation excluded), the validation metrics after
    each epoch with the time they were reached, the epoch's mean training loss (`train/loss_mean`), and
    from those the seconds to the best epoch and to a target value — the time-to-quality figures of the
    README, written into `results.json` as `timing` (the epochs themselves as `history`)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._start = self._epoch_start = None
        self._loss_sum, self._loss_steps = None, 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()
        self._train_seconds = None
        self._loss_sum, self._loss_steps = None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the epoch's mean training loss, summed on the device (no synchronisation per step)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_steps += 1

    def _close_training(self) -> None:
        if self._epoch_start is not None and self._train_seconds is None:
            self._train_seconds = time.perf_counter() - self._epoch_start

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._close_training()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._start is None:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        elapsed = time.perf_counter() - self._start
        self.epochs.append(
            {
                "epoch": trainer.current_epoch,
                "train_seconds": self._train_seconds or 0.0,
                "elapsed": elapsed,
                **metrics,
            }
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close_training()
        if not self.epochs or self.epochs[-1]["epoch"] != trainer.current_epoch:  # no validation this epoch
            elapsed = time.perf_counter() - self._start
            self.epochs.append(
                {"epoch": trainer.current_epoch, "train_seconds": self._train_seconds, "elapsed": elapsed}
            )
        # the epoch's mean training loss (the training curves of the run's plots)
        if self._loss_steps:
            self.epochs[-1]["train/loss_mean"] = float(self._loss_sum) / self._loss_steps

    def summary(
        self, monitor: str, mode: str = "max", target: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """seconds_per_epoch, epochs, best_epoch and seconds_to_best (by `monitor`), and for each
        `{metric: value}` in `target` the seconds until the validation metric first reached the value."""
        if not self.epochs:
            return {}
        train = [e["train_seconds"] for e in self.epochs if e.get("train_seconds")]
        out: dict[str, Any] = {
            "epochs": len(self.epochs),
            "seconds_per_epoch": sum(train) / len(train) if train else None,
            "fit_seconds": self.epochs[-1]["elapsed"],
        }
        scored = [e for e in self.epochs if monitor in e]
        if scored:
            best = (max if mode == "max" else min)(scored, key=lambda e: e[monitor])
            out.update(best_epoch=best["epoch"], seconds_to_best=best["elapsed"])
        for metric, value in (target or {}).items():
            reached = [e for e in self.epochs if metric in e and e[metric] >= value]
            out[f"seconds_to_{metric}>={value}"] = reached[0]["elapsed"] if reached else None
        return out
