"""Weights & Biases for runs and sweeps: a logger that never waits on a network it does not have, and a
clean close so one multirun job never changes the next one's settings."""

from __future__ import annotations

import netrc
import os
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytorch_lightning.loggers import Logger

from recsys_lab.utils.checks import ConfigError

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
