"""The one entry point: `python train.py model=din data=ecommerce` (see README for groups and overrides).

Order matters: the DataModule is built and prepared first, because the model's schema (feature names,
vocabulary sizes, training statistics) comes from the data at run time. Then the task names the data view it
trains on, and the view's evaluation context is wired into the task once (`build`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from recsys_lab.analysis.evaluation import EvaluationSpec
from recsys_lab.analysis.report import environment, log_to_loggers, save_analysis
from recsys_lab.data.datamodule import RecDataModule
from recsys_lab.modules.compiled import compile_net, compile_options
from recsys_lab.modules.embeddings import check_hashed_features
from recsys_lab.modules.finetune import parameter_counts
from recsys_lab.tasks.base import RecTask
from recsys_lab.utils.callbacks import RandomState, TrainingClock
from recsys_lab.utils.checks import (
    ModelMismatchError,
    check_metric_names,
    check_optimizer,
    load_checkpoint,
    user_error_message,
    validate_config,
)
from recsys_lab.utils.launch import (
    check_strategy_fits_model,
    check_strategy_installed,
    instantiate_trainer,
)
from recsys_lab.utils.pretrained import register_resolvers
from recsys_lab.utils.repro import check_repro_config, check_reproduction, print_reproduction
from recsys_lab.utils.run import (
    RunMetadata,
    best_score,
    git_commit,
    instantiate_callbacks,
    instantiate_loggers,
    monitor_mode,
    stage_metrics,
    training_summary,
    write_results,
)
from recsys_lab.utils.wandb_logging import finish_loggers
from recsys_lab.utils.warm_start import checkpoint_file
from recsys_lab.utils.warm_start import init_from as warm_start_from

register_resolvers()
# conf/ sits beside the package in the repository (an editable install keeps it there)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def build(cfg: DictConfig) -> tuple[RecDataModule, RecTask]:
    """DataModule (prepared, serving the task's view) and task (connected to the view's evaluation) for a
    config; shared by training, `scripts/evaluate.py` and `scripts/benchmark.py`."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="partial")
    datamodule.prepare_data()
    datamodule.setup("fit")
    # Objects are passed by calling partials: Hydra would turn a dataclass kwarg (the Schema) into a config.
    net = hydra.utils.instantiate(cfg.model.net, _partial_=True, _convert_="partial")(
        schema=datamodule.schema
    )
    check_hashed_features(net, datamodule.schema)
    task_cfg = {k: v for k, v in cfg.model.items() if k != "net"}
    task = hydra.utils.instantiate(task_cfg, _partial_=True, _convert_="partial")(
        net=net, schema=datamodule.schema
    )
    # a model that reads ids only says so (`reads_features = False`; `reads_history = False`: no history): its
    # batches skip gathering what it does not read
    view = datamodule.use_view(
        task.view,
        reads_history=getattr(net, "reads_history", True),
        reads_features=getattr(net, "reads_features", True),
    )
    task.connect(view.eval_context())
    options = compile_options(cfg.get("compile"))
    if options is not None:  # after the view: its batches are what the compiled methods will see
        compile_net(net, **options)
    if (
        cfg.get("evaluation") is not None
    ):  # the test stage's extras: beyond accuracy, slices, per-query values
        spec = EvaluationSpec.from_config(cfg.evaluation)
        task.configure_analysis(spec, datamodule.analysis_data(spec))
    if cfg.get("train", True):  # train=false (zero-shot, test only) builds no optimizer
        check_optimizer(task)
    return datamodule, task


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test, print and save the results; returns the results dict."""
    validate_config(cfg)
    # a strategy whose optional extra is missing (DeepSpeed) stops before data preparation
    check_strategy_installed(cfg.trainer.get("strategy"))
    check_repro_config(cfg.get("repro"))  # a malformed published-result block fails before data preparation
    resume = cfg.get("ckpt_path")
    if resume:
        load_checkpoint(resume)  # a missing, truncated or foreign file stops here, before data preparation
    elif cfg.get("init_from"):
        checkpoint_file(cfg.init_from)  # so does a warm start's missing run directory
    # Loggers first: W&B settles its mode (and any unreachable server) before minutes of data preparation.
    loggers = instantiate_loggers(cfg.get("logger"))
    try:
        return _fit_and_test(cfg, loggers, resume)
    finally:
        finish_loggers(loggers)


def _fit_and_test(cfg: DictConfig, loggers: list, resume: str | None) -> dict[str, Any]:
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, task = build(cfg)
    # warm start (incremental training): the earlier model's weights, grown tables keeping their old rows; a
    # resumed run skips it, its checkpoint holds the weights
    warm_start = warm_start_from(task, cfg.init_from) if cfg.get("init_from") and not resume else None
    if cfg.monitor is None:  # null = the objective's headline metric under this data's evaluation
        OmegaConf.update(cfg, "monitor", task.default_monitor())
    check_strategy_fits_model(cfg.trainer.get("strategy"), task.net)
    check_metric_names(cfg, task)  # a typo in `monitor` fails now, not after an epoch of training
    output_dir = Path(cfg.paths.output_dir)
    commit = git_commit()
    run_info = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": commit,
        "data_fingerprint": datamodule.fingerprint(),
        # the prepared data alone (source, preprocessing, split, candidates): equal for every model tested on
        # the same held-out interactions, whatever its view gathers (scripts/compare.py pairs runs by it)
        "prepared_fingerprint": datamodule.protocol_fingerprint(),
        "protocol": {**datamodule.describe(), "protocol_preset": cfg.get("protocol_preset")},
        # the config groups chosen (model=sasrec, data=movielens, ...): how scripts/compare.py labels W&B runs
        "choices": _hydra_choices(),
    }
    clock = TrainingClock()
    random_state = RandomState()
    callbacks = instantiate_callbacks(cfg.get("callbacks")) + [RunMetadata(run_info), random_state, clock]
    trainer: pl.Trainer = instantiate_trainer(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    training = training_summary(trainer, datamodule)
    # what trains: a frozen or adapted encoder (model/finetune) shows here
    training["trainable_parameters"], training["total_parameters"] = parameter_counts(task)
    if warm_start is not None:
        training["warm_start"] = warm_start
    run_info["training"] = training
    for logger in loggers:
        logger.log_hyperparams(run_info)

    metrics: dict[str, float] = {}
    if cfg.get("train"):
        if not resume:  # a resumed run's generators come from its checkpoint
            random_state.capture()  # DDP re-seeds at set-up: start fitting where one process would
        trainer.fit(task, datamodule=datamodule, ckpt_path=resume)
    elif cfg.get("test"):  # evaluated as built (zero-shot): validated too, so that a sweep can select on it
        trainer.validate(task, datamodule=datamodule)
        metrics.update(stage_metrics(trainer, datamodule.view, "val")[0])
    best = best_score(trainer)
    if best is not None:
        metrics[f"best_{cfg.monitor}"] = best
    if cfg.get("test"):
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(task, datamodule=datamodule, ckpt_path=ckpt or None)
        tested, reference = stage_metrics(trainer, datamodule.view, "test")
        metrics.update(tested | reference)
        for logger in loggers if reference else []:
            logger.log_metrics(reference)
    results = {
        "metrics": metrics,
        "monitor": cfg.monitor,
        "model": cfg.model.net._target_,
        "task": cfg.model._target_,
        "seed": cfg.seed,
        "git_commit": commit,
        "git_dirty": commit.endswith("+dirty"),
        "data_fingerprint": run_info["data_fingerprint"],
        "prepared_fingerprint": run_info["prepared_fingerprint"],
        "protocol": run_info["protocol"],
        "training": training,
        "timing": clock.summary(cfg.monitor, monitor_mode(trainer, cfg.monitor), cfg.get("time_to")),
        "best_checkpoint": trainer.checkpoint_callback.best_model_path
        if trainer.checkpoint_callback
        else None,
        "output_dir": str(output_dir),
    }
    results["environment"] = environment(cfg.trainer.get("deterministic"))
    results["history"] = clock.epochs
    if task.analysis is not None:
        results["evaluation"] = task.analysis.describe()
    if cfg.get("repro") is not None:  # a published setup (conf/experiment/repro): expected vs obtained
        results["reproduction"] = check_reproduction(
            cfg.repro, metrics, cfg.get("protocol_preset"), config=cfg
        )
    if trainer.is_global_zero:  # under DDP every rank gets the same synced metrics; one writes them
        if task.analysis is not None and task.analysis.results:
            results["files"] = save_analysis(task.analysis, output_dir, clock.epochs)
            log_to_loggers(loggers, results["files"])
        write_results(results, output_dir)
        # the config with every interpolation resolved, as this run used it (.hydra/config.yaml keeps them)
        (output_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(run_info["config"]))
        print_reproduction(results.get("reproduction"))
    return results


def _hydra_choices() -> dict[str, str]:
    """{config group: chosen option} of the Hydra run ({} when the config was composed without Hydra's main)."""
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {k: str(v) for k, v in choices.items() if v is not None and not k.startswith("hydra")}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    except (ValueError, RuntimeError, OSError, InstantiationException, ModelMismatchError) as err:
        # Bad input (a config value, a data file, a cache, a checkpoint) is one clear line, no traceback.
        message = user_error_message(err)
        if message is None or os.environ.get("RECSYS_LAB_TRACEBACK"):
            raise
        raise SystemExit(message) from None
    # sweepers (Optuna) maximise what main returns
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    value = results["metrics"].get(f"best_{metric}", results["metrics"].get(metric))
    if value is None and HydraConfig.get().mode == RunMode.MULTIRUN:  # a sweeper needs the value
        raise SystemExit(
            f"config error: optimized_metric='{metric}' was not produced; metrics are {sorted(results['metrics'])}"
        )
    return value


if __name__ == "__main__":
    main()
