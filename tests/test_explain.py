"""Explanations ("because you viewed …": `recsys_lab.analysis.explain`, `scripts/explain.py`) on the small
trained runs of the serving tests (a DIN and a two-tower), with other models' random initialisations swapped
in where only the mechanics matter. Every expected number is computed here one history at a time,
independently of the batched code under test."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

import pytest
import torch

from recsys_lab.analysis.explain import (
    Explainer,
    display_title,
    explain,
    plot_explanations,
    recommend_and_explain,
)
from recsys_lab.data.batch import Batch, Seq
from recsys_lab.models.bst import BST
from recsys_lab.models.deepfm import DeepFM
from recsys_lab.models.dien import DIEN
from recsys_lab.models.sasrec import SASRec
from recsys_lab.serving.runs import load_run
from recsys_lab.utils.testing import random_batch, tiny_schema
from scripts.explain import main
from tests.helpers import REPO

LEVEL = 1  # the test stage's history: training and validation positives
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(served_runs):
    return {role: load_run(path) for role, path in served_runs.items()}


def swapped(run, net: torch.nn.Module):
    """The run with another (randomly initialised) model on the same data."""
    return dataclasses.replace(run, net=net.eval())


def longest_history_user(run) -> tuple[str, int]:
    """Raw id and entity of the user with the longest test-stage history (ties: the first)."""
    timeline = run.store.timelines[LEVEL]
    entity = int(timeline.lengths(torch.arange(timeline.n_rows)).argmax())
    return run.datamodule.prepared().users["user_id"].to_list()[entity], entity


def items_raw(run) -> list:
    return run.datamodule.prepared().items["item_id"].to_list()


def some_item(run, entity: int, offset: int = 0) -> tuple[object, int]:
    """Raw id and code of a trained item the user has not interacted with before the test period."""
    seen = set(run.store.timelines[LEVEL].gather(torch.tensor([entity])).ids[0].tolist())
    codes = run.store.items.sparse["item_id"]
    candidates = [e for e in range(len(codes)) if codes[e] > 0 and e not in seen]
    e = candidates[offset]
    return items_raw(run)[e], int(codes[e])


# ---- independent scoring: one history, one row -------------------------------------------------------------
def history(run, entity: int) -> tuple[Batch, list[int], list[int]]:
    """The user's query batch (1 row) and its history window: item entities and times, oldest first."""
    batch, hist = run.store._query_part(torch.tensor([entity]), LEVEL)
    n = int(hist.lengths[0])
    return batch, hist.ids[0, :n].tolist(), hist.times[0, :n].tolist()


def with_history(run, batch: Batch, ids: list[int], times: list[int]) -> Batch:
    out = batch.select(torch.tensor([0]))  # a copy
    pad = [0] * (run.store.history_len - len(ids))
    seq = Seq(torch.tensor([ids + pad]), torch.tensor([len(ids)]), torch.tensor([times + pad]))
    run.store.write_history(out, seq)
    return out


@torch.no_grad()
def score(run, batch: Batch, code: int) -> float:
    """The model's score of one query row and one item code, as evaluation ranks it."""
    if hasattr(run.net, "encode_query"):
        item = run.net.encode_item(run.store.items_batch(torch.tensor([code])))  # (1, D)
        return float((run.net.encode_query(batch) * item).sum())
    rows = batch.select(torch.tensor([0]))
    run.store.items.into(rows, run.store.item_entity[torch.tensor([code])])
    return float(run.net(rows)[0])


def hand_occlusion(run, entity: int, code: int) -> tuple[float, dict]:
    """Full-history score, and {raw history item: full score - score without its every occurrence}."""
    batch, ids, times = history(run, entity)
    full = score(run, with_history(run, batch, ids, times), code)
    raw = items_raw(run)
    drops = {}
    for j in sorted(set(ids)):
        kept = [(e, t) for e, t in zip(ids, times, strict=True) if e != j]
        without = with_history(run, batch, [e for e, _ in kept], [t for _, t in kept])
        drops[raw[j]] = full - score(run, without, code)
    return full, drops


# ---- attention ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["din", "dien", "bst"])
def test_attention_is_the_models_weights_summed_per_history_item(runs, model):
    run = runs["ranking"]
    if model != "din":  # random initialisations on the DIN run's data: the mechanics, not the values
        torch.manual_seed(0)
        net = DIEN(run.schema, embedding_dim=4, mlp_hidden=[8]) if model == "dien" else None
        net = net or BST(run.schema, embedding_dim=4, num_heads=2, feed_forward_dim=8, mlp_hidden=[8])
        run = swapped(run, net)
    user, entity = longest_history_user(run)
    item, code = some_item(run, entity)
    got = explain(run, user, item, method="auto", top=run.store.history_len)

    batch, ids, _ = history(run, entity)
    run.store.items.into(batch, run.store.item_entity[torch.tensor([code])])
    with torch.no_grad():
        logits, weights = run.net.forward_with_attention(batch)
    raw = items_raw(run)
    expected: dict = {}
    for e, w in zip(ids, weights[0, : len(ids)].tolist(), strict=True):
        expected[raw[e]] = expected.get(raw[e], 0.0) + w
    assert got.method == "attention" and got.item_id == item and got.user_id == user
    assert got.score == pytest.approx(float(logits[0]), abs=1e-5)
    assert {r.item_id for r in got.reasons} == set(expected)
    for r in got.reasons:
        assert r.weight == pytest.approx(expected[r.item_id], abs=1e-6)
        assert r.count == sum(raw[e] == r.item_id for e in ids)
    assert [r.weight for r in got.reasons] == sorted((r.weight for r in got.reasons), reverse=True)
    assert got.history == [raw[e] for e in ids]
    assert got.history_total == int(run.store.timelines[LEVEL].lengths(torch.tensor([entity]))[0])


