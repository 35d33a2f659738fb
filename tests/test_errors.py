"""Bad input to a run: each case stops before training with ONE line that names the config key or file and
what was expected (`user_error_message`, what train.py prints instead of a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recsys_lab.train import train
from recsys_lab.utils.checks import user_error_message
from tests.helpers import REPO, SMALL_DATA, model_overrides


def _garbage(tmp_path: Path) -> str:
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    return str(path)


def _truncated(tmp_path: Path) -> str:
    path = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(10_000)}}, path)
    path.write_bytes(path.read_bytes()[:5000])  # a copy interrupted half way
    return str(path)


# (case, model, overrides (a callable of tmp_path where a file is needed), expected message)
CASES = [
    (
        "a pair scorer under a task that needs encoders",
        "mf_bpr",
        lambda t: [
            "model.net._target_=recsys_lab.models.neumf.NeuMF",
            "~model.net.embedding_dim",
            "~model.net.item_bias",
        ],
        r"^error: PairwiseTask needs a model with encode_query, encode_item; NeuMF lacks",
    ),
    (
        "a single-head model under the multi-task task",
        "mmoe",
        lambda t: ["~model.net", "+model.net={_target_: recsys_lab.models.deepfm.DeepFM, embedding_dim: 4}"],
        r"^error: MultiTaskTask needs a multi-task model .*DeepFM lacks forward_heads",
    ),
    (
        "closed-form model under DDP",
        "ease",
        lambda t: ["trainer=ddp_cpu"],
        r"trainer\.strategy=ddp, trainer\.devices=2: .*FittedTask is fitted in closed form .* use trainer=default",
    ),
    (
        "a fine-tuning policy on a model without a pretrained encoder",
        "din",
        lambda t: ["model/finetune=lora"],
        r"^config error: model/finetune \(model\.net\.finetune\): recsys_lab\.models\.din\.DIN has no pretrained encoder",
    ),
    (
        "missing checkpoint",
        "din",
        lambda t: [f"ckpt_path={t / 'nope.ckpt'}"],
        r"ckpt_path=.*nope\.ckpt: no such checkpoint file",
    ),
    (
        "garbage checkpoint",
        "din",
        lambda t: [f"ckpt_path={_garbage(t)}"],
        r"ckpt_path=.*garbage\.ckpt: not a readable checkpoint",
    ),
    (
        "truncated checkpoint",
        "din",
        lambda t: [f"ckpt_path={_truncated(t)}"],
        r"ckpt_path=.*truncated\.ckpt: not a readable checkpoint",
    ),
    (
        "zero cut-off",
        "two_tower",
        lambda t: ["model.ks=[0]"],
        r"model\.ks=\[0\]: every k in ks must be a positive int",
    ),
    (
        "negative learning rate",
        "din",
        lambda t: ["model.optimizer.lr=-1"],
        r"model\.optimizer\.lr=-1: expected a positive number",
    ),
    (
        "bad optimizer argument",
        "din",
        lambda t: ["+model.optimizer.weight_decay=-1"],
        r"model\.optimizer / model\.scheduler: Invalid weight_decay",
    ),
    (
        "negative workers",
        "din",
        lambda t: ["data.num_workers=-1"],
        r"data\.num_workers=-1: expected an integer >= 0",
    ),
    (
        "zero training rows",
        "din",
        lambda t: ["data.max_train_rows=0"],
        r"data\.max_train_rows=0: expected a positive integer or null",
    ),
    (
        "unknown monitor",
        "din",
        lambda t: ["monitor=val/bogus"],
        r"monitor=val/bogus: this run logs \['val/auc', 'val/gauc', 'val/logloss'",
    ),
    (
        "unknown optimized metric",
        "two_tower",
        lambda t: ["optimized_metric=val/auc"],
        r"optimized_metric=val/auc: this run logs \['val/recall@10'",
    ),
    (
        "impossible candidates",
        "two_tower",
        lambda t: ["data.eval_candidates=uniform_100000"],
        r"data\.eval_candidates=uniform_100000: 100000 negatives per target cannot be drawn",
    ),
    (
        "history of a non-categorical",
        "din",
        lambda t: ["data.history_features=[price]"],
        r"data\.history_features: 'price' is not a categorical item column",
    ),
    (
        "negative epochs",
        "din",
        lambda t: ["trainer.max_epochs=-1"],
        r"trainer\.max_epochs=-1: expected a positive integer",
    ),
    (
        "no tabular file",
        "din",
        lambda t: ["data=tabular"],
        r"data\.path is not set: data=tabular reads your own interactions file",
    ),
    (
        "tabular path is a folder",
        "din",
        lambda t: ["data=tabular", f"data.path={t}"],
        r"data\.path=.* is a directory; expected a table file",
    ),
]


def _overrides(model: str, extra: list[str], tmp_path: Path) -> list[str]:
    base = model_overrides(model, tmp_path)
    if any(o.startswith("data=tabular") for o in extra):  # the simulator's own keys do not exist there
        base = [o for o in base if o not in SMALL_DATA and o != "data=ecommerce"]
    return [*base, *extra]


@pytest.mark.parametrize(("case", "model", "extra", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, model, extra, message, make_cfg, tmp_path):
    cfg = make_cfg(_overrides(model, extra(tmp_path), tmp_path))
    with pytest.raises(Exception) as info:  # noqa: B017 - the point is what train.py makes of any of them
        train(cfg)
    line = user_error_message(info.value)
    assert line is not None, f"{case}: {type(info.value).__name__} would print a traceback: {info.value}"
    assert "\n" not in line and line.startswith(("config error: ", "error: "))
    assert __import__("re").search(message, line), line
    assert "weights_only=False" not in line  # never advise loading an unknown file unsafely
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()  # stopped before training


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.num_workers=-1"], "error: data.num_workers=-1: expected an integer >= 0"),
        (["paths.log_dir=/dev/null/logs"], "error: cannot write the run directory /dev/null/logs"),
    ],
    ids=["wrapped by Hydra's instantiate", "unwritable log directory"],
)
def test_cli_prints_one_line_without_traceback(extra, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *SMALL_DATA, "logger=none", *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RECSYS_LAB_DATA": str(tmp_path / "data")},
    )
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
