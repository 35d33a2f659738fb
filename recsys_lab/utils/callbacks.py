"""Callbacks that make a resumed run continue the interrupted one exactly."""

from __future__ import annotations

import random
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
    """

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
