"""The retrieval stage's nearest-neighbour index: item encodings in FAISS, searched by inner product, with each
query's seen items filtered out.

Any model with `encode_query` / `encode_item` scores q . v; this index returns the k best items for a batch of
queries without scoring the whole catalogue when the catalogue is large:

- "flat": exact inner product (`IndexFlatIP`): the same items as `q @ items.T` + top-k, for small catalogues
  and tests;
- "hnsw": a navigable small-world graph (Malkov & Yashunin, TPAMI 2018, arXiv:1603.09320), approximate, no
  training, the usual choice up to tens of millions of items (`hnsw_m` links per node, `ef_search` breadth);
- "ivfpq": an inverted file with product quantisation (Jégou et al., TPAMI 2011): vectors compressed to
  `pq_m` bytes, searched in `nprobe` of `nlist` cells; trained on the vectors themselves;
- "sq8": every vector scanned like "flat", but stored as int8, one byte per dimension (a quarter of float32):
  each dimension's range, learned from the vectors, is cut into 256 steps (FAISS's 8-bit scalar quantiser).

Seen items are filtered by over-fetching: each batch asks FAISS for k + (the longest exclusion list of the batch)
neighbours and drops the excluded ones (one comparison against a padded exclusion matrix, no loop over the
results), so a query always gets k items when the catalogue has them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KINDS = ("flat", "hnsw", "ivfpq", "sq8")


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise ModuleNotFoundError('ItemIndex needs FAISS: pip install -e ".[serve]" (faiss-cpu)') from err
    return faiss


class ItemIndex:
    """Item encodings (N, D) with their item codes, searchable by inner product.

    Args:
        vectors: float (N, D) item encodings (`encode_item` of the catalogue).
        codes: int (N,) the item code of each row (default 0..N-1).
        kind: "flat", "hnsw", "ivfpq" or "sq8" (see the module docstring).
        hnsw_m, ef_search: HNSW's links per node and search breadth.
        nlist, nprobe, pq_m, pq_bits: IVF-PQ's cells, cells searched, sub-quantisers (must divide D) and bits
            per code.

    search(queries (B, D), k, exclude) -> (scores float32 (B, k), codes int64 (B, k)), best first; a row with
    fewer than k admissible items is padded with score -inf and code -1.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        codes: np.ndarray | None = None,
        kind: str = "flat",
        hnsw_m: int = 32,
        ef_search: int = 128,
        nlist: int = 256,
        nprobe: int = 16,
        pq_m: int = 8,
        pq_bits: int = 8,
    ) -> None:
        faiss = _faiss()
        if kind not in KINDS:
            raise ValueError(f"ItemIndex: kind='{kind}', expected one of {KINDS}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(
                f"ItemIndex: vectors must be a non-empty (N, D) array, got shape {vectors.shape}"
            )
        n, dim = vectors.shape
        self.codes = np.arange(n, dtype=np.int64) if codes is None else np.asarray(codes, dtype=np.int64)
        if self.codes.shape != (n,):
            raise ValueError(f"ItemIndex: codes must be ({n},), got {self.codes.shape}")
        self.kind, self.dim = kind, dim
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search
        elif kind == "sq8":
            self.index = faiss.IndexScalarQuantizer(
                dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
            self.index.train(vectors)  # each dimension's min and max
        else:
            if dim % pq_m:
                raise ValueError(f"ItemIndex: pq_m={pq_m} must divide the encoding width {dim}")
            nlist = min(nlist, n)  # a cell per vector at most
            quantizer = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, pq_bits, faiss.METRIC_INNER_PRODUCT)
            self.index.train(vectors)
            self.index.nprobe = nprobe
            self._quantizer = quantizer  # FAISS does not own it from Python: keep it alive
        self.index.add(vectors)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best items per query by inner product, `exclude[b]` (item codes, e.g. seen items) left out."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"ItemIndex.search: queries must be (B, {self.dim}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"ItemIndex.search: k={k}, expected >= 1")
        B = len(queries)
        if exclude is not None and len(exclude) != B:
            raise ValueError(f"ItemIndex.search: {len(exclude)} exclusion lists for {B} queries")
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        fetch = min(k + extra, len(self))
        scores, rows = self.index.search(queries, fetch)  # (B, fetch); row -1 where FAISS found fewer
        found = np.where(rows >= 0, self.codes[np.clip(rows, 0, None)], -1)  # (B, fetch) item codes
        keep = rows >= 0  # (B, fetch)
        if extra:
            # exclusion lists as one right-padded (B, E) matrix (-2 pads: never a code nor FAISS's -1)
            padded = np.full((B, extra), -2, dtype=np.int64)
            for b, seen in enumerate(exclude):
                padded[b, : len(seen)] = np.fromiter(seen, dtype=np.int64, count=len(seen))
            keep &= ~(found[:, :, None] == padded[:, None, :]).any(-1)  # (B, fetch)
        # the kept items first, in FAISS's best-first order (a stable sort on "dropped"), then the first k
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # (B, min(k, fetch))
        kept = np.take_along_axis(keep, order, axis=1)
        out_scores = np.full((B, k), -np.inf, dtype=np.float32)
        out_codes = np.full((B, k), -1, dtype=np.int64)
        width = order.shape[1]
        out_scores[:, :width] = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf)
        out_codes[:, :width] = np.where(kept, np.take_along_axis(found, order, axis=1), -1)
        return out_scores, out_codes
