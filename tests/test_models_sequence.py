"""The sequence models (GRU4Rec, SASRec, BERT4Rec, HSTU) and their shared pieces: causality, padding invariance,
BERT4Rec's [MASK] handling, HSTU's pointwise attention and time buckets, the encoder contract, pinned numbers, and
one end-to-end run per model through `train`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recsys_lab.data.batch import Batch, Seq
from recsys_lab.data.schema import Schema
from recsys_lab.models.bert4rec import BERT4Rec
from recsys_lab.models.gru4rec import GRU4Rec
from recsys_lab.models.hstu import HSTU, HSTULayer, RelativeAttentionBias, pointwise_attention, time_buckets
from recsys_lab.models.sasrec import SASRec
from recsys_lab.modules.sequence import attention_mask, last_position
from recsys_lab.train import train
from recsys_lab.utils.testing import tiny_schema
from tests.helpers import model_overrides

L = 6
HIST = "hist_item_id"
BUILDERS: dict[str, Callable[[Schema], nn.Module]] = {
    "gru4rec": lambda s: GRU4Rec(s, embedding_dim=8, hidden_dim=12, num_layers=2, dropout=0.1),
    "gru4rec_untied": lambda s: GRU4Rec(s, embedding_dim=8, hidden_dim=12, tie_embeddings=False),
    "sasrec": lambda s: SASRec(s, embedding_dim=8, num_blocks=2, num_heads=2, dropout=0.1),
    "sasrec_ffn": lambda s: SASRec(s, embedding_dim=8, num_heads=2, dropout=0.1, feed_forward_dim=24),
    "sasrec_recbole": lambda s: SASRec(
        s, embedding_dim=8, num_heads=2, feed_forward_dim=24, layout="recbole"
    ),
    "bert4rec": lambda s: BERT4Rec(s, embedding_dim=8, num_blocks=2, num_heads=2, feed_forward_dim=16),
    "hstu": lambda s: HSTU(s, embedding_dim=8, num_blocks=2, num_heads=2, attention_dim=4, linear_dim=4),
}
CAUSAL = ["gru4rec", "gru4rec_untied", "sasrec", "sasrec_ffn", "sasrec_recbole", "hstu"]


def schema() -> Schema:
    return tiny_schema(num_items=17, history_len=L)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name](schema()).eval()  # eval: dropout off, so outputs compare exactly


def seq_batch(lengths: list[int], seed: int = 0) -> Batch:
    """Histories of real item codes (1..16), increasing timestamps, and one candidate item per row."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.randint(1, 17, (B, L), generator=g)
    times = 1_000_000 + torch.randint(0, 100_000, (B, L), generator=g).cumsum(1)  # (B, L) seconds, in order
    seq = Seq(ids, torch.tensor(lengths), times)
    return Batch(sparse={"item_id": torch.randint(1, 17, (B,), generator=g)}, seq={HIST: seq})


def with_seq(batch: Batch, ids: torch.Tensor | None = None, times: torch.Tensor | None = None) -> Batch:
    seq = batch.seq[HIST]
    new = Seq(seq.ids if ids is None else ids, seq.lengths, seq.times if times is None else times)
    return dataclasses.replace(batch, seq={**batch.seq, HIST: new})


# --- the shared pieces ----------------------------------------------------------------------------------------
def test_last_position_and_attention_mask_by_hand() -> None:
    hidden = torch.arange(2 * 3 * 1).float().view(2, 3, 1)  # row 0: 0, 1, 2; row 1: 3, 4, 5
    # an empty row reads position 0
    assert last_position(hidden, torch.tensor([2, 0])).squeeze(1).tolist() == [1.0, 3.0]

    causal = attention_mask(torch.tensor([2]), 3, causal=True)[0].int().tolist()
    assert causal == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # padded query 2 sees the real keys and itself
    both = attention_mask(torch.tensor([2, 0]), 3, causal=False).int().tolist()
    assert both[0] == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    assert both[1] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # an empty row: each position itself only, never none


