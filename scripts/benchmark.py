"""Throughput of each model on one device: data gathering, training steps and evaluation scoring.

Run from the repository root (after `pip install -e .`):

    python scripts/benchmark.py                                      # din, two_tower, bert_cross_encoder
    python scripts/benchmark.py --models din --train-batches 100 --out bench.json
    python scripts/benchmark.py trainer=gpu                          # one GPU, bf16-mixed as in conf/trainer/gpu.yaml
    python scripts/benchmark.py data.batch_size=4096 --threads 4     # any override of conf/train.yaml
    python scripts/benchmark.py --fit --models sasrec gru4rec --time-to val/ndcg@10=0.05 \
        data=movielens data.path=../shared/data/ml-100k protocol=recbole_sequential   # time to quality

Each model's config is composed as `train.py` composes it (`model=<name>` followed by the overrides) and
`recsys_lab.train.build` returns the prepared DataModule and task. Every measurement first runs `--warmup`
batches, then times the next N batches only. The numbers:

- gather rows/s: training rows per second from iterating the training DataLoader with no model attached.
  Batches are gathered by tensor indexing into the feature store. For the cross-encoder this includes
  building the token pairs.
- train samples/s: training rows per second of optimisation steps: the task's own `training_step` (forward +
  loss), `backward()` and `optimizer.step()`. Gathering a batch and copying it to the device happen outside
  the timer, and so does Lightning's loop overhead (hooks, logging, progress bar): this is the model's cost.
- peak memory: the process's peak resident memory (data preparation included); on CUDA also the peak memory
  allocated by tensors (`torch.cuda.max_memory_allocated`) and the mean GPU utilisation sampled every 0.1 s
  during the timed training steps (`torch.cuda.utilization`, NVML; omitted without pynvml).
- eval scored pairs/s: (query, item) scores per second from the task's public `evaluate_batch` (what
  `validation_step` calls), in eval mode under `torch.no_grad()`. Metric updates are included, as in
  validation. A CTR model scores one impression
  per row. A retrieval model scores each query against the whole catalogue (queries x items per second,
  with masking and top-k included); the catalogue is encoded once before timing, as it is once per
  evaluation epoch.

With `--fit` each model is instead trained as `train.py` trains it (early stopping, best checkpoint tested)
and the report is time to quality: seconds of training per epoch, training samples/s, seconds until the
validation metric first reaches each `--time-to` value and until the best epoch, and the test metrics.

Small splits (the retrieval view trains on positives only) are cycled through, so N may exceed one epoch.
On CUDA the device is synchronised before every timer read. The machine's load average is reported with
the results: other processes sharing the CPU lower every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from recsys_lab.analysis.report import cpu_name
from recsys_lab.data.batch import Batch
from recsys_lab.train import CONFIG_DIR, build  # importing it registers the resolvers

REPO = Path(CONFIG_DIR).parent
DEFAULT_MODELS = ("din", "two_tower", "bert_cross_encoder")
# Timed batches when --train-batches / --eval-batches are not given. A MiniLM step takes over a second on
# a CPU, so the cross-encoder gets fewer.
TRAIN_BATCHES = {"bert_cross_encoder": 8}
EVAL_BATCHES = {"bert_cross_encoder": 5}
DEFAULT_TRAIN_BATCHES, DEFAULT_EVAL_BATCHES = 50, 20
AUTOCAST = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16}


# ---- config and device ------------------------------------------------------------------------------------
def compose_config(model: str, overrides: list[str]) -> DictConfig:
    """conf/train.yaml with `model=<model>` and the overrides, as `train.py` would see it.

    Outside a Hydra app run `${hydra:runtime.*}` has no value, so a path that still reads it is filled in:
    `root_dir` with the repository root and `output_dir` (unused: nothing is written) with logs/benchmark.
    `data_dir` resolves as in train.py, so the simulator cache under ./data is shared with training runs.
    """
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", *overrides])
    paths = OmegaConf.to_container(cfg.paths, resolve=False)
    fill = {"root_dir": str(REPO), "output_dir": str(REPO / "logs" / "benchmark")}
    with open_dict(cfg):
        for key, value in fill.items():
            if str(paths.get(key, "")).startswith("${hydra:"):
                cfg.paths[key] = value
    return cfg


def pick_device(cfg: DictConfig) -> torch.device:
    """The device `trainer.accelerator` asks for (one device, whatever `trainer.devices` says)."""
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit(f"benchmark: trainer.accelerator={accelerator} but CUDA is not available")
        return torch.device("cuda")
    if accelerator not in ("cpu", "auto"):
        raise SystemExit(f"benchmark: trainer.accelerator={accelerator} is not supported (cpu, gpu or auto)")
    return torch.device("cpu")


def autocast_factory(cfg: DictConfig, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A fresh autocast context per step, matching `trainer.precision` as Lightning applies it."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in AUTOCAST:
        raise SystemExit(
            f"benchmark: trainer.precision={precision} is not supported; use one of {list(AUTOCAST)}"
        )
    dtype = AUTOCAST[precision]
    return partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so a timer read covers the work that was launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless(loader: Iterable[Batch]) -> Iterator[Batch]:
    """Batches of `loader` forever: a new (reshuffled) epoch starts when one ends."""
    while True:
        yield from loader


# ---- the three measurements -------------------------------------------------------------------------------
def measure_gather(loader: Iterable[Batch], n_batches: int, warmup: int) -> float:
    """Rows per second of iterating the training DataLoader alone."""
    batches = endless(loader)
    for _ in range(warmup):
        next(batches)
    rows = 0
    start = time.perf_counter()
    for _ in range(n_batches):
        rows += len(next(batches))
    return rows / (time.perf_counter() - start)


def measure_train(
    task: pl.LightningModule,
    loader: Iterable[Batch],
    n_batches: int,
    warmup: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> float:
    """Training rows per second of `training_step` + backward + optimizer step (gathering not timed)."""
    configured = task.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    task.train()
    batches = endless(loader)
    rows, elapsed = 0, 0.0
    with warnings.catch_warnings():
        # outside a Trainer `self.log` warns and returns; the step itself is unchanged
        warnings.filterwarnings("ignore", message=r"You are trying to `self\.log\(\)`")
        for step in range(warmup + n_batches):
            batch = next(batches).to(device)
            sync(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = task.training_step(batch, step)
            loss.backward()
            optimizer.step()
            sync(device)
            if step >= warmup:
                elapsed += time.perf_counter() - start
                rows += len(batch)
    return rows / elapsed


@torch.no_grad()
def measure_eval(
    task: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    n_batches: int,
    warmup: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> float:
    """Scored (query, item) pairs per second of the task's public evaluation API on validation batches."""
    task.eval()
    with autocast():
        task.begin_evaluation("val")  # encodes the catalogue once for encoder models, as each epoch does
    batches = endless(datamodule.val_dataloader())
    pairs, elapsed = 0, 0.0
    for step in range(warmup + n_batches):
        batch = next(batches).to(device)
        sync(device)
        start = time.perf_counter()
        with autocast():
            task.evaluate_batch(batch, "val")
        sync(device)
        if step >= warmup:
            elapsed += time.perf_counter() - start
            if batch.eval is None:
                pairs += len(batch)  # one impression per row
            elif batch.eval.candidates is not None:
                pairs += int(batch.eval.candidates.lengths.sum())
            else:
                pairs += len(batch) * datamodule.schema.num_items
    task.end_evaluation("val")
    return pairs / elapsed


