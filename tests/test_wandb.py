"""Weights & Biases logging: offline runs are whole on disk when a job returns, one job's run does not change
the next job's W&B settings, and nothing waits on a network that is not there."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wandb  # imported up front: its first import is not part of what the timing tests measure

from recsys_lab.train import train
from recsys_lab.utils.checks import ConfigError
from recsys_lab.utils.wandb_logging import _wandb_key, finish_loggers, wandb_logger
from tests.helpers import REPO, SMALL_DATA, free_port

TINY_RUN = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
]
FAKE_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 hex characters, the shape of a W&B API key
WANDB_VARS = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC")


@pytest.fixture
def no_account(monkeypatch, tmp_path) -> Path:
    """No W&B mode or key in the environment, and a HOME without a netrc; returns that HOME."""
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def no_network(monkeypatch, no_account) -> str:
    """An API key, and a W&B server address where nothing listens; returns the address."""
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    return url


def offline_logs(run_dir: Path) -> list[Path]:
    return list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_offline_smoke(make_cfg, tmp_path, monkeypatch):
    """train() returns only once the offline transaction log holds the logged config and metrics."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(
        ["model=din", "data=ecommerce", *SMALL_DATA, "logger=wandb", *TINY_RUN, "evaluation.plots=true"]
    )
    train(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the end-of-run plots as W&B images, and the per-query values saved with the run (compare --wandb-group)
    images = {p.name.split("_")[0] for p in runs[0].glob("files/media/images/plots/*.png")}
    assert {"calibration", "score"} <= images, images
    assert (runs[0] / "files" / "per_query.parquet").is_file()
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1, "the offline run log was not written"
    # the transaction log (protobuf records) holds the logged config and metrics as plain strings
    blob = logs[0].read_bytes()
    for needle in (
        b"git_commit",
        b"data_fingerprint",
        b"recsys_lab.models.din.DIN",
        b"test/auc",
        b"oracle_auc",
    ):
        assert needle in blob, needle


def test_an_offline_run_leaves_the_next_job_its_own_settings(no_account, tmp_path):
    """Lightning's offline flag sets WANDB_MODE=dryrun for the rest of the process; a multirun's next job read it."""
    before = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
    for job in range(2):
        logger = wandb_logger(save_dir=str(tmp_path / str(job)), project="recsys_lab")
        assert logger.experiment.settings.mode == "offline"
        finish_loggers([logger])
        assert {k: v for k, v in os.environ.items() if k.startswith("WANDB_")} == before
        assert len(offline_logs(tmp_path / str(job))) == 1


def test_wandb_mode_dryrun_means_offline(no_account, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's old name for offline, which Lightning still sets
    logger = wandb_logger(save_dir=str(tmp_path / "run"), project="recsys_lab")
    try:
        assert logger.experiment.settings.mode == "offline"
    finally:
        finish_loggers([logger])


def test_wandb_mode_rejects_an_unknown_mode(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        wandb_logger(mode="auto")
    with pytest.raises(ConfigError, match="logger.wandb.mode='sometimes'"):
        wandb_logger(mode="sometimes")


def test_api_key_from_the_netrc_entry_of_the_configured_host(no_account, monkeypatch):
    (no_account / ".netrc").write_text(f"machine wandb.example.com\n  login user\n  password {FAKE_KEY}\n")
    assert not _wandb_key()  # the entry is for another host than api.wandb.ai
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert _wandb_key()


def test_auto_mode_without_network_falls_back_to_offline_at_once(no_network, tmp_path, capsys):
    start = time.monotonic()
    logger = wandb_logger(mode="auto", save_dir=str(tmp_path / "run"), project="recsys_lab")
    elapsed = time.monotonic() - start
    try:
        (line,) = [ln for ln in capsys.readouterr().out.splitlines() if "W&B" in ln]
        assert line.startswith(f"cannot reach the W&B server {no_network}")
        assert "logging W&B offline instead" in line
        assert elapsed < 10, elapsed  # the offline run's start; W&B's own online init waited ~100 s
        assert logger.experiment.settings.mode == "offline"
    finally:
        finish_loggers([logger])
    assert len(offline_logs(tmp_path / "run")) == 1


def test_online_mode_without_network_is_one_clear_error(no_network, tmp_path):
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        wandb_logger(mode="online", save_dir=str(tmp_path / "run"), project="recsys_lab")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert message.startswith(f"logger.wandb.mode=online: cannot reach the W&B server {no_network}")
    assert message.endswith("use logger.wandb.mode=offline")
    assert wandb.run is None


def test_auto_mode_falls_back_when_the_run_does_not_start_in_time(no_network, monkeypatch, tmp_path, capsys):
    """The second guard: a host that accepts connections but never answers; W&B's init timeout ends the wait."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # the kernel accepts connections; nobody answers them
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        start = time.monotonic()
        logger = wandb_logger(save_dir=str(tmp_path / "run"), project="recsys_lab", init_timeout=1)
        elapsed = time.monotonic() - start
    try:
        assert "the W&B run did not start online" in capsys.readouterr().out
        assert elapsed < 30, elapsed  # init_timeout, plus ~10 s of W&B's own when WANDB_SILENT is unset
        assert logger.experiment.settings.mode == "offline"
    finally:
        finish_loggers([logger])


def test_reachability_probe_gives_up_at_its_deadline(monkeypatch):
    """Name resolution and connects can hang past any socket timeout; the probe abandons them."""
    from recsys_lab.utils.wandb_logging import _unreachable

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30))
    start = time.monotonic()
    why = _unreachable("https://api.wandb.ai", timeout=0.5)
    assert time.monotonic() - start < 2
    assert why == "no connection within 0.5 s"


def test_reachability_probe_goes_through_the_https_proxy(monkeypatch):
    """Behind a proxy only the proxy must be reachable (W&B's client uses it), not the W&B host."""
    from recsys_lab.utils.wandb_logging import _unreachable

    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        for var in ("HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.getsockname()[1]}")
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        assert _unreachable("https://wandb.invalid", timeout=2) is None


@pytest.mark.slow  # a two-job multirun in a fresh interpreter: ~8 s (CI runs it)
def test_multirun_with_the_default_logger_offline(tmp_path):
    """Both jobs of `-m model=din,two_tower` write results and an offline run with no W&B account."""
    env = {k: v for k, v in os.environ.items() if k not in WANDB_VARS}
    env |= {"HOME": str(tmp_path / "home"), "RECSYS_LAB_DATA": str(tmp_path / "data")}
    (tmp_path / "home").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "-m",
            "model=din,two_tower",
            "data=ecommerce_small",
            *TINY_RUN,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "logs").glob("train/multiruns/*/[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert json.loads((job / "results.json").read_text())["metrics"]
        (log,) = offline_logs(job)
        assert b"test/" in log.read_bytes()
