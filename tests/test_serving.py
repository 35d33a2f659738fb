"""The serving pipeline (retrieve → rank → diversify) and its request encoding, on small trained runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from recsys_lab.data.store import history_feature  # noqa: E402
from recsys_lab.data.text import tokenize_texts  # noqa: E402
from recsys_lab.serving.pipeline import Pipeline, _mmr  # noqa: E402
from recsys_lab.serving.requests import Filters, Request, RequestError  # noqa: E402
from recsys_lab.serving.runs import load_run  # noqa: E402
from recsys_lab.utils.checks import ConfigError, find_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def runs(served_runs):
    return {role: load_run(path) for role, path in served_runs.items()}


@pytest.fixture(scope="module")
def both(runs):
    return Pipeline(runs["retrieval"], runs["ranking"], candidates=50)


def _users_with_history(run, n=4):
    """Raw ids of users with positives in the log (entity order) and their entities."""
    store = run.store
    lengths = store.timelines[2].lengths(torch.arange(store.timelines[2].n_rows))
    entities = (lengths > 2).nonzero().squeeze(1)[:n]
    raw = run.datamodule.prepared().users["user_id"].to_list()
    return [raw[e] for e in entities.tolist()], entities


# ---- the request encoder against the training gatherer ---------------------------------------------------------
def test_known_user_request_is_the_deployment_query_of_the_store(runs, both):
    """A known user's request batch is `_query_part` at the last timeline level: same user features, same
    history and history features (what the models were trained to read), context unknown."""
    run = runs["ranking"]
    raw, entities = _users_with_history(run)
    encoded = both.encoders["ranking"].encode([Request(user_id=u) for u in raw])
    expected, _ = run.store._query_part(entities, 2)
    for name, value in expected.sparse.items():
        assert torch.equal(encoded.batch.sparse[name], value), name
    for name, seq in expected.seq.items():
        got = encoded.batch.seq[name]
        assert torch.equal(got.lengths, seq.lengths), name
        assert torch.equal(got.ids * got.mask(), seq.ids * seq.mask()), name
    assert encoded.known_user.all()


def test_a_long_history_keeps_the_most_recent_items_in_order(both):
    """History beyond L keeps the L most recent entries, oldest first, as the training gatherer does."""
    encoder = both.encoders["ranking"]
    L = encoder.store.history_len
    given = [c for c in encoder.code_raw if c is not None][: L + 7]
    encoded = encoder.encode([Request(items=given)])
    hist = encoded.batch.seq[history_feature("item_id")]
    codes, _ = encoder.item_codes(given[-L:])
    assert int(hist.lengths[0]) == L and hist.ids[0].tolist() == codes


def test_ranker_scores_equal_the_model_on_store_pairs(runs, both):
    run = runs["ranking"]
    raw, entities = _users_with_history(run, 3)
    encoded = both.encoders["ranking"].encode([Request(user_id=u) for u in raw])
    codes = torch.randint(1, run.store.num_item_codes, (3, 7), generator=torch.Generator().manual_seed(0))
    scores, weights = both.rank(encoded, codes.numpy())
    with torch.no_grad():
        expected = run.net(run.store.pairs(entities, 2, codes)).view(3, 7).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert weights.shape == (3, 7, run.store.history_len)


def test_retrieval_alone_is_brute_force_over_unseen_items(runs):
    pipe = Pipeline(runs["retrieval"], None)
    run = runs["retrieval"]
    raw, entities = _users_with_history(run, 1)
    out = pipe.recommend(Request(user_id=raw[0], k=10))
    batch, _ = run.store._query_part(entities, 2)
    with torch.no_grad():
        scores = (run.net.encode_query(batch) @ torch.as_tensor(pipe.item_vectors).T)[0]  # (V,)
    seen = run.store.item_codes(run.store.timelines[2].gather(entities).ids[0])
    scores[0] = -torch.inf
    scores[seen] = -torch.inf
    top = torch.topk(scores, 10).indices.tolist()
    assert out.items == [pipe.catalogue.code_raw[c] for c in top]
    np.testing.assert_allclose(out.scores, scores[top].numpy(), rtol=1e-5)
    assert out.source == "personal" and out.because is None


def test_unknown_user_without_items_gets_popularity_in_context(runs, both):
    pipe = Pipeline(runs["retrieval"], None)
    out = pipe.recommend(Request(user_id="never-seen", k=5))
    counts = runs["retrieval"].store.item_counts.numpy()
    counts[0] = -1
    assert out.source == "popularity"
    assert out.items == [pipe.catalogue.code_raw[c] for c in np.argsort(-counts, kind="stable")[:5]]
    ranked = both.recommend(Request(user_id="never-seen", k=5, context={"device": "1"}))
    assert ranked.source == "popularity" and len(ranked.items) == 5
    assert ranked.scores == sorted(ranked.scores, reverse=True)  # the ranker ordered the popular candidates


def test_recent_items_drive_an_anonymous_request_and_unknown_ids_are_reported(both):
    codes = both.catalogue.code_raw
    given = [codes[3], codes[5]]
    out = both.recommend(Request(items=[*given, "no-such-item"], k=5))
    assert out.source == "personal"
    assert out.unknown_items == ["no-such-item"]
    assert not set(given) & set(out.items)  # the given items count as seen
    assert {b["item_id"] for b in out.because[0]} <= set(given)


def test_because_is_the_rankers_attention(runs, both):
    """The explanation of each recommended item is the attention weight DIN gave each history item."""
    run = runs["ranking"]
    raw, entities = _users_with_history(run, 1)
    out = both.recommend(Request(user_id=raw[0], k=3))
    encoded = both.encoders["ranking"].encode([Request(user_id=raw[0])])
    code = both.catalogue.item_codes([out.items[0]])[0]
    rows = both.encoders["ranking"].candidate_rows(encoded, torch.tensor([code]))
    with torch.no_grad():
        _, weights = run.net.forward_with_attention(rows)
    length = int(encoded.history.lengths[0])
    hist = encoded.history.ids[0, :length].tolist()
    items_raw = both.encoders["ranking"].items_raw
    per_item: dict = {}
    for e, w in zip(hist, weights[0, :length].tolist(), strict=True):
        per_item[items_raw[e]] = per_item.get(items_raw[e], 0.0) + w
    best = sorted(per_item.items(), key=lambda kv: -kv[1])[: both.explain]
    assert [b["item_id"] for b in out.because[0]] == [k for k, _ in best]
    np.testing.assert_allclose([b["weight"] for b in out.because[0]], [v for _, v in best], rtol=1e-5)


# ---- filters, k, diversity ---------------------------------------------------------------------------------
def test_filters_admit_only_matching_items(runs, both):
    run = runs["retrieval"]
    encoder = both.catalogue
    vocab = run.store.meta.vocabularies["cat1"]
    wanted = vocab[:2]
    price = encoder.raw_numeric("price")
    low, high = np.quantile(price[1:], [0.2, 0.8])
    banned = encoder.code_raw[1:4]
    raw, _ = _users_with_history(run, 1)
    filters = Filters(include={"cat1": wanted}, ranges={"price": (low, high)}, exclude_items=banned)
    out = both.recommend(Request(user_id=raw[0], k=20, filters=filters))
    assert out.items
    codes, _ = encoder.item_codes(out.items)
    cats = run.store.items.sparse["cat1"][run.store.item_entity[torch.tensor(codes)]].tolist()
    assert {vocab[c - 1] for c in cats} <= set(wanted)
    assert all(low <= price[c] <= high for c in codes)
    assert not set(banned) & set(out.items)
    admitted = encoder.allowed(filters)
    assert set(codes) <= set(np.flatnonzero(admitted))
    # a bound equal to an item's (rebuilt) value admits it
    value = float(np.float32(price[codes[0]]))
    at = encoder.allowed(Filters(ranges={"price": (value, value)}))
    assert at[codes[0]]


def test_unknown_filter_and_context_columns_are_request_errors(both):
    with pytest.raises(RequestError, match="'colour' is not a categorical item column"):
        both.recommend(Request(k=3, filters=Filters(include={"colour": ["red"]})))
    with pytest.raises(RequestError, match="'cat1' is not a numeric item column"):
        both.recommend(Request(k=3, filters=Filters(ranges={"cat1": (0, 1)})))
    with pytest.raises(RequestError, match="'weather' is not a context feature"):
        both.recommend(Request(k=3, context={"weather": "rain"}))
    with pytest.raises(RequestError, match="'price': expected a finite number"):
        both.catalogue.encode_value("price", "cheap")
    # a categorical value outside the training vocabulary is "unknown" (code 0), like at training time
    assert both.catalogue.encode_value("hour", "noon") == 0
    assert both.catalogue.encode_value("hour", both.catalogue.meta.vocabularies["hour"][2]) == 3


def test_k_larger_than_the_catalogue_returns_every_admissible_item(runs, both):
    raw, entities = _users_with_history(runs["retrieval"], 1)
    out = both.recommend(Request(user_id=raw[0], k=10_000))
    seen = set(runs["retrieval"].store.timelines[2].gather(entities).ids[0].tolist())
    n_items = both.num_items - 1
    assert len(out.items) == len(set(out.items)) == n_items - len(seen)


def test_mmr_on_a_hand_example():
    """Two near-duplicates score highest; MMR with weight 0.5 takes the best, then the different item."""
    scores = np.array([1.0, 0.95, 0.5])
    vectors = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]])
    assert _mmr(scores, vectors, 3, 0.0).tolist() == [0, 1, 2]
    assert _mmr(scores, vectors, 3, 0.5).tolist() == [0, 2, 1]
    assert _mmr(np.array([1.0, -np.inf, 0.2]), vectors, 3, 0.5).tolist() == [0, 2, -1]
    # diversity 1: similarity alone decides after the first pick; nothing is picked twice, no invalid one
    assert _mmr(scores, vectors, 3, 1.0).tolist() == [0, 2, 1]
    assert _mmr(np.array([1.0, -np.inf, 0.2]), vectors, 3, 1.0).tolist() == [0, 2, -1]


def test_diversity_lowers_the_similarity_within_lists(runs):
    run = runs["retrieval"]
    raw, _ = _users_with_history(run, 4)

    def similarity(pipe):
        total = 0.0
        for u in raw:
            codes, _ = pipe.catalogue.item_codes(pipe.recommend(Request(user_id=u, k=10)).items)
            v = pipe.item_vectors[codes]
            v = v / np.linalg.norm(v, axis=1, keepdims=True)
            total += (v @ v.T)[np.triu_indices(len(codes), 1)].mean()
        return total / len(raw)

    plain = Pipeline(run, None, candidates=100)
    diverse = Pipeline(run, None, candidates=100, diversity=0.7)
    diverse.index = plain.index  # same candidates; only the re-ranking differs
    assert similarity(diverse) < similarity(plain) - 0.05


# ---- events and configuration errors -------------------------------------------------------------------------
def test_online_events_join_the_history(runs):
    pipe = Pipeline(runs["retrieval"], runs["ranking"], candidates=30)
    raw, _ = _users_with_history(runs["retrieval"], 1)
    before = pipe.recommend(Request(user_id=raw[0], k=5))
    clicked = before.items[0]
    pipe.online.add(raw[0], clicked)
    after = pipe.recommend(Request(user_id=raw[0], k=5))
    assert clicked not in after.items  # now seen
    hist = pipe.encoders["ranking"].encode([Request(user_id=raw[0])]).batch.seq[history_feature("item_id")]
    assert int(hist.ids[0, int(hist.lengths[0]) - 1]) == pipe.catalogue.item_codes([clicked])[0][0]


def test_configuration_errors_name_the_key(runs, tmp_path):
    with pytest.raises(ConfigError, match="has no encode_query"):
        Pipeline(runs["ranking"], None)
    with pytest.raises(ConfigError, match="retrieval_run, ranking_run or both"):
        Pipeline(None, None)
    with pytest.raises(ConfigError, match="diversity=1.5"):
        Pipeline(runs["retrieval"], None, diversity=1.5)
    with pytest.raises(ConfigError, match="no such run directory"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint"):
        find_checkpoint(tmp_path / "empty")


# ---- the offline evaluation of the pipeline (scripts/eval_pipeline.py) ---------------------------------------
def _eval_script():
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("eval_pipeline", REPO / "scripts" / "eval_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval_cfg(served_runs, tmp_path, overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from recsys_lab.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "eval_pipeline",
            overrides=[
                f"retrieval_run={served_runs['retrieval']}",
                f"ranking_run={served_runs['ranking']}",
                "max_queries=60",
                "latency_queries=3",
                *overrides,
            ],
        )
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def test_pipeline_over_the_whole_catalogue_is_the_ranker_alone(served_runs, tmp_path):
    """With N >= the catalogue, retrieve → rank ranks every item: the same metrics as the ranker alone; the
    stage-1 recall is 1 and bounds nothing; a smaller N bounds the pipeline's recall by stage 1's."""
    script = _eval_script()
    whole = script.evaluate_pipeline(_eval_cfg(served_runs, tmp_path, ["candidates=100000", "k=10"]))
    rows = whole["systems"]
    assert whole["candidates"] == whole["pipeline"]["catalogue_items"]  # N clamped to the catalogue
    assert rows["retrieve → rank"][f"recall@{whole['candidates']} (stage 1)"] == pytest.approx(1.0)
    for metric in ("recall@10", "ndcg@10"):
        assert rows["retrieve → rank"][metric] == pytest.approx(rows["ranker alone"][metric], abs=1e-6)
    assert (tmp_path / "results.json").is_file() and 0 < whole["queries"] <= 60
    small = script.evaluate_pipeline(
        _eval_cfg(served_runs, tmp_path, ["candidates=12", "k=10", "diversity=0"])
    )
    rows = small["systems"]
    assert "retrieve → rank → MMR" not in rows
    assert rows["retrieve → rank"]["recall@10"] <= rows["retrieve → rank"]["recall@12 (stage 1)"] + 1e-9
    assert rows["retrieval alone"]["recall@10"] <= rows["retrieval alone"]["recall@12 (stage 1)"] + 1e-9
    assert all(v["total ms p50"] > 0 for v in rows.values())


# ---- free-text search through a text tower ------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_run(tmp_path_factory, data_dir):
    from hydra.core.global_hydra import GlobalHydra

    from recsys_lab.train import train
    from tests.conftest import compose_cfg
    from tests.helpers import model_overrides

    root = tmp_path_factory.mktemp("text_run")
    overrides = [
        *model_overrides("two_tower_text", root),
        "trainer.max_epochs=1",
        "model.net.id_embeddings=false",
    ]
    train(compose_cfg(overrides, root, data_dir, root / "run"))
    GlobalHydra.instance().clear()
    return load_run(root / "run")


def test_free_text_search_is_the_query_of_a_one_item_history(text_run):
    """encode_text(an item's text) is the query of a history holding that one item (no user id part), and a
    text request retrieves by it; a retrieval model without encode_text answers a clear request error."""
    pipe = Pipeline(text_run, None)
    net, store = text_run.net, text_run.store
    code = 5
    title = store.texts_by_code()[code]
    tokens, lengths = tokenize_texts(pipe.tokenizer, [title], text_run.datamodule.text.max_item_tokens)
    with torch.no_grad():
        from_text = net.encode_text(tokens, lengths)
        encoded = pipe.catalogue.encode([Request(items=[pipe.catalogue.code_raw[code]])], exclude_seen=False)
        from_history = net.encode_query(encoded.batch)
    torch.testing.assert_close(from_text, from_history, atol=1e-5, rtol=1e-4)
    out = pipe.recommend(Request(text=title, k=5))
    scores = from_text.numpy() @ pipe.item_vectors.T
    scores[0, 0] = -np.inf
    assert out.source == "text"
    best = np.argsort(-scores[0], kind="stable")[:5]
    np.testing.assert_allclose(out.scores, scores[0, best], rtol=1e-5)  # near-ties may swap places
    assert out.items[0] == pipe.catalogue.code_raw[best[0]]


def test_text_search_without_a_text_model_is_a_request_error(runs):
    with pytest.raises(RequestError, match="free-text search needs a retrieval model with encode_text"):
        Pipeline(runs["retrieval"], None).recommend(Request(text="red shoes", k=3))


@pytest.mark.slow  # an export through the dynamo exporter (~2-3 s); CI runs it
def test_exported_ranker_serves_the_same_scores(runs, served_runs, tmp_path):
    """ranking_export: the ONNX ranker in ONNX Runtime scores the candidates as the eager model does (within
    the export's parity bound); an export of another run is refused."""
    pytest.importorskip("onnxruntime")
    from recsys_lab.serving.export import export_run

    export_run(runs["ranking"], tmp_path / "ranker", "onnx", None, False, "flat", 16)
    eager = Pipeline(runs["retrieval"], runs["ranking"], candidates=30)
    graph = Pipeline(
        runs["retrieval"], runs["ranking"], candidates=30, ranking_export=str(tmp_path / "ranker")
    )
    raw, _ = _users_with_history(runs["ranking"], 3)
    for u in raw:
        a, b = eager.recommend(Request(user_id=u, k=10)), graph.recommend(Request(user_id=u, k=10))
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-4)
        assert b.because is None and graph.describe()["ranker_backend"].startswith("onnxruntime")
    other = tmp_path / "other"  # the same graph, said to come from another checkpoint
    shutil.copytree(tmp_path / "ranker", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["run"]["checkpoint"] = "/elsewhere/epoch_000.ckpt"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="not the ranker of ranking_run"):
        Pipeline(runs["retrieval"], runs["ranking"], ranking_export=str(other))