# --- every model ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CAUSAL)
def test_causal(name: str) -> None:
    """The output at position t does not change when the items (and times) after t change."""
    model = build(name)
    batch = seq_batch([L, L, 4])
    with torch.no_grad():
        before = model.encode_sequence(batch)
        for t in range(L - 1):
            g = torch.Generator().manual_seed(t)
            ids, times = batch.seq[HIST].ids.clone(), batch.seq[HIST].times.clone()
            ids[:, t + 1 :] = torch.randint(1, 17, (3, L - t - 1), generator=g)
            times[:, t + 1 :] += 7 ** (t + 3)
            after = model.encode_sequence(with_seq(batch, ids, times))
            torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
            # the later positions did change
            assert not torch.allclose(after[:2, t + 1 :], before[:2, t + 1 :])


def test_bert4rec_is_bidirectional() -> None:
    model = build("bert4rec")
    batch = seq_batch([L])
    ids = batch.seq[HIST].ids.clone()
    ids[:, -1] = ids[:, -1] % 16 + 1  # another real item at the last position
    with torch.no_grad():
        first = model.encode_sequence(batch)[:, 0]
        assert not torch.allclose(model.encode_sequence(with_seq(batch, ids))[:, 0], first)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_padding_invariance(name: str) -> None:
    """Ids and times at padded positions change no real position, nor encode_query; nor does the padded width."""
    model = build(name)
    lengths = [0, 1, 3, L]
    batch = seq_batch(lengths)
    seq = batch.seq[HIST]
    real = seq.mask()
    noise = seq_batch(lengths, seed=99).seq[HIST]
    padded = with_seq(
        batch,
        torch.where(real, seq.ids, noise.ids),
        torch.where(real, seq.times, torch.randint(-(10**9), 10**9, seq.times.shape)),
    )
    with torch.no_grad():
        a, b = model.encode_sequence(batch), model.encode_sequence(padded)
        torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_query(batch), model.encode_query(padded), rtol=0, atol=1e-6)
        # the same rows without their longest padding: L = 3 instead of 6
        short = Batch(
            sparse=batch.sparse, seq={HIST: Seq(seq.ids[1:3, :3], seq.lengths[1:3], seq.times[1:3, :3])}
        )
        torch.testing.assert_close(
            model.encode_sequence(short)[real[1:3, :3]], a[1:3, :3][real[1:3, :3]], rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("name", CAUSAL)
def test_encode_query_is_the_last_real_position(name: str) -> None:
    model = build(name)
    batch = seq_batch([1, 3, L, 2])
    with torch.no_grad():
        hidden = model.encode_sequence(batch)  # (B, L, D)
        expected = hidden[torch.arange(4), torch.tensor([0, 2, L - 1, 1])]
        torch.testing.assert_close(model.encode_query(batch), expected)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_forward_is_the_row_wise_dot_and_items_come_from_the_table(name: str) -> None:
    model = build(name)
    batch = seq_batch([1, 3, L, 0])
    with torch.no_grad():
        query, item = model.encode_query(batch), model.encode_item(batch)
        torch.testing.assert_close(item, model.item_table()[batch.sparse["item_id"]])
        torch.testing.assert_close(model(batch), (query * item).sum(-1))
        assert model.item_table().shape[0] == 17 and torch.isfinite(model(batch)).all()


PINNED = {  # encode_query(seq_batch([1, 3, 6, 0])) of each model as `build` makes it (seed 0):
    # (a weighted sum that sees each coordinate's sign and place, the sum of magnitudes)
    "gru4rec": (-0.52604747, 4.1589189),
    "gru4rec_untied": (1.0212657, 5.7009339),
    "sasrec": (-0.081434026, 19.090689),
    "sasrec_ffn": (-1.2526168, 20.845497),  # RecBole-style wider FFN (feed_forward_dim=24 = 3D here)
    "sasrec_recbole": (-0.44552147, 19.351748),  # RecBole's layout: input LayerNorm, post-LN blocks, GELU
    "bert4rec": (2.7356963, 29.496706),
    "hstu": (39.497375, 190.5427),
}


def fingerprint(query: torch.Tensor) -> tuple[float, float]:
    weights = torch.linspace(-1.0, 2.0, query.numel()).view_as(query)
    return (query * weights).sum().item(), query.abs().sum().item()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_pinned_numbers(name: str) -> None:
    with torch.no_grad():
        query = build(name).encode_query(seq_batch([1, 3, L, 0]))
    weighted, magnitude = fingerprint(query)
    assert (weighted, magnitude) == pytest.approx(PINNED[name], rel=1e-4)


# --- BERT4Rec -------------------------------------------------------------------------------------------------
def test_bert4rec_appends_mask_by_hand() -> None:
    model = build("bert4rec")
    M = model.mask_id
    assert M == 17 and model.items.num_embeddings == 18  # [MASK] is an input code only
    ids = torch.tensor([[3, 4, 9, 9, 9, 9], [1, 2, 3, 4, 5, 6], [9, 9, 9, 9, 9, 9]])
    out = model.append_mask(Seq(ids, torch.tensor([2, 6, 0])))
    assert out.lengths.tolist() == [3, 6, 1]
    assert out.ids[0, :3].tolist() == [3, 4, M]
    assert out.ids[1].tolist() == [2, 3, 4, 5, 6, M]  # full: the oldest item leaves the window
    assert out.ids[2, :1].tolist() == [M]

    batch = Batch(sparse={"item_id": torch.tensor([1, 2, 3])}, seq={HIST: Seq(ids, torch.tensor([2, 6, 0]))})
    with torch.no_grad():
        masked = dataclasses.replace(batch, seq={HIST: out})
        hidden = model.encode_sequence(masked)
        expected = hidden[torch.arange(3), torch.tensor([2, 5, 0])]
        torch.testing.assert_close(model.encode_query(batch), expected)


def test_bert4rec_scores_items_with_bias_never_the_mask() -> None:
    model = build("bert4rec")
    with torch.no_grad():
        model.output_bias.copy_(torch.linspace(-1, 1, 17))
        table = model.item_table()  # (V, D + 1)
        assert table.shape == (17, 9)  # V rows: no score for [MASK]
        torch.testing.assert_close(table[:, :8], model.items.weight[:17])
        torch.testing.assert_close(table[:, 8], model.output_bias)
        batch = seq_batch([2, L])
        query = model.encode_query(batch)
        assert (query[:, -1] == 1).all()
        # the score of item v is g . e_v + b_v (paper eq. 7)
        torch.testing.assert_close(
            query @ table.T, query[:, :8] @ model.items.weight[:17].T + model.output_bias
        )


# --- HSTU -----------------------------------------------------------------------------------------------------
def test_time_buckets_by_hand() -> None:
    gaps = torch.tensor([0, 1, 2, 3, -100, 100, 86_400, 365 * 86_400, 10**18])
    # floor(ln(max(|gap|, 1)) / 0.301): ln 2 / .301 = 2.30, ln 3 / .301 = 3.65, ln 100 / .301 = 15.30,
    # ln 86400 / .301 = 37.76, ln(365 days) / .301 = 57.36, ln 1e18 / .301 = 137.7 -> clamped to 128
    assert time_buckets(gaps, 128, 0.301).tolist() == [0, 0, 2, 3, 15, 15, 37, 57, 128]


def test_relative_attention_bias_by_hand() -> None:
    bias = RelativeAttentionBias(max_len=4, num_time_buckets=128, time_bucket_width=0.301)
    with torch.no_grad():
        bias.position.copy_(torch.arange(7.0) * 10)  # relative position i - j -> 10 * (i - j + 3)
        bias.time.copy_(torch.arange(129.0) / 1000)  # bucket b -> b / 1000
    times = torch.tensor([[0, 2, 102, 86_402]])
    out = bias(times)[0]
    assert out.shape == (4, 4)
    assert out[0, 0].item() == pytest.approx(30.0)  # i - j = 0, gap 0
    assert out[2, 1].item() == pytest.approx(40.0 + 0.015)  # i - j = 1, gap 100 -> bucket 15
    assert out[3, 0].item() == pytest.approx(60.0 + 0.037)  # i - j = 3, gap 86402 -> bucket 37
    assert out[1, 3].item() == pytest.approx(10.0 + 0.037)  # i - j = -2 (masked later), |gap| 86400


def test_pointwise_attention_is_not_softmax_by_hand() -> None:
    """With Q = K = 0 the weights are SiLU(rab) / n: here SiLU(1) / 4 = 0.182765 for every allowed pair, so
    the outputs are 0.182765 * cumulative sums of V — a softmax would give running means (1, 1.5, 2.33)."""
    zeros = torch.zeros(1, 1, 3, 2)
    v = torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 3, 1)
    allowed = attention_mask(torch.tensor([3]), 3, causal=True)
    out = pointwise_attention(zeros, zeros, v, torch.ones(1, 3, 3), allowed, n=4)
    silu_1 = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(out.view(3), torch.tensor([1.0, 3.0, 7.0]) * silu_1 / 4)
    # negative bias: SiLU goes below zero, which no softmax weight can
    out = pointwise_attention(zeros, zeros, v, -torch.ones(1, 3, 3), allowed, n=4)
    assert out.view(3)[0].item() == pytest.approx(-(1 / (1 + math.e)) / 4)


