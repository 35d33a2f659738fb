"""A trained run, reloaded for serving or export: its model in eval mode, its data's tables and vocabularies.

`load_run(<run dir> | <checkpoint>)` rebuilds exactly what training built — the checkpoint carries the run's
resolved config (model, data, seed) — through the same `build` as `train.py`, then restores the weights with
the task's own checks (a checkpoint of another model or schema fails with names, not a key dump). The data come
from the prepared cache the run wrote (`data.cache_dir` of the run, or `data_dir=` here), so reloading costs a
cache read, not a preparation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from recsys_lab.data.datamodule import RecDataModule
from recsys_lab.data.schema import Schema
from recsys_lab.data.store import FeatureStore
from recsys_lab.utils.checks import load_run_checkpoint


@dataclass
class LoadedRun:
    """One trained run, ready to score.

    Args:
        path: the run directory (or the checkpoint's folder when a checkpoint was given).
        checkpoint: the checkpoint the weights came from.
        config: the run's resolved config.
        datamodule: its data, set up (tables, schema, vocabularies).
        net: the trained model (a plain `nn.Module`), in eval mode, on the CPU.
        task: the LightningModule that wraps it (for export of task-level heads).
        info: the checkpoint's run metadata (git commit, data fingerprint, protocol).
    """

    path: Path
    checkpoint: Path
    config: DictConfig
    datamodule: RecDataModule
    net: nn.Module
    task: Any
    info: dict

    @property
    def store(self) -> FeatureStore:
        return self.datamodule.store

    @property
    def schema(self) -> Schema:
        return self.datamodule.schema

    @property
    def model_name(self) -> str:
        return str(self.config.model.net._target_).rsplit(".", 1)[-1]

    def describe(self) -> dict:
        """What `/metadata` and the export manifest print about this run."""
        return {
            "run": str(self.path),
            "checkpoint": str(self.checkpoint),
            "model": str(self.config.model.net._target_),
            "task": str(self.config.model._target_),
            "seed": int(self.config.seed),
            "git_commit": self.info.get("git_commit"),
            "data_fingerprint": self.info.get("data_fingerprint"),
            "parameters": sum(p.numel() for p in self.net.parameters()),
        }


@torch.no_grad()
def encode_items(net: nn.Module, store: FeatureStore, codes: torch.Tensor, chunk: int = 4096) -> np.ndarray:
    """`net.encode_item` of item codes (N,) from the store's item features, `chunk` items per call: the
    catalogue an index (serving) or an export holds, float32 (N, D)."""
    parts = [net.encode_item(store.items_batch(part)) for part in codes.split(chunk)]
    return torch.cat(parts).float().numpy()


def load_run(path: str | Path, data_dir: str | None = None) -> LoadedRun:
    """The trained model and data of a run directory or checkpoint (see the module docstring).

    Args:
        path: a run's output directory or a checkpoint file written by `train.py`.
        data_dir: where the prepared data are cached, when not where the run kept them.
    """
    from recsys_lab.train import build  # train imports the whole lab; serving modules stay importable alone

    ckpt_path, checkpoint, info = load_run_checkpoint(path)
    cfg = OmegaConf.create(info["config"])
    cfg.train = False  # no optimizer is built: nothing trains here
    if data_dir is not None:
        cfg.data.cache_dir = str(data_dir)
    datamodule, task = build(cfg)
    task.on_load_checkpoint(checkpoint)  # the model and schema must be the ones the weights were trained for
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    run_dir = Path(path) if Path(path).is_dir() else ckpt_path.parent
    return LoadedRun(run_dir, ckpt_path, cfg, datamodule, task.net, task, info)
