"""Beyond one machine: the FSDP and DeepSpeed trainer configs, the ranks Lightning sees under each launcher,
and the launches run for real on this CPU machine (README, "Beyond one machine").

Runs compare with one process on the same global batch, two-tower (exact, as in tests/test_sweeps.py): the same
global batches and in-batch negatives gathered from every process. Measured differences: at most 7.5e-9."""

from __future__ import annotations

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hydra
import pytest
from hydra.errors import InstantiationException
from lightning_utilities.core.rank_zero import rank_zero_only
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from torch.distributed.fsdp import ShardingStrategy

from recsys_lab.utils.checks import ConfigError, user_error_message
from recsys_lab.utils.launch import SubmititEnvironment, instantiate_trainer
from tests.helpers import SMALL_DATA, free_port, model_overrides
from tests.test_sweeps import FAST, run_cli

# two-tower on the small simulator, one epoch: 2 processes with batch 32 against 1 with 64
COMMON = ["model=two_tower", *FAST, "evaluation=accuracy"]
EXACT = 1e-6


@pytest.fixture
def restore_rank(monkeypatch):
    """A Trainer built in this process for rank 1 sets Lightning's process-wide rank: put it back after."""
    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def assert_equal_metrics(launched: dict, one: dict, where: str) -> None:
    assert launched["training"]["world_size"] == 2 and launched["seed"] == one["seed"], where
    assert set(launched["metrics"]) == set(one["metrics"]), where
    for key, value in one["metrics"].items():
        assert launched["metrics"][key] == pytest.approx(value, abs=EXACT), (where, key)


def test_fsdp_config_is_lightnings_fsdp_strategy_on_gpus(make_cfg, restore_rank):
    """trainer=fsdp builds FSDPStrategy: gradients and optimizer state sharded (ZeRO-2), the task one FSDP unit
    (no auto-wrap: models read embedding weights outside the tables' forward), one full state dict. Lightning
    refuses FSDP on CPU, which is why there is no trainer=fsdp_cpu (torch's FSDP itself would further need
    device_id=cpu, which Lightning never passes: "FSDP needs a non-CPU accelerator device")."""
    cfg = make_cfg(["trainer=fsdp"])
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert type(strategy) is FSDPStrategy
    assert strategy.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert "auto_wrap_policy" not in strategy.kwargs and strategy.kwargs["use_orig_params"]
    assert strategy._state_dict_type == "full"
    cpu = make_cfg(["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"])
    with pytest.raises(InstantiationException, match="The strategy `fsdp` requires a GPU accelerator"):
        instantiate_trainer(cpu.trainer)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed")
def test_deepspeed_without_the_extra_stops_with_one_line(make_cfg, monkeypatch):
    """trainer=deepspeed (ZeRO-2, bf16) without DeepSpeed: train() stops before building the Trainer with a
    config error naming the extra; main() prints it as one line, no traceback (Lightning's own error is a
    traceback suggesting `pip install -U deepspeed`, which torch >= 2.6 rejects below 0.16)."""
    from recsys_lab.train import train

    cfg = make_cfg(["trainer=deepspeed", *SMALL_DATA, "logger=none"])
    assert (cfg.trainer.strategy.stage, cfg.trainer.precision) == (2, "bf16-mixed")
    monkeypatch.setattr("recsys_lab.train.build", lambda cfg: pytest.fail("data prepared before the check"))
    with pytest.raises(ConfigError) as err:
        train(cfg)
    line = user_error_message(err.value)
    assert line.startswith("config error: trainer.strategy=") and "\n" not in line
    assert 'pip install -e ".[deepspeed]"' in line


@pytest.mark.parametrize(
    "model, message",
    [("two_tower", "TwoTower encodes the catalogue with encode_item"), ("deepfm", "0-d parameters")],
)
def test_fsdp_refuses_the_models_it_cannot_shard_before_training(make_cfg, tmp_path, model, message):
    """FSDP holds shards outside a step (the catalogue encoding of retrieval models reads a flat shard) and
    rejects 0-d parameters: such a model stops with a config error naming the alternatives, before the Trainer
    is built; a model FSDP can train (DIN) passes the check."""
    from recsys_lab.train import build, train
    from recsys_lab.utils.launch import check_strategy_fits_model

    cfg = make_cfg([*model_overrides(model, tmp_path), "trainer=fsdp"])
    with pytest.raises(ConfigError, match=f"{message}.*use trainer=ddp or trainer=deepspeed"):
        train(cfg)
    _, din = build(make_cfg([*model_overrides("din", tmp_path), "trainer=fsdp"]))
    check_strategy_fits_model(cfg.trainer.strategy, din.net)  # no error
    _, task = build(make_cfg(model_overrides(model, tmp_path)))
    check_strategy_fits_model("ddp", task.net)  # other strategies: no check


SUBMITIT_RANK_1 = {  # what submitit's local executor sets for the second task of a 2-task job
    "SUBMITIT_EXECUTOR": "local",
    "SUBMITIT_LOCAL_JOB_ID": "4321",
    "SUBMITIT_LOCAL_NTASKS": "2",
    "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
    "SUBMITIT_LOCAL_NODEID": "0",
    "SUBMITIT_LOCAL_GLOBALID": "1",
    "SUBMITIT_LOCAL_LOCALID": "1",
}
SLURM_RANK_5 = {  # what srun sets for task 5 of a 2-node job of 4 tasks per node
    "SLURM_JOB_ID": "777",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
}


