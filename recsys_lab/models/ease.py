"""EASE: a linear item-item model fitted in closed form on the training interactions; no gradient steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema


class EASE(nn.Module):
    """EASE, Embarrassingly Shallow Autoencoder (Steck, WWW 2019, "Embarrassingly Shallow Autoencoders for
    Sparse Data", arXiv:1905.03375).

    Fitted in the constructor from `schema.train_pairs` (the training split only): min_B |X − XB|² + λ|B|²
    subject to diag(B) = 0 has the closed form B = I − P·diagMat(1/diag(P)), P = (XᵀX + λI)⁻¹ (eq. 8), i.e.
    B_ij = −P_ij / P_jj off the diagonal and 0 on it, X the binary user-item matrix (a pair listed twice is one
    interaction). No trainable parameters, so it runs under `FittedTask` (no epochs).

    The score of item j for user u is (X_u B)_j, X_u the user's training row. As an encoder model:
    encode_query = X_u B (B, V) and encode_item = one-hot rows of the item codes (N, V), so that
    `encode_query(batch) @ encode_item(items).T` is the EASE score matrix. The query is the training row only:
    interactions of later splits (a validation positive, at test time) are not added to it.

    B is V x V (float64 during the fit): catalogues above `max_items` stop with an error instead of exhausting
    memory. Every buffer is non-persistent: the constructor refits deterministically, and V x V floats would
    dominate every checkpoint.

    Args:
        schema: the dataset's features; needs `train_pairs`. Reads the user-id and item-id features only.
        l2: λ, the L2 weight (RecBole's EASE reg_weight: 250; Steck tunes it per dataset, e.g. 500 on ML-20M).
        max_items: the largest catalogue (item codes) to fit.

    encode_query(batch) -> (B, V); encode_item(item batch) -> (N, V); forward(batch) -> (B,), their row-wise dot.
    """

    reads_features = False  # ids only: its batches carry the user and item ids, nothing else

    def __init__(self, schema: Schema, l2: float = 250.0, max_items: int = 50_000) -> None:
        super().__init__()
        U, V = schema.num_users, schema.num_items
        if V > max_items:
            gib = 2 * V * V * 8 / 2**30  # XᵀX and its inverse in float64
            raise ValueError(
                f"EASE: the catalogue has {V} item codes, above max_items={max_items}; the fit needs about "
                f"{gib:.1f} GiB (V x V float64, twice). Raise model.net.max_items if the memory is there, or "
                "filter items (data.preprocess.item_core)"
            )
        if l2 <= 0:
            raise ValueError(f"EASE: l2 must be > 0 (it makes XᵀX + λI invertible), got {l2}")
        self.user_key, self.item_key, self.num_items = schema.user_id, schema.item_id, V
        # X as compressed rows: user u's items are item_codes[row_start[u] : row_start[u + 1]]; a dense (U, V)
        # would cost as much as B again on large data
        pairs = torch.unique(schema.require_train_pairs("EASE").long(), dim=0)  # (E, 2) sorted by user, item
        counts = torch.bincount(pairs[:, 0], minlength=U)  # (U,)
        self.register_buffer(
            "row_start", torch.cat([counts.new_zeros(1), counts.cumsum(0)]), persistent=False
        )
        self.register_buffer("item_codes", pairs[:, 1].contiguous(), persistent=False)
        self.register_buffer("B", self._fit(U, l2).float(), persistent=False)  # (V, V)

    def _fit(self, num_users: int, l2: float) -> Tensor:
        """B (float64 [V, V]) by the closed form above."""
        V = self.num_items
        gram = torch.zeros(V, V, dtype=torch.float64)  # XᵀX: item co-occurrence counts
        chunk = max(1, 2**24 // V)  # users per dense (chunk, V) slice of X: at most 128 MiB
        for start in range(0, num_users, chunk):
            x = self.user_rows(torch.arange(start, min(start + chunk, num_users)), torch.float64)  # (c, V)
            gram += x.T @ x
        gram.diagonal().add_(l2)
        # XᵀX + λI is symmetric positive definite; float64 and Cholesky keep its inverse accurate
        P = torch.cholesky_inverse(torch.linalg.cholesky(gram))  # (V, V)
        B = -P / P.diagonal().unsqueeze(0)  # column j divided by P_jj
        B.diagonal().zero_()  # the constraint: an item may not recommend itself
        return B

    def user_rows(self, users: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """X[users]: the binary training rows (B, V) of user codes (a code without training pairs: zeros)."""
        start, end = self.row_start[users], self.row_start[users + 1]  # (B,)
        lengths = end - start
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), lengths)  # (nnz,)
        # position of each entry inside its user's slice, plus the slice's offset in item_codes
        first = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)  # (nnz,)
        within = torch.arange(len(rows), device=users.device) - first
        cols = self.item_codes[torch.repeat_interleave(start, lengths) + within]  # (nnz,)
        x = torch.zeros(len(users), self.num_items, dtype=dtype, device=users.device)  # (B, V)
        x[rows, cols] = 1.0
        return x

    def encode_query(self, batch: Batch) -> Tensor:
        """User codes of B rows -> EASE scores of every item code (B, V)."""
        return self.user_rows(batch.sparse[self.user_key], self.B.dtype) @ self.B  # (B, V)

    def encode_item(self, batch: Batch) -> Tensor:
        """Item codes of N items -> one-hot rows (N, V): the dot with a query picks that item's score."""
        return F.one_hot(batch.sparse[self.item_key], self.num_items).to(self.B.dtype)  # (N, V)

    def forward(self, batch: Batch) -> Tensor:
        # = (encode_query * encode_item).sum(-1) without the (B, V) x (V, V) product: only column j of B is needed
        x = self.user_rows(batch.sparse[self.user_key], self.B.dtype)  # (B, V)
        return (x * self.B[:, batch.sparse[self.item_key]].T).sum(dim=-1)  # (B,)