def test_hstu_layer_with_zero_qk_by_hand() -> None:
    """A whole layer with Q = K = 0: Y = X + f2(Norm(Σ_j SiLU(rab_ij) / n V_j) ⊙ U), computed independently."""
    torch.manual_seed(0)
    D, H, d = 4, 1, 3
    layer = HSTULayer(D, H, d, d, 0.0, RelativeAttentionBias(5, 128, 0.301), n=5).eval()
    with torch.no_grad():
        layer.uvqk.weight[2 * d :] = 0.0  # the Q and K rows of f1
        layer.relative_bias.position.normal_()
        layer.relative_bias.time.normal_()
    x = torch.randn(1, 3, D)
    times = torch.tensor([[0, 50, 4000]])
    allowed = attention_mask(torch.tensor([3]), 3, causal=True)
    with torch.no_grad():
        u, v, _, _ = F.silu(layer.uvqk(F.layer_norm(x, (D,), eps=1e-6))).split([d, d, d, d], -1)
        expected = []
        for i in range(3):
            av = torch.zeros(d)
            for j in range(i + 1):
                rab = (
                    layer.relative_bias.position[i - j + 4]
                    + layer.relative_bias.time[time_buckets(times[0, i] - times[0, j], 128, 0.301)]
                )
                av += F.silu(rab) / 5 * v[0, j]
            expected.append(x[0, i] + layer.out(u[0, i] * F.layer_norm(av, (d,), eps=1e-6)))
        torch.testing.assert_close(layer(x, times, allowed)[0], torch.stack(expected))


