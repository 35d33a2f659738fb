"""ESMM: CVR modelled over the entire impression space through pCTCVR = pCTR x pCVR."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.fields import FieldEmbedding
from recsys_lab.modules.multitask import Towers


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Mächler, "Accurately Computing log(1 - exp(-|a|))", 2012):
    log(-expm1(x)) near 0, where 1 - exp(x) cancels; log1p(-exp(x)) further out, where expm1 rounds to -1."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def product_logit(logit_a: Tensor, logit_b: Tensor, max_log_prob: float = -1e-7) -> Tensor:
    """logit(sigmoid(a) * sigmoid(b)) computed in log space, so neither small nor large logits round off.

    log p = logsigmoid(a) + logsigmoid(b); logit = log p - log(1 - p). log p is clamped below 0 (at
    `max_log_prob`, p <= 1 - 1e-7, a logit of about 16) because p = 1 would give an infinite logit.
    """
    log_p = (F.logsigmoid(logit_a) + F.logsigmoid(logit_b)).clamp(max=max_log_prob)  # (B,)
    return log_p - log1mexp(log_p)  # (B,)


class ESMM(nn.Module):
    """Entire Space Multi-task Model (Ma et al., SIGIR 2018, arXiv:1804.07931).

    A CTR tower and a CVR tower on the same field embeddings. The CVR tower is never trained on clicked rows
    alone (the paper's sample selection bias and data sparsity): its output pCVR = p(buy | click) only enters
    the loss through pCTCVR = p(click and buy) = pCTR x pCVR (eq. 2), which is supervised on every impression
    by the purchase label, while pCTR is supervised by the click label. This needs a purchase to imply a click,
    which holds on the simulator by construction (a purchase is drawn only for clicked impressions;
    `tests/test_multitask.py` checks it on the generated log).

    Heads, keyed by the label that supervises them: `ctr_label` (default: the dataset's first label, "click")
    gets the pCTR logit, `ctcvr_label` (default: the second label, "purchase") gets logit(pCTR x pCVR),
    computed in log space (`product_logit`). On a dataset with one label there is no CTCVR head and the CVR tower
    is unused: ESMM is then a CTR model. pCVR itself is `forward_parts(batch)["cvr"]`.

    Args:
        schema: the dataset's features; every sparse, seq and dense feature becomes a field (`FieldEmbedding`).
        embedding_dim: D, the width of every field (the paper: 18).
        tower_hidden: hidden widths of the CTR and the CVR tower (ReLU) on the flattened fields (B, F*D); each
            ends in one logit (the paper: 360-200-80).
        dropout: dropout after every hidden layer of the towers.
        ctr_label: the click label; None = the dataset's first label.
        ctcvr_label: the purchase label; None = the dataset's second label (none if it has one label).

    forward_heads(batch) -> {ctr_label: pCTR logits (B,), ctcvr_label: pCTCVR logits (B,)};
    forward(batch) -> the pCTR logits (B,); forward_parts(batch) -> {"ctr", "cvr", "ctcvr"} logits (B,).
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 18,
        tower_hidden: list[int] = [360, 200, 80],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        dropout: float = 0.0,
        ctr_label: str | None = None,
        ctcvr_label: str | None = None,
    ) -> None:
        super().__init__()
        labels = list(schema.labels)
        ctr_label = labels[0] if ctr_label is None else ctr_label
        if ctcvr_label is None and len(labels) > 1:
            ctcvr_label = labels[1]
        for key, label in (("ctr_label", ctr_label), ("ctcvr_label", ctcvr_label)):
            if label is not None and label not in labels:
                raise ValueError(
                    f"model.net.{key}='{label}' is not a label of this dataset; labels are {labels}"
                )
        if ctr_label == ctcvr_label:
            raise ValueError(f"model.net.ctr_label and model.net.ctcvr_label are both '{ctr_label}'")
        self.labels = [ctr_label] if ctcvr_label is None else [ctr_label, ctcvr_label]
        self.fields = FieldEmbedding(schema, embedding_dim)
        # two towers, CTR then CVR, on the one shared embedding (the paper's "shared lookup table")
        self.towers = Towers(2, self.fields.num_fields * embedding_dim, tower_hidden, dropout)

    def forward_parts(self, batch: Batch) -> dict[str, Tensor]:
        x = self.fields(batch).flatten(1)  # (B, F, D) -> (B, F*D)
        ctr, cvr = self.towers([x, x])  # (B,), (B,)
        return {"ctr": ctr, "cvr": cvr, "ctcvr": product_logit(ctr, cvr)}

    def forward_heads(self, batch: Batch) -> dict[str, Tensor]:
        parts = self.forward_parts(batch)
        return dict(zip(self.labels, (parts["ctr"], parts["ctcvr"]), strict=False))

    def forward(self, batch: Batch) -> Tensor:
        x = self.fields(batch).flatten(1)  # (B, F*D): pCTR alone, without the CVR tower's cost
        return self.towers.towers[0](x).squeeze(-1)  # (B,)