@pytest.mark.parametrize("inside_slurm_allocation", [False, True])
def test_a_local_submitit_task_knows_its_rank(inside_slurm_allocation, make_cfg, monkeypatch, restore_rank):
    """A task of submitit's local executor is its own rank (Lightning launches nothing), also when the local
    executor runs inside a SLURM allocation whose SLURM_* describe other tasks."""
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (SUBMITIT_RANK_1 | (SLURM_RANK_5 if inside_slurm_allocation else {})).items():
        monkeypatch.setenv(k, v)
    trainer = instantiate_trainer(make_cfg(["trainer=ddp_cpu"]).trainer)
    environment = trainer.strategy.cluster_environment
    assert isinstance(trainer.strategy, DDPStrategy) and isinstance(environment, SubmititEnvironment)
    assert environment.creates_processes_externally
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (1, 1, 0, 2)
    # both tasks of the job meet at the same address; another job (another id) gets another port
    assert (environment.main_address, environment.main_port) == ("127.0.0.1", 15000 + 4321)
    with pytest.raises(ConfigError, match="started 2 tasks"):
        environment.validate_settings(num_devices=1, num_nodes=1)


def test_under_slurm_lightning_reads_slurm(make_cfg, monkeypatch, restore_rank):
    """A task of submitit's slurm executor keeps Lightning's SLURMEnvironment (ranks from srun's SLURM_*)."""
    for k, v in (SLURM_RANK_5 | {"SUBMITIT_EXECUTOR": "slurm"}).items():
        monkeypatch.setenv(k, v)
    cfg = make_cfg(["trainer=ddp_cpu", "trainer.devices=4", "trainer.num_nodes=2"])
    trainer = instantiate_trainer(cfg.trainer)
    assert type(trainer.strategy.cluster_environment) is SLURMEnvironment
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (5, 1, 1, 8)


@pytest.mark.slow
def test_slurm_launcher_submits_one_job_per_trial_with_a_task_per_device(tmp_path, data_dir, monkeypatch):
    """hydra/launcher=slurm submits one array job of one task per trial, each trainer.num_nodes nodes x
    trainer.devices tasks and GPUs, under a job name Lightning's SLURMEnvironment accepts. No cluster here:
    a stand-in `sbatch` keeps the submission file and refuses, so the sweep stops after submitting."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    captured = tmp_path / "submission.sh"
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" "{captured}"\necho "sbatch: no cluster here" >&2\nexit 1\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for srun before it submits
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = [
        "-m",
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.num_nodes=2",
        "seed=1,2",
    ]
    with pytest.raises(AssertionError, match="sbatch: no cluster here"):
        run_cli([*args, "logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, data_dir)
    lines = set(captured.read_text().splitlines())
    assert {
        "#SBATCH --array=0-1%2",  # trials 0 and 1, one job each
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --job-name=train",  # not "bash"/"interactive", which Lightning would not take for SLURM
        "export SUBMITIT_EXECUTOR=slurm",  # so SubmititEnvironment stays out of the way
    } <= lines
    assert any(line.startswith("srun ") for line in lines)


@pytest.mark.slow
def test_submitit_multirun_of_ddp_jobs_equals_one_process(tmp_path, data_dir):
    """hydra/launcher=slurm_local: submitit's local executor runs each of 2 trials (seed=1,2) as one job of 2
    tasks, each task one gloo rank (SubmititEnvironment; Lightning launches nothing), both jobs at once.
    Each trial equals its single-process run. Every task is killed after 5 minutes (no hang). The tasks of a
    job meet on a port derived from the job id (the local executor's controller pid), distinct per job."""
    run_cli(
        ["-m", *COMMON, "seed=1,2", "data.batch_size=64", f"hydra.sweep.dir={tmp_path / 'one'}"],
        tmp_path,
        data_dir,
    )
    sweep = [
        "-m",
        "hydra/launcher=slurm_local",
        "hydra.launcher.timeout_min=5",
        *COMMON,
        "seed=1,2",
        "data.batch_size=32",
        "trainer=ddp_cpu",
        f"hydra.sweep.dir={tmp_path / 'submitit'}",
    ]
    run_cli(sweep, tmp_path, data_dir)
    for trial in ("0", "1"):
        one = results(tmp_path / "one" / trial)
        assert_equal_metrics(results(tmp_path / "submitit" / trial), one, f"trial {trial}")
    # one job per trial, each of 2 tasks (submitit's per-task logs)
    jobs = [p for p in (tmp_path / "submitit" / ".submitit").iterdir() if any(p.glob("*_log.out"))]
    assert sorted(len(list(job.glob("*_log.out"))) for job in jobs) == [2, 2]


@pytest.mark.slow
def test_two_node_torchrun_on_one_machine_equals_one_process(tmp_path, data_dir):
    """The multi-node form, two "nodes" of one process on this machine: two torchrun agents meeting through
    c10d rendezvous, `trainer.num_nodes=2 trainer.devices=1` (Lightning checks world size = nodes x devices
    against torchrun's). Equal to the single-process run."""
    run_cli(
        [*COMMON, "seed=1", "data.batch_size=64", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path, data_dir
    )
    torchrun = (
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
    )
    args = [*COMMON, "seed=1", "data.batch_size=32", "trainer=ddp_cpu", "trainer.devices=1"]
    args += ["trainer.num_nodes=2", f"hydra.run.dir={tmp_path / 'two_nodes'}"]
    with ThreadPoolExecutor(2) as pool:  # both "nodes" at once: each waits for the other at rendezvous
        nodes = [pool.submit(run_cli, args, tmp_path, data_dir, torchrun) for _ in range(2)]
        for node in nodes:
            node.result()
    assert_equal_metrics(results(tmp_path / "two_nodes"), results(tmp_path / "one"), "two nodes")