def test_hstu_reads_time_gaps_not_absolute_times() -> None:
    model = build("hstu")
    batch = seq_batch([L, 4])
    times = batch.seq[HIST].times
    with torch.no_grad():
        base = model.encode_query(batch)
        torch.testing.assert_close(model.encode_query(with_seq(batch, times=times + 12_345)), base)
        spread = times.clone()
        spread[:, 1:] += 10**7  # a long gap after the first item
        assert not torch.allclose(model.encode_query(with_seq(batch, times=spread)), base)
        # no timestamps: every gap reads as 0
        untimed = with_seq(batch)
        untimed.seq[HIST].times = None
        flat = with_seq(batch, times=torch.zeros_like(times))
        torch.testing.assert_close(model.encode_query(untimed), model.encode_query(flat))


def test_hstu_scores_are_cosines_over_temperature() -> None:
    model = build("hstu")
    with torch.no_grad():
        query = model.encode_query(seq_batch([3]))
        torch.testing.assert_close(query.norm(dim=-1), torch.tensor([1 / 0.05]))
        torch.testing.assert_close(model.item_table().norm(dim=-1), torch.ones(17))


# --- end to end -----------------------------------------------------------------------------------------------
RANKING = {f"test/{m}@{k}" for m in ("recall", "ndcg", "hit") for k in (10, 20, 50)} | {"test/mrr"}


@pytest.mark.parametrize(
    "model,extra",
    [
        ("gru4rec", []),
        ("gru4rec", ["model.prefix_augmentation=true"]),
        ("sasrec", []),
        ("sasrec", ["model.loss._target_=recsys_lab.modules.losses.BCENegativeLoss"]),
        ("bert4rec", []),
        ("hstu", []),
    ],
    ids=["gru4rec", "gru4rec-prefix", "sasrec", "sasrec-bce", "bert4rec", "hstu"],
)
def test_fast_dev_run(model: str, extra: list[str], make_cfg, tmp_path) -> None:
    cfg = make_cfg([*model_overrides(model, tmp_path), *extra, "debug=fast_dev_run"])
    results = train(cfg)
    metrics = results["metrics"]
    assert RANKING <= set(metrics)  # the ranking metrics (the evaluator may log more)
    assert all(math.isfinite(v) for v in metrics.values())
    assert results["protocol"]["evaluation"] == "ranking"
