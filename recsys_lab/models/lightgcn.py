"""LightGCN: ID embeddings smoothed over the user-item training graph, with no weights and no nonlinearity."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema


def normalized_adjacency(pairs: Tensor, num_users: int, num_items: int) -> Tensor:
    """Â = D^-1/2 A D^-1/2 of the user-item bipartite graph (LightGCN eq. 7), a sparse CSR float (U + V, U + V).

    Nodes are the user codes 0..U-1 followed by the item codes (item code i is node U + i). A has a 1 for every
    distinct (user, item) pair of `pairs` (int64 [P, 2]), in both directions; a pair listed twice is one edge.
    A node without edges (code 0, unknown; a user with no training positive) gets an empty row and column
    instead of the 1/0 of D^-1/2.
    """
    if len(pairs) and (pairs.min() < 0 or pairs[:, 0].max() >= num_users or pairs[:, 1].max() >= num_items):
        raise ValueError(
            f"LightGCN: training pairs hold codes outside the vocabularies ({num_users} users, {num_items} items)"
        )
    pairs = torch.unique(pairs.long(), dim=0)  # (E, 2): duplicates counted once
    users, items = pairs[:, 0], pairs[:, 1] + num_users
    rows = torch.cat([users, items])  # (2E,) both directions: A is symmetric
    cols = torch.cat([items, users])
    n = num_users + num_items
    degree = torch.bincount(rows, minlength=n).double()  # (U + V,)
    inv_sqrt = torch.where(degree > 0, degree.clamp(min=1).rsqrt(), torch.zeros_like(degree))
    values = (inv_sqrt[rows] * inv_sqrt[cols]).float()  # 1 / sqrt(|N_u| |N_i|)
    indices = torch.stack([rows, cols])
    coo = torch.sparse_coo_tensor(indices, values, (n, n), check_invariants=True).coalesce()
    # CSR: its CPU product with a dense matrix is several times faster than COO's
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr()


class SymmetricSparseProduct(torch.autograd.Function):
    """Â @ x for a symmetric sparse Â, x (n, D) -> (n, D). The gradient is Âᵀ @ grad = Â @ grad: autograd's
    own backward of a sparse product would transpose Â (a re-sort of every edge) at every step."""

    @staticmethod
    def forward(ctx, adjacency: Tensor, x: Tensor) -> Tensor:
        ctx.adjacency = adjacency
        return torch.sparse.mm(adjacency, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        return None, torch.sparse.mm(ctx.adjacency, grad)


class LightGCN(nn.Module):
    """LightGCN (He et al., SIGIR 2020, "LightGCN: Simplifying and Powering Graph Convolution Network for
    Recommendation", arXiv:2002.02126).

    The only parameters are the ego embeddings E^(0) of every user and item code. Each layer averages the
    neighbours, E^(k+1) = Â E^(k), over the graph of the training pairs only (`schema.train_pairs`: a held-out
    interaction must not leak into its own score), and the final embedding is the layer mean,
    e = (E^(0) + ... + E^(K)) / (K + 1) (α_k = 1 / (K + 1), eq. 4). score(u, i) = e_u · e_i.

    Propagation runs over the whole graph, so one call serves every row: the propagated tables are cached and
    reused until the embeddings change (an optimizer step, loading weights, a move to another device) or, while
    they carry a graph, until backward has run through them. `PairwiseTask` encodes queries, positives and
    negatives of a step in three calls, all from one propagation; evaluation propagates once per epoch, not once
    per query batch. `train()` drops the cache as well.

    The paper's L2 penalty on the batch's ego embeddings is not in the model: `PairwiseTask` hands its loss the
    scores only, so it is the optimizer's weight decay in config (see conf/model/lightgcn.yaml).

    Args:
        schema: the dataset's features; needs `train_pairs`. Reads the user-id and item-id features only.
        embedding_dim: D, width of the ego embeddings.
        num_layers: K, propagation layers (0 = matrix factorisation).
        init_std: standard deviation of the normal initialisation of E^(0) (0.1 in the authors' code).

    encode_query(batch) -> (B, D); encode_item(item batch) -> (N, D); forward(batch) -> (B,), their row-wise dot.
    """

    reads_features = False  # ids only: its batches carry the user and item ids, nothing else

    def __init__(
        self, schema: Schema, embedding_dim: int = 64, num_layers: int = 3, init_std: float = 0.1
    ) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"LightGCN: num_layers must be >= 0, got {num_layers}")
        pairs = schema.require_train_pairs("LightGCN")
        self.user_key, self.item_key = schema.user_id, schema.item_id
        self.num_users, self.num_items, self.num_layers = schema.num_users, schema.num_items, num_layers
        self.user = nn.Embedding(self.num_users, embedding_dim)
        self.item = nn.Embedding(self.num_items, embedding_dim)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        # Not a buffer: rebuilt from the schema by the constructor, so checkpoints hold the embeddings only, and
        # DDP, which broadcasts every buffer at start-up, cannot broadcast a sparse CSR tensor. `graph()` moves
        # it to the embeddings' device and dtype on first use instead.
        self.adjacency = normalized_adjacency(pairs, self.num_users, self.num_items)
        self._cache: tuple[tuple, Tensor, Tensor] | None = None

    def graph(self, like: Tensor) -> Tensor:
        """Â on the device and in the dtype of `like` (moved once, then kept there)."""
        if self.adjacency.device != like.device or self.adjacency.dtype != like.dtype:
            self.adjacency = self.adjacency.to(device=like.device, dtype=like.dtype)
        return self.adjacency

    def propagate(self) -> tuple[Tensor, Tensor]:
        """Final embeddings of every user code (U, D) and item code (V, D): the mean of layers 0..K."""
        ego = torch.cat([self.user.weight, self.item.weight])  # (U + V, D)
        adjacency = self.graph(ego)
        # a sum of many small weighted terms: kept in the adjacency's float32 under mixed precision
        with torch.autocast(device_type=ego.device.type, enabled=False):
            layers = [ego]
            for _ in range(self.num_layers):
                layers.append(SymmetricSparseProduct.apply(adjacency, layers[-1]))  # (U + V, D)
            final = torch.stack(layers).mean(dim=0)  # (U + V, D)
        users, items = final.split([self.num_users, self.num_items])
        return users, items

    def _drop_cache(self, grad: Tensor | None = None) -> None:
        self._cache = None

    def tables(self) -> tuple[Tensor, Tensor]:
        """`propagate()`, computed once for as long as its inputs are unchanged (see the class docstring)."""
        # storage and in-place version counters change on every optimizer step, load_state_dict and device move
        weights = (self.user.weight, self.item.weight)
        key = (*(w.data_ptr() for w in weights), *(w._version for w in weights), torch.is_grad_enabled())
        if self._cache is None or self._cache[0] != key:
            users, items = self.propagate()
            if users.requires_grad:  # a graph is freed by backward: never reuse it afterwards
                users.register_hook(self._drop_cache)
                items.register_hook(self._drop_cache)
            self._cache = (key, users, items)
        return self._cache[1], self._cache[2]

    def train(self, mode: bool = True) -> LightGCN:
        self._cache = None  # switching between training and evaluation always starts from fresh tables
        return super().train(mode)

    def encode_query(self, batch: Batch) -> Tensor:
        """User codes of B rows -> propagated user embeddings (B, D)."""
        return self.tables()[0][batch.sparse[self.user_key]]

    def encode_item(self, batch: Batch) -> Tensor:
        """Item codes of N items (a catalogue batch holds only item-side features) -> (N, D)."""
        return self.tables()[1][batch.sparse[self.item_key]]

    def forward(self, batch: Batch) -> Tensor:
        return (self.encode_query(batch) * self.encode_item(batch)).sum(dim=-1)  # (B,)
