"""Across processes (DDP): gathering rows from every process with gradients, for negatives that grow with the
world size."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_GROUP: dict[str, object] = {}


def _group():
    """A process group of its own for the gathers: DDP's reducer all-reduces gradient buckets on the default
    group while the backward pass runs, and a gather's backward collective issued on that group could pair
    with a bucket of another process (the two streams are not ordered alike on every process)."""
    if "group" not in _GROUP:
        _GROUP["group"] = dist.new_group(backend=dist.get_backend())
    return _GROUP["group"]


class _GatherRows(torch.autograd.Function):
    """all_gather of equally shaped rows whose backward hands every process the summed gradient of its own
    rows: each process's loss may read every process's rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, size = world()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=_group())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)  # (size * rows, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=_group())  # every process's gradient with respect to every row
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """Every process's rows of x [B_r, ...], concatenated in rank order, and where this process's rows start.

    Differentiable: the backward pass sends each process the gradient of every process's loss with respect to
    its own rows (summed over the processes), so a loss over the gathered rows trains as a single process
    would on the concatenated batch. Processes may hold different numbers of rows (a last batch): rows are
    padded to the largest count for the collective and the padding is cut off again. Without a process group,
    x itself and 0.
    """
    rank, size = world()
    if size == 1:
        return x, 0
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device), group=_group())
    counts = [int(c) for c in counts]
    most = max(counts)
    padded = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))]) if x.shape[0] < most else x
    if x.requires_grad:
        gathered = _GatherRows.apply(padded)  # (size * most, ...)
    else:  # ids and other constants: a plain collective
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded.contiguous(), group=_group())
        gathered = torch.cat(parts)
    rows = torch.cat([gathered[r * most : r * most + n] for r, n in enumerate(counts)])
    return rows, sum(counts[:rank])
