"""Re-evaluate a saved run: `python scripts/evaluate.py ckpt_path=<path/to.ckpt> [+data.max_eval_rows=1000]`.

The checkpoint carries the run's resolved config (model, data, seed), so the same model and data are rebuilt
from it; `+data.*` / `+trainer.*` overrides change the evaluation setting and `evaluation.*` the test analysis
(merged over the run's own `evaluation` config, e.g. `+evaluation.slice_columns=[gender]`). Results are printed
and written to results.json in this evaluation's own run directory, with the analysis's files
(per_query.parquet, curves.json, plots/).
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from recsys_lab.analysis.report import environment, save_analysis
from recsys_lab.train import CONFIG_DIR, build
from recsys_lab.utils.checks import ConfigError, load_checkpoint, user_error_message
from recsys_lab.utils.run import stage_metrics, write_results


def evaluate(cfg: DictConfig) -> dict:
    path = Path(cfg.ckpt_path)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    run = checkpoint.get("recsys_lab_run")
    if run is None:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: not written by recsys_lab's train.py (no run metadata)"
        )
    if cfg.stage not in ("val", "test"):
        raise ConfigError(f"stage={cfg.stage}: expected 'val' or 'test'")
    run_cfg = OmegaConf.create(run["config"])
    run_cfg.data = OmegaConf.merge(run_cfg.data, cfg.data)
    if cfg.get("evaluation"):  # the test analysis: overrides merged over the run's own
        run_cfg.evaluation = OmegaConf.merge(run_cfg.get("evaluation") or {}, cfg.evaluation)
    pl.seed_everything(run_cfg.seed, workers=True)
    datamodule, task = build(run_cfg)
    trainer_cfg = OmegaConf.merge(
        {
            k: v
            for k, v in run_cfg.trainer.items()
            if k in ("_target_", "accelerator", "devices", "precision")
        },
        {"logger": False, "enable_progress_bar": False, "default_root_dir": cfg.paths.output_dir},
        cfg.trainer,
    )
    trainer: pl.Trainer = hydra.utils.instantiate(trainer_cfg)
    run_stage = trainer.test if cfg.stage == "test" else trainer.validate
    # the Lightning checkpoint restores the weights; the task's on_load_checkpoint checks model and schema
    start = time.perf_counter()
    run_stage(task, datamodule=datamodule, ckpt_path=str(path))
    seconds = time.perf_counter() - start
    metrics, reference = stage_metrics(trainer, datamodule.view, cfg.stage)
    metrics.update(reference)
    results = {
        "metrics": metrics,
        "model": run_cfg.model.net._target_,
        "task": run_cfg.model._target_,
        "seed": run_cfg.seed,
        "checkpoint": str(path),
        "git_commit": run.get("git_commit"),
        "data_fingerprint": datamodule.fingerprint(),
        "prepared_fingerprint": datamodule.protocol_fingerprint(),
        "trained_on_data_fingerprint": run.get("data_fingerprint"),
        "protocol": datamodule.describe(),
        "timing": {"evaluate_seconds": seconds},  # the stage alone: loading the weights and scoring
        "environment": environment(),
        "output_dir": cfg.paths.output_dir,
    }
    if task.analysis is not None and task.analysis.results and trainer.is_global_zero:
        results["evaluation"] = task.analysis.describe()
        results["files"] = save_analysis(task.analysis, Path(cfg.paths.output_dir), history=[])
    if trainer.is_global_zero:  # under DDP every process holds the same synced values; one writes them
        write_results(results, Path(cfg.paths.output_dir))
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (ValueError, RuntimeError, OSError, InstantiationException) as err:
        message = user_error_message(err)
        if message is None:
            raise
        raise SystemExit(message) from None


if __name__ == "__main__":
    main()
