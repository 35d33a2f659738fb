"""Embedding tables built from the schema, and lookups that turn a `Batch` into dense tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema, Side
from recsys_lab.modules.attention import masked_mean


class HashedEmbedding(nn.Module):
    """An embedding table of `buckets` rows for ids of any range (the hashing trick, Weinberger et al., ICML
    2009): id 0 ("unknown") keeps row 0, any other id reads row 1 + (id * K mod 2^31) mod (buckets - 1), K a
    fixed odd multiplier that spreads consecutive ids. The table never grows: ids appended to a vocabulary
    later (`data.vocab_from`, incremental training) read existing rows, shared with colliding ids.

    forward(ids int64 any shape S) -> (*S, D); `weight` is the (buckets, D) table.
    """

    MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant (odd, ~2^32 / golden ratio)

    def __init__(self, buckets: int, embedding_dim: int) -> None:
        super().__init__()
        if buckets < 2:
            raise ValueError(f"HashedEmbedding: buckets={buckets}, expected >= 2")
        self.buckets = buckets
        self.table = nn.Embedding(buckets, embedding_dim)

    @property
    def weight(self) -> Tensor:
        return self.table.weight

    def rows(self, ids: Tensor) -> Tensor:
        """The row of each id: 0 for id 0, else in 1..buckets-1."""
        hashed = (ids * self.MULTIPLIER) % (1 << 31) % (self.buckets - 1) + 1
        return torch.where(ids == 0, torch.zeros_like(ids), hashed)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table(self.rows(ids))


class QREmbedding(nn.Module):
    """Quotient-remainder compositional embedding (Shi et al., "Compositional Embeddings Using Complementary
    Partitions for Memory-Efficient Recommendation Systems", KDD 2020, arXiv:1909.02107): id i reads row
    i // m of a quotient table (ceil(V / m) rows) and row i mod m of a remainder table (m rows), and the two are
    multiplied element-wise (the paper's best operation). The two partitions are complementary, so every id
    keeps a distinct vector while the tables hold ceil(V / m) + m rows instead of V (at m ≈ sqrt(V), about
    2 sqrt(V)); unlike hashing, no two ids share a representation.

    forward(ids int64 any shape S, each < vocab_size) -> (*S, D); `weight` is the (vocab_size, D) matrix of
    every id's vector, computed.
    """

    def __init__(self, vocab_size: int, collisions: int, embedding_dim: int) -> None:
        super().__init__()
        if collisions < 2 or collisions >= vocab_size:
            raise ValueError(
                f"QREmbedding: collisions={collisions}, expected 2 <= m < vocab_size={vocab_size}"
            )
        self.vocab_size, self.collisions = vocab_size, collisions
        self.quotient = nn.Embedding(-(-vocab_size // collisions), embedding_dim)  # ceil(V / m) rows
        self.remainder = nn.Embedding(collisions, embedding_dim)

    @property
    def weight(self) -> Tensor:
        return self(torch.arange(self.vocab_size, device=self.quotient.weight.device))

    def forward(self, ids: Tensor) -> Tensor:
        return self.quotient(ids // self.collisions) * self.remainder(ids % self.collisions)


# the one install that works with torch 2.13 (CPU): torchrec's declared dependencies would pull the CUDA fbgemm-gpu
# and pin torchmetrics==1.0.3; fbgemm-gpu-cpu 1.9.0 does not load on torch 2.13
TORCHREC_INSTALL = "pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0 && pip install tensordict pyre-extensions tqdm"


def import_torchrec():
    """The `torchrec` module, or an ImportError naming the install (TorchRec is an optional extra)."""
    try:
        import torchrec
    except ImportError as err:
        raise ImportError(
            f"data.torchrec_tables / trainer=torchrec need TorchRec, an optional extra: {TORCHREC_INSTALL}"
        ) from err
    return torchrec


def _keep_init(weight: Tensor) -> None:
    """A TorchRec `init_fn` that leaves the weight as `nn.Embedding` initialised it."""


class TorchRecEmbedding(nn.Module):
    """One id table held as a TorchRec `EmbeddingCollection` (unpooled lookups), the form
    `recsys_lab.utils.torchrec_strategy.TorchRecStrategy` (`trainer=torchrec`) shards across processes. Unsharded
    it is an `nn.Embedding` of the same N(0, 1) init and outputs; sharded, each lookup is a collective, so every
    process must look up as many times (the same steps and evaluation batches).

    forward(ids int64 any shape S) -> (*S, D); `weight` is the (vocab_size, D) table (unsharded only).
    """

    def __init__(self, name: str, vocab_size: int, embedding_dim: int) -> None:
        super().__init__()
        torchrec = import_torchrec()
        self.name = name
        # one table, one feature of the same name: TorchRec names both; the strategy plans per table name.
        # `init_fn` keeps nn.Embedding's own N(0, 1) init (TorchRec's default redraws U(+-sqrt(1/V))): a seeded
        # model starts where it does with nn.Embedding tables
        config = torchrec.EmbeddingConfig(
            name=name,
            embedding_dim=embedding_dim,
            num_embeddings=vocab_size,
            feature_names=[name],
            init_fn=_keep_init,
        )
        self.collection = torchrec.EmbeddingCollection(tables=[config])

    @property
    def weight(self) -> Tensor:
        return self.collection.embeddings[self.name].weight

    def forward(self, ids: Tensor) -> Tensor:
        from torchrec import KeyedJaggedTensor

        # a (B,) batch is B bags of one id, a (..., L) one is prod(...) bags of L ids: the jagged values are the
        # ids in order, and so are the unpooled embeddings
        width = ids.shape[-1] if ids.dim() > 1 else 1
        bags = math.prod(ids.shape[:-1]) if ids.dim() > 1 else ids.numel()
        lengths = torch.full((bags,), width, dtype=torch.long, device=ids.device)
        features = KeyedJaggedTensor(keys=[self.name], values=ids.reshape(-1), lengths=lengths)
        values = self.collection(features)[self.name].values()  # (prod(S), D)
        return values.reshape(*ids.shape, values.shape[-1])  # (*S, D)


class FeatureEmbedding(nn.Module):
    """One embedding table per sparse feature; seq features share the table named by their `embed_as`. A
    feature with `buckets` (`data.hash_buckets`) gets a `HashedEmbedding` of that many rows instead, one with
    `qr_collisions` (`data.qr_embeddings`) a `QREmbedding`, one with `torchrec_table` (`data.torchrec_tables`) a
    `TorchRecEmbedding`.

    A seq feature without `embed_as` gets a table of its own. Only the features a model reads should get a table,
    otherwise unused tables never receive gradients: `sides` keeps the sparse and seq features of those sides,
    plus every table a kept seq feature points to through `embed_as` (whatever that table's side).

    Args:
        schema: the dataset's features.
        embedding_dim: D, width of every table.
        sides: sides whose sparse and seq features get tables; None keeps all sides.
    """

    def __init__(self, schema: Schema, embedding_dim: int, sides: Sequence[Side] | None = None) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        keep_sides = tuple(sides) if sides is not None else None
        sparse = schema.select("sparse", keep_sides)
        seq = schema.select("seq", keep_sides)
        # feature name -> table name: the identity for sparse features, `embed_as` for shared seq features
        self._table_of: dict[str, str] = {f.name: f.name for f in sparse}
        self._table_of.update({f.name: f.embed_as or f.name for f in seq})
        self.tables = nn.ModuleDict()
        for table in dict.fromkeys(self._table_of.values()):  # ordered and unique: stable parameter order
            feature = schema[table]
            if feature.buckets:  # data.hash_buckets: a fixed table, ids hashed into it
                self.tables[table] = HashedEmbedding(feature.buckets, embedding_dim)
            elif feature.qr_collisions:  # data.qr_embeddings: quotient and remainder tables
                self.tables[table] = QREmbedding(feature.vocab_size, feature.qr_collisions, embedding_dim)
            elif feature.torchrec_table:  # data.torchrec_tables: a table trainer=torchrec can shard
                self.tables[table] = TorchRecEmbedding(table, feature.vocab_size, embedding_dim)
            else:
                self.tables[table] = nn.Embedding(feature.vocab_size, embedding_dim)

    def table(self, name: str) -> nn.Module:
        """The table a sparse or seq feature is looked up in (shared tables are the same object)."""
        if name not in self._table_of:
            raise KeyError(
                f"FeatureEmbedding has no table for feature '{name}'; it has {sorted(self._table_of)}"
            )
        return self.tables[self._table_of[name]]

    def sparse(self, batch: Batch, names: Sequence[str]) -> Tensor:
        """Embeddings of sparse features `names`: float (B, F, D)."""
        return torch.stack([self.table(n)(batch.sparse[n]) for n in names], dim=1)  # (B, F, D)

    def seq(self, batch: Batch, names: Sequence[str]) -> Tensor:
        """Embeddings of seq features `names`, side by side per position: float (B, L, F*D).

        The features must be parallel (same L); padded positions hold embeddings of whatever id is there, so
        callers mask with `Seq.mask()`.
        """
        return torch.cat([self.table(n)(batch.seq[n].ids) for n in names], dim=-1)  # (B, L, F*D)


def check_hashed_features(net: nn.Module, schema: Schema) -> None:
    """`data.hash_buckets` / `data.qr_embeddings` / `data.torchrec_tables` apply to the tables `FeatureEmbedding`
    builds: a model that builds its own id table of such a feature (sized by its vocabulary) would silently ignore
    them, so it stops with the feature named."""
    hashed = {
        f.name: f.vocab_size for f in schema.features if f.buckets or f.qr_collisions or f.torchrec_table
    }
    if not hashed:
        return
    served = {
        name
        for m in net.modules()
        if isinstance(m, FeatureEmbedding)
        for name, table in m.tables.items()
        if isinstance(table, (HashedEmbedding, QREmbedding, TorchRecEmbedding))
    }
    # tables outside any FeatureEmbedding sized like a hashed vocabulary: a model's own id table of that feature
    inside = {id(t) for m in net.modules() if isinstance(m, FeatureEmbedding) for t in m.modules()}
    own = {
        name
        for name, size in hashed.items()
        for m in net.modules()
        if isinstance(m, nn.Embedding) and id(m) not in inside and m.num_embeddings == size
    }
    unserved = sorted((set(hashed) - served) | own)
    if unserved:
        raise ValueError(
            f"data.hash_buckets / data.qr_embeddings / data.torchrec_tables: {type(net).__name__} builds its own "
            f"id tables for {unserved} (or does not read them), so they cannot be compressed or sharded; hashed, "
            "quotient-remainder and TorchRec tables apply to models whose tables are FeatureEmbedding's (din, "
            "two_tower, deepfm, dcnv2, ...)"
        )


def pooled_seq_and_dense(
    embedding: FeatureEmbedding, batch: Batch, seq_names: Sequence[str], dense_names: Sequence[str]
) -> list[Tensor]:
    """What a target-attention ranker (DIN, DIEN, BST) reads beside its behaviour history: each seq feature of
    `seq_names` mean-pooled over its real positions, (B, D) each, then the dense features side by side,
    (B, sum(dim)), if any. The papers sum-pool such groups; the mean keeps their scale independent of the
    history length."""
    parts = [masked_mean(embedding.seq(batch, [name]), batch.seq[name].mask()) for name in seq_names]
    if dense_names:
        parts.append(concat_dense(batch, dense_names))
    return parts


def pooled_width(
    schema: Schema, embedding_dim: int, seq_names: Sequence[str], dense_names: Sequence[str]
) -> int:
    """The width of `pooled_seq_and_dense`'s parts side by side: D per seq feature plus the dense features'."""
    return len(seq_names) * embedding_dim + sum(schema[name].dim for name in dense_names)


def concat_dense(batch: Batch, names: Sequence[str]) -> Tensor:
    """Dense features `names` side by side: float (B, sum of dims). A [B] feature becomes one column."""
    columns = [batch.dense[n].unsqueeze(-1) if batch.dense[n].dim() == 1 else batch.dense[n] for n in names]
    return torch.cat(columns, dim=-1)  # (B, sum(dim))


class UnknownItemIds(nn.Module):
    """The item ids an id table should read when cold-start items must not read untrained rows.

    Items never a training positive (`schema.item_counts` 0, the cold-start items among them) have a row that
    no gradient ever reached: they read row 0, "unknown", instead. During training each id is also hidden (set
    to 0) with probability `dropout`, so that row 0 learns to stand for an item known by its content alone
    (DropoutNet, Volkovs et al., NeurIPS 2017).

    forward(codes (any shape), hide=True) -> ids of the same shape; `hide=False` skips the dropout (ids that
    describe the query, e.g. its history, rather than the item being learned).
    """

    def __init__(self, schema: Schema, dropout: float) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.net.id_dropout={dropout}: expected a probability in [0, 1)")
        self.dropout = dropout
        counts = schema.item_counts if schema.item_counts is not None else torch.ones(schema.num_items)
        self.register_buffer("trained", counts > 0, persistent=False)  # (V,)

    def forward(self, codes: Tensor, hide: bool = True) -> Tensor:
        ids = torch.where(self.trained[codes], codes, 0)
        if hide and self.training and self.dropout > 0:
            ids = torch.where(torch.rand(ids.shape, device=ids.device) < self.dropout, 0, ids)
        return ids