def test_bst_attention_weights_are_the_candidate_slots_share_of_its_output():
    """One head: the last block's attention output at the candidate slot is the weighted sum of the slots'
    values, with the behaviours' weights as returned (in history order) and the rest on the candidate itself;
    the logits are forward's, bit for bit."""
    schema = tiny_schema()
    batch = random_batch(schema)
    torch.manual_seed(0)
    model = BST(schema, embedding_dim=4, num_heads=1, feed_forward_dim=8, mlp_hidden=[8]).eval()
    captured = {}
    attention = model.blocks[-1].attention
    hook = attention.register_forward_hook(lambda m, args, out: captured.update(x=args[0], y=out))
    with torch.no_grad():
        logits, weights = model.forward_with_attention(batch)
        assert torch.equal(logits, model(batch))
    hook.remove()
    seq = batch.seq["hist_item_id"]
    assert (weights[~seq.mask()] == 0).all() and (weights >= 0).all() and (weights.sum(1) < 1).all()
    with torch.no_grad():
        v = attention.qkv(captured["x"]).chunk(3, dim=-1)[2]  # (B, S, W): one head
        for b in range(len(batch)):
            n = int(seq.lengths[b])
            slot_weights = [1 - float(weights[b].sum())] + [float(weights[b, n - s]) for s in range(1, n + 1)]
            mixed = (torch.tensor(slot_weights).unsqueeze(1) * v[b, : n + 1]).sum(0)  # (W,)
            torch.testing.assert_close(attention.out(mixed), captured["y"][b, 0], atol=1e-5, rtol=1e-5)


# ---- occlusion ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["din", "bst", "deepfm", "two_tower", "sasrec"])
def test_occlusion_is_the_score_drop_without_each_history_item(runs, model):
    """Any model: the weight of a history item is the score lost when every occurrence of it leaves the
    history (the rest in order), checked one history at a time; "auto" chooses occlusion without attention."""
    run = runs["retrieval" if model in ("two_tower", "sasrec") else "ranking"]
    torch.manual_seed(0)
    if model == "deepfm":
        run = swapped(run, DeepFM(run.schema, embedding_dim=4, mlp_hidden=[8]))
    if model == "bst":  # reads each behaviour's timestamp: the occluded histories keep theirs
        run = swapped(run, BST(run.schema, embedding_dim=4, num_heads=2, feed_forward_dim=8, mlp_hidden=[8]))
    if model == "sasrec":
        run = swapped(run, SASRec(run.schema, embedding_dim=8, num_blocks=1, dropout=0.0))
    user, entity = longest_history_user(run)
    item, code = some_item(run, entity, offset=3)
    method = "occlusion" if model in ("din", "bst") else "auto"
    got = explain(run, user, item, method=method, top=run.store.history_len)

    full, drops = hand_occlusion(run, entity, code)
    assert got.method == "occlusion"
    assert got.score == pytest.approx(full, abs=1e-5)
    assert {r.item_id: r.weight for r in got.reasons} == pytest.approx(drops, abs=1e-5)
    assert any(abs(w) > 1e-6 for w in drops.values())  # the model reads the history at all
    assert [r.weight for r in got.reasons] == sorted((r.weight for r in got.reasons), reverse=True)


def test_top_keeps_the_largest_weights(runs):
    run = runs["ranking"]
    user, entity = longest_history_user(run)
    item, _ = some_item(run, entity)
    explainer = Explainer(run)
    every = explainer.explain(user, item, "occlusion", top=run.store.history_len)
    two = explainer.explain(user, item, "occlusion", top=2)
    assert two.reasons == every.reasons[:2]


