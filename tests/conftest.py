"""Shared fixtures: compose the real Hydra configs with small data and run them in-process."""

from __future__ import annotations

import os

# Tests never reach W&B (one offline smoke test opts back in) and never a model hub.
os.environ["WANDB_MODE"] = "disabled"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from recsys_lab.train import CONFIG_DIR  # noqa: E402  (also registers the resolvers)
from tests.helpers import REPO, SMALL_DATA  # noqa: E402,F401  (re-exported for older imports)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One simulator cache for the whole session (each parameter set is built once)."""
    return tmp_path_factory.mktemp("data")


def compose_cfg(overrides: list[str], root: Path, data_dir: Path, out: Path) -> DictConfig:
    """compose('train', overrides) with paths under `root`, as train.py would see it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.data_dir = str(data_dir)
        cfg.paths.log_dir = str(root / "logs")
        cfg.paths.output_dir = str(out)
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
        # plots cost about a second a run: only the tests of the plots (which ask for them) draw any
        if cfg.get("evaluation") is not None and not any(o.startswith("evaluation") for o in overrides):
            cfg.evaluation.plots = False
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra  # train.py's cfg has no hydra node either
    return cfg


@pytest.fixture
def make_cfg(tmp_path, data_dir):
    """compose('train', overrides) with paths under tmp_path, as train.py would see it."""

    def _make(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
        return compose_cfg(overrides, tmp_path, data_dir, run_dir or tmp_path / "run")

    yield _make
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def served_runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Run directories of small trained models for the serving and export tests, trained once per session:
    "retrieval" (two_tower) and "ranking" (din), one epoch each on the small simulator."""
    from recsys_lab.train import train
    from tests.helpers import model_overrides

    root = tmp_path_factory.mktemp("served")
    runs = {}
    for role, model in (("retrieval", "two_tower"), ("ranking", "din")):
        out = root / role
        cfg = compose_cfg([*model_overrides(model, root), "trainer.max_epochs=1"], root, data_dir, out)
        train(cfg)
        runs[role] = out
    GlobalHydra.instance().clear()
    return runs
