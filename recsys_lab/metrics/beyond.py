"""Beyond-accuracy metrics of top-k recommendation lists: coverage, exposure Gini, popularity, novelty and
intra-list diversity.

Accuracy says whether the held-out item was found; these say what the lists look like as a whole — whether a
model recommends the same few blockbusters to everyone. Definitions, for a list l of the k best items of a
query (masked items never enter a list), averaged over the Q lists of a stage unless said otherwise:

- `coverage@k`: |union of the lists| / (V - 1), the share of the catalogue (codes 1..V-1; code 0 is the
  unknown item) recommended at least once (RecBole's ItemCoverage);
- `gini@k`: the Gini coefficient of item exposure, x_i = how many lists hold item i, over every catalogue item
  (zeros included): G = sum_i (2i - n - 1) x_(i) / (n sum x), x sorted ascending, i = 1..n (RecBole's
  GiniIndex); 0 = every item shown equally often, -> 1 = one item takes all exposure;
- `popularity@k`: the mean training popularity (training positives) of the listed items (Abdollahpouri et
  al.'s average recommendation popularity, ARP);
- `novelty@k`: the mean self-information -log2 p(i) of the listed items, p(i) = the item's share of the
  training positives (Zhou et al., PNAS 2010; Vargas & Castells, RecSys 2011); an item never seen in training
  counts as seen once, so its novelty is finite;
- `ild_category@k`: intra-list diversity by category (Ziegler et al., WWW 2005): the mean over the list's
  k(k-1)/2 item pairs of the category distance, 1 when the categories differ and 0 when equal; for a
  multi-category column (genres) the distance is 1 - Jaccard(set_i, set_j);
- `ild_embedding@k`: the same mean of the cosine distance 1 - cos(v_i, v_j) of a content vector per item.

Lists are the model's top-k as `torch.topk` returns them: unlike the accuracy metrics, which are exact
expectations over random tie-breaking, these read one concrete list, so exactly tied scores at the k-th
position are broken by `topk`'s order. A list shorter than k (fewer than k unmasked items) is read as it is.

States are sums (`dist_reduce_fx="sum"`), so the metrics stream over query batches and add up across DDP
processes; the exposure counts are one [n_ks, V] state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from recsys_lab.metrics.ranking import _validate_ks

PER_LIST = ("popularity", "novelty", "ild_category", "ild_embedding")  # the metrics that are means of lists
_MULTI_HOT_CODES = 4096  # multi-category columns with at most this many codes use multi-hot set products


def gini(exposure: Tensor) -> Tensor:
    """Gini coefficient of a non-negative vector [n] (float64 scalar; 0 when everything is 0)."""
    x = torch.sort(exposure.double()).values  # (n,), ascending
    n, total = x.numel(), x.sum()
    if n == 0 or total <= 0:
        return torch.zeros((), dtype=torch.float64)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return ((2 * i - n - 1) * x).sum() / (n * total)


def _pair_mean(distance: Tensor, valid: Tensor, ks: Sequence[int]) -> Tensor:
    """Mean distance over the item pairs of each list's first k positions, float64 [B, n_ks].

    distance: [B, K, K] symmetric pairwise distances; valid: bool [B, K], a real item at the position. A list
    with fewer than two items has no pair and gets 0.
    """
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)  # (B, K, K)
    upper = torch.ones(distance.shape[1:], dtype=torch.bool, device=distance.device).triu(1)  # (K, K): i < j
    d = torch.where(pair & upper, distance.double(), 0.0)  # (B, K, K)
    n = (pair & upper).double()
    out = []
    for k in ks:
        total, count = d[:, :k, :k].sum((1, 2)), n[:, :k, :k].sum((1, 2))  # (B,) each
        out.append(torch.where(count > 0, total / count.clamp(min=1), 0.0))
    return torch.stack(out, dim=1)


class BeyondAccuracy(Metric):
    """Coverage, Gini of exposure, popularity, novelty and intra-list diversity of top-k lists (module doc).

    Args:
        ks: cut-offs (positive ints); lists are read at each.
        item_counts: float [V], training positives per item code (code 0 is the unknown item, never listed).
        categories: optional int64 [V, G] padded category codes per item code (G = 1 for a plain categorical
            column; 0 = padding/unknown), for `ild_category@k`.
        vectors: optional float [V, D] content vector per item code, for `ild_embedding@k`.

    Shapes (`update`): top: int64 [B, K], each query's recommended item codes, best first, -1 past the end of a
        list shorter than K; K >= max(ks) (extra columns are ignored).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        ks: Sequence[int],
        item_counts: Tensor,
        categories: Tensor | None = None,
        vectors: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.ks = _validate_ks(ks)
        counts = item_counts.double().clone()
        num_items = counts.numel()
        if categories is not None and categories.shape[0] != num_items:
            raise ValueError(
                f"categories has {categories.shape[0]} rows, expected one per item code ({num_items})"
            )
        if vectors is not None and vectors.shape[0] != num_items:
            raise ValueError(f"vectors has {vectors.shape[0]} rows, expected one per item code ({num_items})")
        total = counts[1:].sum().clamp(min=1.0)
        # buffers, not states: fixed lookups that follow the metric's device
        self.register_buffer("popularity", counts, persistent=False)
        self.register_buffer("information", -torch.log2(counts.clamp(min=1.0) / total), persistent=False)
        self.has_categories = categories is not None
        if categories is not None:
            self.register_buffer("category_table", categories.long(), persistent=False)
            self.category_codes = int(categories.max()) + 1 if categories.numel() else 1
        self.has_vectors = vectors is not None
        if vectors is not None:
            unit = torch.nn.functional.normalize(vectors.float(), dim=1)  # (V, D): cosine = dot product
            self.register_buffer("unit_vectors", unit, persistent=False)
        n_ks = len(self.ks)
        self.add_state(
            "exposure", default=torch.zeros(n_ks, num_items, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "list_sums", default=torch.zeros(len(PER_LIST), n_ks, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("lists", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def names(self) -> list[str]:
        """The per-list metric names in the column order of `per_list`."""
        return [f"{m}@{k}" for m in self.available_per_list for k in self.ks]

    @property
    def available_per_list(self) -> list[str]:
        out = ["popularity", "novelty"]
        return (
            out
            + (["ild_category"] if self.has_categories else [])
            + (["ild_embedding"] if self.has_vectors else [])
        )

    def per_list(self, top: Tensor) -> Tensor:
        """The per-list metrics of every query, float64 [B, len(names)], columns named by `names`."""
        if top.ndim != 2 or top.dtype != torch.long:
            raise ValueError(f"top must be int64 [B, K] item codes; got {top.dtype} {tuple(top.shape)}")
        top = top[:, : self.ks[-1]]
        valid = top >= 0  # (B, K)
        codes = top.clamp(min=0)  # (B, K)
        length = torch.stack([valid[:, :k].sum(1) for k in self.ks], dim=1).double()  # (B, n_ks)
        columns = []
        for table in (self.popularity, self.information):
            per_item = torch.where(valid, table[codes], 0.0).cumsum(1)  # (B, K)
            at_k = torch.stack(
                [per_item[:, min(k, per_item.shape[1]) - 1] for k in self.ks], dim=1
            )  # (B, n_ks)
            columns.append(torch.where(length > 0, at_k / length.clamp(min=1), 0.0))
        if self.has_categories:
            columns.append(_pair_mean(self._category_distance(codes), valid, self.ks))
        if self.has_vectors:
            unit = self.unit_vectors[codes]  # (B, K, D)
            columns.append(_pair_mean(1.0 - unit @ unit.transpose(1, 2), valid, self.ks))
        return torch.cat(columns, dim=1)  # (B, n_metrics * n_ks)

    def _category_distance(self, codes: Tensor) -> Tensor:
        """[B, K, K] category distance of every pair of listed items: 1 - Jaccard of their category sets (for a
        single category, 1 when different and 0 when equal)."""
        cats = self.category_table[codes]  # (B, K, G)
        if cats.shape[2] == 1:
            same = cats[:, :, 0].unsqueeze(2) == cats[:, :, 0].unsqueeze(1)  # (B, K, K)
            return (~same).double()
        B, K, G = cats.shape
        n_codes = self.category_codes
        if n_codes <= _MULTI_HOT_CODES:
            # multi-hot sets [B, K, C] (column 0, padding, dropped): |A ∩ B| is one batched product
            hot = torch.zeros(B, K, n_codes, device=cats.device).scatter_(2, cats, 1.0)[:, :, 1:]
            shared = torch.bmm(hot, hot.transpose(1, 2)).round().long()  # (B, K, K)
        else:
            # many codes: compare every category slot of one item with every slot of the other, [b, K, K, G, G]
            # booleans, in chunks of rows that keep it near 2^24 elements
            step = max(1, (1 << 24) // (K * K * G * G))
            shared = torch.cat([_shared_categories(cats[s : s + step]) for s in range(0, B, step)])
        size = (cats > 0).sum(2)  # (B, K)
        union = size.unsqueeze(2) + size.unsqueeze(1) - shared  # (B, K, K)
        return torch.where(union > 0, 1.0 - shared.double() / union.clamp(min=1), 0.0)

    def update(self, top: Tensor, values: Tensor | None = None) -> None:
        """Add a batch of lists; top: int64 [B, K] item codes, best first, -1 past a short list's end; values:
        their `per_list` rows when the caller computed them already."""
        if top.numel() == 0:
            return
        values = self.per_list(top) if values is None else values  # (B, n_metrics * n_ks)
        n_ks = len(self.ks)
        sums = values.sum(0).view(-1, n_ks)  # (n_metrics, n_ks)
        for row, name in enumerate(self.available_per_list):
            self.list_sums[PER_LIST.index(name)] += sums[row]
        top = top[:, : self.ks[-1]]
        for i, k in enumerate(self.ks):
            listed = top[:, :k]
            listed = listed[listed >= 0]
            self.exposure[i] += torch.bincount(listed, minlength=self.exposure.shape[1]).double()
        self.lists += top.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """`coverage@k`, `gini@k` and the means of the per-list metrics, for each k."""
        if int(self.lists) == 0:
            raise RuntimeError("BeyondAccuracy.compute() called before any list was passed to update()")
        out: dict[str, Tensor] = {}
        catalogue = self.exposure[:, 1:]  # (n_ks, V - 1): code 0 is never a recommendation
        for i, k in enumerate(self.ks):
            out[f"coverage@{k}"] = (catalogue[i] > 0).double().mean()
            out[f"gini@{k}"] = gini(catalogue[i])
            for name in self.available_per_list:
                out[f"{name}@{k}"] = self.list_sums[PER_LIST.index(name), i] / self.lists
        return {key: value.float() for key, value in out.items()}

    def exposure_at(self, k: int) -> Tensor:
        """float64 [V]: how many lists of length k held each item code (the popularity-bias plot's y)."""
        return self.exposure[self.ks.index(k)]


def _shared_categories(cats: Tensor) -> Tensor:
    """int64 [B, K, K]: how many categories each pair of listed items shares; cats: [B, K, G], 0 = padding,
    each item's categories distinct."""
    present = cats > 0  # (B, K, G)
    equal = cats.unsqueeze(2).unsqueeze(4) == cats.unsqueeze(1).unsqueeze(3)  # (B, K, K, G, G)
    both = present.unsqueeze(2).unsqueeze(4) & present.unsqueeze(1).unsqueeze(3)
    return (equal & both).any(4).sum(3)