# ---- recommendations ---------------------------------------------------------------------------------------
def test_recommend_and_explain_ranks_unseen_items_as_evaluation_does(runs):
    run = runs["retrieval"]
    user, entity = longest_history_user(run)
    got = recommend_and_explain(run, user, k=3, top=2)

    batch, _, _ = history(run, entity)
    with torch.no_grad():
        items = run.net.encode_item(run.store.items_batch(torch.arange(run.store.num_item_codes)))
        scores = (run.net.encode_query(batch) @ items.T)[0]  # (V,)
    seen = run.store.item_codes(run.store.timelines[LEVEL].gather(torch.tensor([entity])).ids[0])
    scores[0], scores[seen] = -torch.inf, -torch.inf
    best = torch.topk(scores, 3).indices
    raw = items_raw(run)
    assert [e.item_id for e in got] == [raw[int(run.store.item_entity[c])] for c in best]
    assert [e.score for e in got] == pytest.approx(scores[best].tolist(), abs=1e-5)
    assert all(e.method == "occlusion" and 1 <= len(e.reasons) <= 2 for e in got)


def test_summary_line_and_titles(runs):
    run = runs["ranking"]
    user, entity = longest_history_user(run)
    (e,) = recommend_and_explain(run, user, k=1, top=3)
    line = e.summary(top=2)
    assert line.startswith(f"Recommended: {e.title} (score {e.score:.2f}) — because you viewed: ")
    assert f'"{e.reasons[0].title}" ({e.reasons[0].weight:.2f})' in line
    assert line.endswith(", …") == (len(e.reasons) > 2)
    assert display_title("Toy Story (1995). Genres: Animation, Comedy") == "Toy Story (1995)"
    assert display_title("Mr. Holland's Opus (1995)") == "Mr. Holland's Opus (1995)"
    assert display_title("") is None


def test_figure_is_a_png(runs, tmp_path):
    run = runs["ranking"]
    user, _ = longest_history_user(run)
    explanations = recommend_and_explain(run, user, k=2, top=4)
    path = plot_explanations(explanations, tmp_path / "figs" / "why.png")
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 2000


# ---- errors ------------------------------------------------------------------------------------------------
def test_bad_requests_name_what_is_wrong(runs):
    run = runs["ranking"]
    explainer = Explainer(run)
    user, entity = longest_history_user(run)
    item, _ = some_item(run, entity)
    with pytest.raises(ValueError, match="user 'nobody' is not in the data of run"):
        explainer.explain("nobody", item)
    with pytest.raises(ValueError, match="item 'no-such-item' is not in the catalogue"):
        explainer.explain(user, "no-such-item")
    with pytest.raises(ValueError, match="method='shap': expected one of"):
        explainer.explain(user, item, method="shap")
    timeline = run.store.timelines[LEVEL]
    empty = (timeline.lengths(torch.arange(timeline.n_rows)) == 0).nonzero()
    assert len(empty), "the small simulator should have a user without positives before the test period"
    nobody = run.datamodule.prepared().users["user_id"].to_list()[int(empty[0])]
    with pytest.raises(
        ValueError, match=f"user {nobody!r} has no positive interaction .* nothing to explain"
    ):
        explainer.explain(nobody, item)
    with pytest.raises(
        ValueError, match=r"TwoTower returns no attention weights .* DIN, DIEN, BST.*occlusion"
    ):
        explain(runs["retrieval"], user, item, method="attention")
    untrained = [e for e, c in enumerate(run.store.items.sparse["item_id"].tolist()) if c == 0]
    if untrained:  # catalogue items without a training interaction have no id the model knows
        with pytest.raises(ValueError, match="has no training interaction"):
            explainer.explain(user, items_raw(run)[untrained[0]])


# ---- the script --------------------------------------------------------------------------------------------
def test_cli_prints_because_you_viewed_and_writes_the_figure(served_runs, runs, tmp_path, capsys):
    user, entity = longest_history_user(runs["ranking"])
    out = tmp_path / "why.png"
    main([str(served_runs["ranking"]), "--user", str(user), "--top-k", "2", "--top", "3", "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"user {user} — DIN, attention; history: the ")
    assert sum(line.startswith("Recommended: ") and "— because you viewed: " in line for line in lines) == 2
    assert out.read_bytes().startswith(PNG)

    item, _ = some_item(runs["ranking"], entity)
    main([str(served_runs["ranking"]), "--user", str(user), "--item", str(item), "--method", "occlusion",
          "--out", str(out)])  # fmt: skip
    assert "because you viewed" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="scripts/explain.py: error: user 'nobody' is not in the data"):
        main([str(served_runs["ranking"]), "--user", "nobody", "--out", str(out)])
    with pytest.raises(SystemExit, match="scripts/explain.py: error: .*TwoTower returns no attention"):
        main([str(served_runs["retrieval"]), "--user", str(user), "--method", "attention", "--out", str(out)])


@pytest.mark.slow
def test_cli_as_a_subprocess_writes_into_the_run_dir_by_default(served_runs, runs, tmp_path):
    run_dir = shutil.copytree(served_runs["ranking"], tmp_path / "run")  # the shared run stays as it was
    user, _ = longest_history_user(runs["ranking"])
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "explain.py"),
            str(run_dir),
            "--user",
            str(user),
            "--top-k",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "because you viewed" in done.stdout
    assert (run_dir / f"explain_{user}_top1.png").read_bytes().startswith(PNG)
