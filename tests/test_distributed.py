"""Across processes: in-batch negatives gathered from every DDP process train as one process on the global
batch (loss and gradients), with 2 CPU processes over gloo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from recsys_lab.modules.distributed import gather_rows
from recsys_lab.modules.losses import SampledSoftmaxLoss
from tests.helpers import free_port

B, D_IN, D = 6, 5, 4  # the global batch: 6 rows, 3 per process


def _global_batch():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(B, D_IN, generator=g)
    item_ids = torch.tensor([3, 7, 3, 1, 9, 7])  # repeats across the two halves: never a negative of itself
    log_q = torch.log_softmax(torch.randn(12, generator=g), 0)
    return features, item_ids, log_q


def _towers() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)  # the same weights in every process, as DDP's start-up broadcast makes them
    return nn.Linear(D_IN, D), nn.Linear(D_IN, D)


def _loss(query_tower, item_tower, features, item_ids, log_q, gather: bool):
    """What RetrievalTask.training_step computes, on these rows."""
    query, item = query_tower(features), item_tower(features * 0.5)
    positive = None
    if gather:
        item, offset = gather_rows(item)
        item_ids, _ = gather_rows(item_ids)
        positive = offset + torch.arange(len(query))
    return SampledSoftmaxLoss(temperature=0.5)(query, item, item_ids, log_q, positive)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    features, item_ids, log_q = _global_batch()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    query_tower, item_tower = _towers()
    loss = _loss(query_tower, item_tower, features[rows], item_ids[rows], log_q, gather=True)
    loss.backward()
    grads = []
    for p in [*query_tower.parameters(), *item_tower.parameters()]:
        dist.all_reduce(p.grad)  # DDP: gradients averaged across the processes
        grads.append((p.grad / world).flatten().tolist())
    # uneven counts (a last batch): the gathered rows are every process's rows in rank order
    uneven = torch.arange(3 + rank, dtype=torch.float).unsqueeze(1) + 10 * rank  # 3 rows, then 4
    gathered, offset = gather_rows(uneven)
    Path(out, f"{rank}.json").write_text(
        json.dumps(
            {"loss": float(loss), "grads": grads, "gathered": gathered.squeeze(1).tolist(), "offset": offset}
        )
    )
    dist.barrier()  # no process tears the group down while another is still in a collective
    dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters: ~5 s (CI runs it)
def test_cross_rank_negatives_train_as_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]

    features, item_ids, log_q = _global_batch()
    query_tower, item_tower = _towers()
    single = _loss(query_tower, item_tower, features, item_ids, log_q, gather=False)
    single.backward()
    # equal halves: the mean of the per-process means is the global mean
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(float(single), abs=1e-6)
    expected = [p.grad.flatten().tolist() for p in [*query_tower.parameters(), *item_tower.parameters()]]
    for got, want in zip(ranks[0]["grads"], expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    assert ranks[1]["grads"] == ranks[0]["grads"]
    # without gathering each process would see only its own 2 negatives: a different loss
    local = _loss(query_tower, item_tower, features[:3], item_ids[:3], log_q, gather=False)
    assert abs(float(local) - ranks[0]["loss"]) > 1e-3
    assert ranks[0]["gathered"] == ranks[1]["gathered"] == [0, 1, 2, 10, 11, 12, 13]
    assert [r["offset"] for r in ranks] == [0, 3]
