"""Single-process parts of scaling up: memory-bounded full-ranking evaluation and `compile=true`."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from recsys_lab.modules.compiled import COMPILED_METHODS, compile_net, compile_options
from recsys_lab.train import build
from tests.helpers import model_overrides


def _test_metrics(task, datamodule) -> dict[str, float]:
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.test(task, datamodule=datamodule, verbose=False)
    return metrics


def test_full_ranking_batches_hold_at_most_eval_max_scores(make_cfg, tmp_path):
    """Under full ranking the evaluation batches shrink so that queries x catalogue <= eval_max_scores, and
    the metrics do not change (they are sums over queries)."""
    cfg = make_cfg([*model_overrides("two_tower", tmp_path), "evaluation=accuracy"])
    datamodule, task = build(cfg)
    items = datamodule.store.num_item_codes
    assert datamodule.eval_rows() == 512  # the bound (2**28 scores) leaves small catalogues alone
    whole = _test_metrics(task, datamodule)

    datamodule.eval_max_scores = 7 * items + 3  # 7 queries a batch
    assert datamodule.eval_rows() == 7
    sizes = [len(batch) for batch in datamodule.test_dataloader()]
    assert max(sizes) == 7 and sum(sizes) == datamodule.counts["test_queries"]
    bounded = _test_metrics(task, datamodule)
    assert bounded.keys() == whole.keys()
    for name, value in whole.items():
        assert bounded[name] == pytest.approx(value, abs=1e-6), name

    datamodule.eval_max_scores = 1  # fewer scores than one query's row: one query a batch, not zero
    assert datamodule.eval_rows() == 1


def test_sampled_candidates_and_impressions_keep_eval_batch_size(make_cfg, tmp_path):
    cfg = make_cfg([*model_overrides("two_tower", tmp_path), "data.eval_candidates=uniform_20"])
    datamodule, _ = build(cfg)
    datamodule.eval_max_scores = 1
    assert datamodule.eval_rows() == 512
    cfg = make_cfg(model_overrides("din", tmp_path))  # CTR: logged test impressions
    datamodule, _ = build(cfg)
    datamodule.eval_max_scores = 1
    assert datamodule.eval_rows() == 512


def test_bad_eval_max_scores_is_named(make_cfg, tmp_path):
    cfg = make_cfg([*model_overrides("two_tower", tmp_path), "data.eval_max_scores=0"])
    with pytest.raises(Exception, match="eval_max_scores"):
        build(cfg)


def test_batches_go_to_a_gpu_from_pinned_memory(make_cfg, tmp_path, monkeypatch):
    """On CUDA the loaders pin their batches (Batch.pin_memory walks every tensor), so that Lightning's
    non-blocking copy can overlap; on the CPU nothing is pinned. (No GPU here: the device is a stand-in.)"""
    from types import SimpleNamespace

    datamodule, _ = build(make_cfg(model_overrides("din", tmp_path)))
    assert not datamodule.train_dataloader().pin_memory  # no trainer: the CPU
    for device, pinned in (("cpu", False), ("cuda", True)):
        datamodule.trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device(device)),
            world_size=1,
            global_rank=0,
            overfit_batches=0,
        )
        assert datamodule.train_dataloader().pin_memory is pinned
        assert datamodule.test_dataloader().pin_memory is pinned
    datamodule.trainer = None

    batch = next(iter(datamodule.train_dataloader()))
    seen = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: seen.append(t) or t.clone())
    pinned = batch.pin_memory()
    from recsys_lab.data.batch import _tensors

    originals = list(_tensors(batch))
    assert len(seen) == len(originals) > 5  # every tensor of every field group
    for a, b in zip(_tensors(pinned), originals, strict=True):
        assert a is not b and torch.equal(a, b)


# ---- compile=true ------------------------------------------------------------------------------------------
def test_compile_options_are_checked():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options({"mode": "max-autotune", "dynamic": True}) == {
        "mode": "max-autotune",
        "dynamic": True,
    }
    with pytest.raises(ValueError, match="unknown keys \\['modes'\\]"):
        compile_options({"modes": "default"})
    with pytest.raises(ValueError, match="compile.mode='fast'"):
        compile_options({"mode": "fast"})
    with pytest.raises(ValueError, match="compile=3"):
        compile_options(3)
    with pytest.raises(ValueError, match="has none of the methods"):
        compile_net(torch.nn.Module())


@pytest.mark.slow
@pytest.mark.parametrize("model", ["din", "sasrec"])
def test_compiled_model_computes_what_the_eager_one_does(make_cfg, tmp_path, model):
    """compile=true compiles the model's training methods in place: same outputs and gradients as the eager
    model on the same weights, the same state-dict keys, and the task (with its logging) left eager."""
    overrides = [*model_overrides(model, tmp_path), "model.net.dropout=0.0"]
    _, eager = build(make_cfg(overrides))
    datamodule, task = build(make_cfg([*overrides, "compile=true"]))
    compiled = [name for name in COMPILED_METHODS if name in vars(task.net)]
    assert compiled and "training_step" not in vars(task)  # methods of the net only
    assert task.net.state_dict().keys() == eager.net.state_dict().keys()
    task.net.load_state_dict(eager.net.state_dict())

    batch = next(iter(datamodule.train_dataloader()))
    losses = []
    for t in (eager, task):
        t.train()
        t.log = lambda *a, **k: None  # outside a Trainer
        loss = t.training_step(batch, 0)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in t.net.parameters() if p.grad is not None]))
    (loss_e, grads_e), (loss_c, grads_c) = losses
    assert torch.allclose(loss_c, loss_e, atol=1e-5)
    assert len(grads_c) == len(grads_e)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        assert torch.allclose(g_c, g_e, atol=1e-5)
