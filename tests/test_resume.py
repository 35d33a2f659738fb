"""A run killed in the middle of an epoch and resumed from its last checkpoint ends exactly where the
uninterrupted run ends: same random draws (shuffling, dropout), same best checkpoint, same test metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recsys_lab.train import train
from tests.helpers import REPO, model_overrides


def test_a_killed_run_resumes_exactly(make_cfg, tmp_path, data_dir):
    base = [
        *model_overrides("din", tmp_path),
        "trainer.max_epochs=4",
        "seed=42",
        "trainer.enable_progress_bar=false",
    ]
    full = train(make_cfg(base, run_dir=tmp_path / "full"))

    # the same run, killed (SIGKILL: no cleanup) at the 4th batch of its third epoch
    killed = tmp_path / "killed"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *base,
            "+callbacks.kill._target_=recsys_lab.utils.testing.KillAt",
            "+callbacks.kill.epoch=2",
            "+callbacks.kill.batch=3",
            f"hydra.run.dir={killed}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RECSYS_LAB_DATA": str(data_dir)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1  # end of the second epoch

    resumed = train(make_cfg([*base, f"ckpt_path={last}"], run_dir=tmp_path / "resumed"))
    assert set(resumed["metrics"]) == set(full["metrics"])
    for key, value in full["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    # the best checkpoint is the same epoch's, whether it was written before the kill or after the resume
    assert Path(resumed["best_checkpoint"]).name == Path(full["best_checkpoint"]).name


def _state(folder: Path, scores: dict[str, float]) -> dict:
    """A ModelCheckpoint state as written in `folder` (mode max, top 1), its files on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in scores:
        (folder / name).write_bytes(b"ckpt")
    best = max(scores, key=scores.get)
    return {
        "monitor": "val/auc",
        "best_model_score": torch.tensor(scores[best]),
        "best_model_path": str(folder / best),
        "current_score": torch.tensor(scores[best]),
        "dirpath": str(folder),
        "best_k_models": {str(folder / n): torch.tensor(s) for n, s in scores.items()},
        "kth_best_model_path": str(folder / best),
        "kth_value": torch.tensor(scores[best]),
        "last_model_path": str(folder / "last.ckpt"),
    }


def test_resumed_checkpointing_keeps_the_best_score_of_the_interrupted_run(tmp_path):
    """A resumed run writes into its own folder; it must still know the best score of the epochs before the
    interruption, or any later (worse) epoch would become 'best'. Lightning's ModelCheckpoint forgets it."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from recsys_lab.utils.callbacks import RunCheckpoint

    state = _state(tmp_path / "first", {"epoch_000.ckpt": 0.84})
    plain = ModelCheckpoint(dirpath=tmp_path / "second", monitor="val/auc", mode="max")
    with pytest.warns(UserWarning, match="dirpath has changed"):
        plain.load_state_dict(state)
    assert plain.best_model_score is None  # Lightning's behaviour: the earlier best is lost

    ours = RunCheckpoint(dirpath=tmp_path / "second", monitor="val/auc", mode="max")
    ours.load_state_dict(state)
    assert float(ours.best_model_score) == pytest.approx(0.84)
    assert ours.best_model_path == str(tmp_path / "first" / "epoch_000.ckpt")
    assert set(ours.best_k_models) == {str(tmp_path / "first" / "epoch_000.ckpt")}

    # the earlier run's files are gone: nothing to point at, start afresh
    gone = _state(tmp_path / "deleted", {"epoch_001.ckpt": 0.9})
    (tmp_path / "deleted" / "epoch_001.ckpt").unlink()
    fresh = RunCheckpoint(dirpath=tmp_path / "third", monitor="val/auc", mode="max")
    fresh.load_state_dict(gone)
    assert fresh.best_model_score is None and fresh.best_k_models == {} and fresh.best_model_path == ""
