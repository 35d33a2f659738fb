"""The Trainer as launched: optional strategy extras checked up front, and the ranks of a submitit job.

Who starts the processes of a multi-process run decides how Lightning must behave (README, "Beyond one
machine"): Lightning itself (one command, `trainer=ddp_cpu`), torchrun (Lightning sees TorchElastic's variables
and launches nothing), SLURM through submitit (Lightning's SLURMEnvironment reads SLURM_*, launches nothing),
or submitit's local executor, which starts `tasks_per_node` processes but sets no variable Lightning knows:
without `SubmititEnvironment` every task would believe it is rank 0 of a fresh run and re-launch its own
second process, and the two rank-0 processes would wait on one port forever.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.plugins.environments import ClusterEnvironment

from recsys_lab.utils.checks import ConfigError

log = logging.getLogger(__name__)


def instantiate_trainer(cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    """`hydra.utils.instantiate(cfg.trainer, **kwargs)`, after checking that the strategy's optional extra is
    installed and with the submitit environment added when this process is a task of a local submitit job."""
    check_strategy_installed(cfg.get("strategy"))
    environment = submitit_environment()
    if environment is not None:
        # kwargs win over config keys in instantiate: keep any plugins the config lists
        plugins = hydra.utils.instantiate(cfg.get("plugins") or [])
        kwargs["plugins"] = [*plugins, environment]
    return hydra.utils.instantiate(cfg, **kwargs)


def check_strategy_installed(strategy: Any) -> None:
    """Stop with one line naming the extra to install when the strategy needs DeepSpeed and it is missing.

    Lightning's own error ("Install it by running `pip install -U deepspeed`", a MisconfigurationException)
    arrives as a traceback through Hydra's instantiation and names no version: torch >= 2.6 needs
    DeepSpeed >= 0.16, which the extra pins."""
    strategy = _strategy_name(strategy)
    if "deepspeed" in strategy.lower() and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"trainer.strategy={strategy} needs DeepSpeed, an optional extra: "
            'pip install -e ".[deepspeed]" (CUDA GPUs only)'
        )


def _strategy_name(strategy: Any) -> str:
    """`trainer.strategy` as text: a name ("ddp"), or a config's `_target_` class path; "" when unset."""
    if isinstance(strategy, DictConfig):
        strategy = strategy.get("_target_", "")
    return str(strategy or "")


def check_strategy_fits_model(strategy: Any, net: Any) -> None:
    """Stop with one line when FSDP is asked for a model it cannot train here, before the Trainer is built.

    FSDP holds each rank's shard of the parameters outside a step: the ranking evaluation encodes the catalogue
    with `encode_item` at the start of each evaluation (`RankingEvaluation.start`), which then reads a flat
    shard ("'weight' must be 2-D"); and FSDP rejects 0-d parameters ("FSDP doesn't support scalar
    parameters"). Both were seen by forcing FSDP onto CPU; they do not depend on the device."""
    strategy = _strategy_name(strategy)
    if "fsdp" not in strategy.lower():
        return
    from recsys_lab.tasks.ranking import has_encoders

    name = type(net).__name__
    if has_encoders(net):
        raise ConfigError(
            f"trainer.strategy={strategy}: {name} encodes the catalogue with encode_item outside a training "
            "step, where FSDP holds only this rank's shard of its tables; use trainer=ddp or trainer=deepspeed"
        )
    scalars = [n for n, p in net.named_parameters() if p.dim() == 0]
    if scalars:
        raise ConfigError(
            f"trainer.strategy={strategy}: FSDP does not shard 0-d parameters and {name} has {scalars}; "
            "use trainer=ddp or trainer=deepspeed"
        )


def submitit_environment() -> SubmititEnvironment | None:
    """The cluster environment of a task started by submitit's local executor; None elsewhere.

    Under real SLURM (submitit's slurm executor) srun sets SLURM_* for every task and Lightning's own
    SLURMEnvironment must keep reading them; the debug executor runs one task in this very process."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return None
    return SubmititEnvironment()


class SubmititEnvironment(ClusterEnvironment):
    """Ranks and rendezvous of the tasks of one submitit job, read from `submitit.JobEnvironment()`.

    Every task is started by submitit (`tasks_per_node` of them), so Lightning launches nothing. The main
    port is `MASTER_PORT` when set, else derived from the job id as Lightning does for SLURM jobs: the tasks
    of one job agree on it, and jobs of a sweep running side by side (the local executor starts them all at
    once) get different ones."""

    def __init__(self) -> None:
        import submitit  # an optional extra: only imported inside a submitit job, where it is installed

        self._job = submitit.JobEnvironment()

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        # one node (the local executor's only case) needs no network name
        if "MASTER_ADDR" in os.environ:
            return os.environ["MASTER_ADDR"]
        return "127.0.0.1" if self._job.num_nodes == 1 else self._job.hostnames[0]

    @property
    def main_port(self) -> int:
        if "MASTER_PORT" in os.environ:
            return int(os.environ["MASTER_PORT"])
        # the local executor's job id is its controller's process id: 15000 + its last 4 digits
        return 15000 + int(str(self._job.job_id)[-4:])

    @staticmethod
    def detect() -> bool:
        return os.environ.get("SUBMITIT_EXECUTOR") == "local"

    def world_size(self) -> int:
        return self._job.num_tasks

    def set_world_size(self, size: int) -> None:
        # Lightning announces devices x num_nodes; submitit fixed the number of tasks (validate_settings)
        log.debug("SubmititEnvironment: world size %d is fixed by the job", self._job.num_tasks)

    def global_rank(self) -> int:
        return self._job.global_rank

    def set_global_rank(self, rank: int) -> None:
        log.debug("SubmititEnvironment: global rank %d is fixed by the job", self._job.global_rank)

    def local_rank(self) -> int:
        return self._job.local_rank

    def node_rank(self) -> int:
        return self._job.node

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        # a mismatch would index a device that does not exist, or wait for ranks that never start
        if num_devices * num_nodes != self._job.num_tasks:
            raise ConfigError(
                f"trainer.devices={num_devices} x trainer.num_nodes={num_nodes} processes, but the submitit job "
                f"started {self._job.num_tasks} tasks: set hydra.launcher.tasks_per_node (x nodes) to match"
            )