# ---- one model, the environment, the report ---------------------------------------------------------------
def benchmark_model(model: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cfg = compose_config(model, overrides)
    device = pick_device(cfg)
    autocast = autocast_factory(cfg, device)
    pl.seed_everything(cfg.seed, verbose=False)
    start = time.perf_counter()
    datamodule, task = build(cfg)
    build_s = time.perf_counter() - start
    task.to(device)
    train_batches = args.train_batches or TRAIN_BATCHES.get(model, DEFAULT_TRAIN_BATCHES)
    eval_batches = args.eval_batches or EVAL_BATCHES.get(model, DEFAULT_EVAL_BATCHES)
    print(f"[{model}] built in {build_s:.1f}s; timing on {device}", file=sys.stderr, flush=True)

    gather = measure_gather(datamodule.train_dataloader(), args.gather_batches, args.warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with GpuUtilisation(device) as utilisation:
        train = measure_train(
            task, datamodule.train_dataloader(), train_batches, args.warmup, device, autocast
        )
    evaluate = measure_eval(task, datamodule, eval_batches, args.warmup, device, autocast)
    return {
        "model": model,
        "net": cfg.model.net._target_,
        "batch_size": datamodule.batch_size,
        "eval_batch_size": datamodule.eval_batch_size,
        "catalogue_items": datamodule.schema.num_items if task.evaluation == "ranking" else None,
        "gather_rows_per_s": gather,
        "train_samples_per_s": train,
        "eval_pairs_per_s": evaluate,
        "device": str(device),
        "precision": str(cfg.trainer.get("precision", "32-true")),
        "warmup_batches": args.warmup,
        "gather_batches": args.gather_batches,
        "train_batches": train_batches,
        "eval_batches": eval_batches,
        "build_s": build_s,
        # the process's peak resident memory so far (data preparation included), and on CUDA the peak memory
        # allocated by tensors and the mean GPU utilisation (nvidia-smi's %) during the timed training steps
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3,
        "gpu_peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1024**3
        if device.type == "cuda"
        else None,
        "gpu_utilisation_pct": utilisation.mean,
    }


class GpuUtilisation:
    """Mean GPU utilisation (%) sampled every 0.1 s while the block runs; None off CUDA or without pynvml
    (`torch.cuda.utilization` reads NVML)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(torch.cuda.utilization(self.device))

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None

    def __enter__(self) -> GpuUtilisation:
        if self.device.type == "cuda":
            try:
                torch.cuda.utilization(self.device)
            except Exception:  # no pynvml / NVML: report None rather than fail the benchmark
                return self
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }


def _memory(r: dict[str, Any]) -> str:
    """Process RSS; on CUDA also the GPU's peak tensor memory and mean utilisation."""
    if r.get("gpu_peak_memory_gb") is None:
        return f"{r['peak_rss_gb']:.2f} RSS"
    util = r.get("gpu_utilisation_pct")
    busy = f", {util:.0f}% busy" if util is not None else ""
    return f"{r['gpu_peak_memory_gb']:.2f} GPU{busy}; {r['peak_rss_gb']:.2f} RSS"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown(results: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        "| model | batch size (train / eval) | gather rows/s | train samples/s | eval scored pairs/s | device "
        "| peak memory (GB) |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        device = r["device"] if r["precision"] in ("32-true", "32") else f"{r['device']} ({r['precision']})"
        lines.append(
            f"| {r['model']} | {r['batch_size']} / {r['eval_batch_size']} | {_rate(r['gather_rows_per_s'])} "
            f"| {_rate(r['train_samples_per_s'])} | {_rate(r['eval_pairs_per_s'])} | {device} "
            f"| {_memory(r)} |"
        )
    lines.append("")
    lines.append(
        f"torch {env['torch']}, {env['threads']} threads, CPU: {env['cpu']} ({env['cpu_count']} cores), "
        f"GPU: {env['gpu'] or 'none'}, load average at start: {env['load_avg_1m']:.2f}"
        if env["load_avg_1m"] is not None
        else f"torch {env['torch']}, {env['threads']} threads, CPU: {env['cpu']}, GPU: {env['gpu'] or 'none'}"
    )
    return "\n".join(lines)


def fit_model(model: str, overrides: list[str], time_to: dict[str, float]) -> dict[str, Any]:
    """Train one model as train.py does (into logs/benchmark/<model>-<time>) and report its time to quality."""
    from recsys_lab.train import train

    cfg = compose_config(model, ["logger=none", "trainer.enable_progress_bar=false", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(REPO / "logs" / "benchmark" / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.time_to = dict(time_to)
    results = train(cfg)
    timing, training = results["timing"], results["training"]
    per_epoch = timing.get("seconds_per_epoch")
    return {
        "model": model,
        "seconds_per_epoch": per_epoch,
        "train_samples_per_s": training["train_examples"] / per_epoch if per_epoch else None,
        **timing,
        "metrics": results["metrics"],
        "protocol": {k: results["protocol"].get(k) for k in ("split", "eval_candidates", "protocol_preset")},
    }


def fit_markdown(results: list[dict[str, Any]], time_to: dict[str, float]) -> str:
    targets = [f"seconds_to_{m}>={v}" for m, v in time_to.items()]
    head = [
        "model",
        "s/epoch",
        "samples/s",
        *[f"s to {t.removeprefix('seconds_to_')}" for t in targets],
        "s to best",
        "epochs",
        "test recall@10",
        "test ndcg@10",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v: Any) -> str:
        return (
            "—"
            if v is None
            else f"{v:,.1f}"
            if isinstance(v, float) and v >= 1
            else f"{v:.4f}"
            if isinstance(v, float)
            else str(v)
        )

    for r in results:
        m = r["metrics"]
        row = [
            r["model"],
            fmt(r["seconds_per_epoch"]),
            fmt(r["train_samples_per_s"]),
            *[fmt(r.get(t)) for t in targets],
            fmt(r.get("seconds_to_best")),
            fmt(r.get("epochs")),
            fmt(m.get("test/recall@10")),
            fmt(m.get("test/ndcg@10")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), help="conf/model/<name>.yaml names"
    )
    parser.add_argument(
        "--train-batches", type=int, default=None, help="timed training steps (default per model)"
    )
    parser.add_argument(
        "--eval-batches", type=int, default=None, help="timed eval batches (default per model)"
    )
    parser.add_argument("--gather-batches", type=int, default=50, help="timed DataLoader batches")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before each measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--fit", action="store_true", help="train each model fully: time to quality")
    parser.add_argument(
        "--time-to",
        nargs="*",
        default=[],
        metavar="METRIC=VALUE",
        help="with --fit: report the seconds until each validation metric first reaches its value",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml, e.g. trainer=gpu")
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--time-to X` is read here: argparse mixes repeated optionals with the trailing positional overrides
    time_to = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--time-to"]
    argv = [a for i, a in enumerate(argv) if a != "--time-to" and (i == 0 or argv[i - 1] != "--time-to")]
    args = parser.parse_args(argv)
    args.time_to = time_to
    # `--models din trainer=gpu`: nargs="+" takes the override too; hand it back
    overrides = [m for m in args.models if "=" in m] + args.overrides
    args.models = [m for m in args.models if "=" not in m]
    known = {p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml")}
    unknown = [m for m in args.models if m not in known]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; conf/model has {sorted(known)}")
    for name in ("train_batches", "eval_batches", "gather_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value}: expected a positive integer")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup}: expected a non-negative integer")
    return args, overrides


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, overrides = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment()
    if args.fit:
        time_to = {}
        for item in args.time_to:
            metric, _, value = item.partition("=")
            try:
                time_to[metric] = float(value)
            except ValueError:
                raise SystemExit(f"--time-to {item}: expected METRIC=VALUE, e.g. val/ndcg@10=0.05") from None
        results = [fit_model(model, overrides, time_to) for model in args.models]
        print(fit_markdown(results, time_to))
    else:
        results = [benchmark_model(model, overrides, args) for model in args.models]
        print(markdown(results, env))
    report = {"environment": env, "overrides": overrides, "results": results}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
