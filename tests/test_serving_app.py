"""The HTTP service through FastAPI's test client: endpoints, validation, events, hot swap, and a fuzz of the
request schema that must never produce a 5xx."""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from recsys_lab.serving.app import create_app  # noqa: E402
from recsys_lab.serving.pipeline import Pipeline  # noqa: E402
from recsys_lab.serving.runs import load_run  # noqa: E402


@pytest.fixture(scope="module")
def runs(served_runs):
    return {role: load_run(path) for role, path in served_runs.items()}


@pytest.fixture(scope="module")
def service(runs, served_runs, tmp_path_factory):
    events = tmp_path_factory.mktemp("events") / "events.jsonl"
    pipeline = Pipeline(runs["retrieval"], runs["ranking"], candidates=40)

    def build(retrieval_run, ranking_run, online):  # a reload reuses the loaded runs (fast) unless told
        return Pipeline(
            load_run(retrieval_run) if retrieval_run else None,
            load_run(ranking_run) if ranking_run else None,
            candidates=40,
            online=online,
        )

    app = create_app(pipeline, build, str(events))
    return TestClient(app), pipeline, events


@pytest.fixture(scope="module")
def known_user(runs):
    store = runs["ranking"].store
    import torch

    lengths = store.timelines[2].lengths(torch.arange(store.timelines[2].n_rows))
    entity = int((lengths > 2).nonzero()[0])
    return runs["ranking"].datamodule.prepared().users["user_id"].to_list()[entity]


def test_recommend_answers_with_items_scores_and_reasons(service, known_user):
    client, pipeline, _ = service
    r = client.post("/recommend", json={"user_id": known_user, "k": 5, "context": {"device": "1"}})
    assert r.status_code == 200
    body = r.json()
    assert len(body["items"]) == 5 and body["source"] == "personal"
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(1 <= len(i["because"]) <= pipeline.explain for i in body["items"])
    assert set(body["timings_ms"]) == {"encode", "retrieve", "rank", "diversify", "total"}
    quiet = client.post("/recommend", json={"user_id": known_user, "k": 5, "explain": False}).json()
    assert all("because" not in i for i in quiet["items"])


@pytest.mark.parametrize(
    "body",
    [
        {},  # nothing: popularity
        {"user_id": "someone-new", "k": 3},
        {"items": [], "k": 3},
        {"items": ["not-an-item"], "k": 2},
    ],
)
def test_cold_paths_are_answers_not_errors(service, body):
    client, _, _ = service
    r = client.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["source"] == "popularity" and len(out["items"]) == body.get("k", 10)
    assert all(i["retrieval_score"] is None for i in out["items"])  # a popularity count is no retrieval score
    assert out["unknown_items"] == body.get("items", [])


def test_k_larger_than_the_catalogue(service):
    client, pipeline, _ = service
    r = client.post("/recommend", json={"k": 1000})
    assert r.status_code == 200
    assert len(r.json()["items"]) == pipeline.num_items - 1


@pytest.mark.parametrize(
    "body, field",
    [
        ({"k": 0}, "k"),
        ({"k": "ten"}, "k"),
        ({"k": 1001}, "k"),
        ({"k": 2.5}, "k"),
        ({"user_id": [1]}, "user_id"),
        ({"items": "abc"}, "items"),
        ({"colour": "red"}, "colour"),
        ({"context": {"hour": [1]}}, "context"),
        ({"filters": {"ranges": {"price": [1]}}}, "ranges"),
        ({"filters": {"include": {"colour": ["red"]}}}, "colour"),
        ({"context": {"weather": "rain"}}, "weather"),
        ({"text": "running shoes"}, "text"),
        ({"filters": {"ranges": {"price": [0, 10**400]}}}, "price"),  # a JSON integer beyond float's range
    ],
)
def test_malformed_requests_are_4xx_naming_the_field(service, body, field):
    client, _, _ = service
    r = client.post("/recommend", json=body)
    assert r.status_code == 422, r.text
    assert field in json.dumps(r.json()["detail"])


def test_non_json_and_nan_bodies_are_rejected(service):
    client, _, _ = service
    assert (
        client.post(
            "/recommend", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    nan = b'{"filters": {"ranges": {"price": [NaN, 1]}}}'
    assert (
        client.post("/recommend", content=nan, headers={"content-type": "application/json"}).status_code
        == 422
    )


def test_events_are_logged_and_join_the_history(service, known_user):
    client, pipeline, events = service
    first = client.post("/recommend", json={"user_id": known_user, "k": 3}).json()["items"][0]["item_id"]
    r = client.post(
        "/events",
        json=[
            {"user_id": known_user, "item_id": first, "timestamp": 123},
            {"user_id": "newcomer", "item_id": "brand-new-item"},
        ],
    )
    assert r.status_code == 200 and r.json() == {"logged": 2, "unknown_items": ["brand-new-item"]}
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert lines[-2] == {
        "user_id": str(known_user),
        "item_id": str(first),
        "timestamp": 123,
        "event": "click",
        "label": 1,
    }
    assert lines[-1]["user_id"] == "newcomer" and isinstance(lines[-1]["timestamp"], int)
    again = client.post("/recommend", json={"user_id": known_user, "k": 3}).json()
    assert first not in [i["item_id"] for i in again["items"]]  # seen now
    assert client.post("/events", json=[{"user_id": 1}]).status_code == 422
    assert client.get("/metadata").json()["events_logged"] >= 2


def test_health_and_metadata(service):
    client, pipeline, _ = service
    assert client.get("/health").json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["index"] == {"kind": "flat", "size": pipeline.num_items - 1}
    assert meta["retrieval"]["model"].endswith("TwoTower") and meta["ranking"]["model"].endswith("DIN")
    assert meta["retrieval"]["data_fingerprint"] and meta["versions"]["torch"]


def test_hot_swap_drops_no_request(service, served_runs, known_user):
    """Requests keep being answered while a new version loads; a failed reload keeps the serving one."""
    client, _, _ = service
    version = client.get("/health").json()["model_version"]
    statuses: list[int] = []
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            statuses.append(client.post("/recommend", json={"user_id": known_user, "k": 3}).status_code)

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        r = client.post(
            "/reload",
            json={"retrieval_run": str(served_runs["retrieval"]), "ranking_run": str(served_runs["ranking"])},
        )
    finally:
        stop.set()
        worker.join()
    assert r.status_code == 200 and r.json()["model_version"] == version + 1
    assert statuses and set(statuses) == {200}
    kept = client.post("/reload", json={"retrieval_run": str(served_runs["retrieval"])})  # ranking kept
    assert kept.status_code == 200 and kept.json()["ranking"]["model"].endswith("DIN")
    version += 1
    bad = client.post("/reload", json={"retrieval_run": "/no/such/run"})
    assert bad.status_code == 422 and "still serving version" in bad.json()["detail"]
    assert client.get("/health").json()["model_version"] == version + 1


# ---- fuzz: whatever the body, never a 5xx ------------------------------------------------------------------
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_ids = st.one_of(st.integers(-5, 400), st.text(max_size=5))
_bodies = st.one_of(
    _json,
    st.fixed_dictionaries(
        {},
        optional={
            "user_id": st.one_of(_ids, _json),
            "items": st.one_of(st.lists(_ids, max_size=6), _json),
            "k": st.one_of(st.integers(-3, 1200), _json),
            "context": st.one_of(
                st.dictionaries(st.sampled_from(["hour", "device", "weekday", "x"]), _scalars), _json
            ),
            "filters": st.one_of(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "include": st.dictionaries(
                            st.sampled_from(["cat1", "cat2", "brand", "price", "x"]),
                            st.lists(_scalars, max_size=3),
                        ),
                        "ranges": st.dictionaries(
                            st.sampled_from(["price", "cat1", "x"]), st.tuples(_scalars, _scalars)
                        ),
                        "exclude_items": st.lists(_ids, max_size=4),
                    },
                ),
                _json,
            ),
            "explain": st.one_of(st.booleans(), _json),
        },
    ),
)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=_bodies)
def test_fuzzed_requests_never_get_a_server_error(service, body):
    client, _, _ = service
    r = client.post("/recommend", json=body)
    assert r.status_code in (200, 422), (body, r.status_code, r.text)


def test_serve_script_builds_the_configured_pipeline(served_runs):
    """scripts/serve.py's builder: conf/serve.yaml's settings reach the pipeline, and a bad run is one line."""
    import importlib.util

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from recsys_lab.train import CONFIG_DIR
    from recsys_lab.utils.checks import ConfigError
    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("serve_script", REPO / "scripts" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("serve", overrides=["candidates=25", "diversity=0.3", "index.kind=hnsw", "explain=2"])
    GlobalHydra.instance().clear()
    build = serve.build_pipeline(cfg)
    pipe = build(str(served_runs["retrieval"]), str(served_runs["ranking"]))
    assert (pipe.n_candidates, pipe.diversity, pipe.explain, pipe.index.kind) == (25, 0.3, 2, "hnsw")
    with pytest.raises(ConfigError, match="no such run directory"):
        build("/no/such/run", None)


def test_the_event_log_is_a_training_source(service, known_user):
    """POST /events writes JSON lines the tabular source reads as interactions with a 0/1 label."""
    from recsys_lab.data.sources.tabular import Tabular

    client, _, events = service
    client.post(
        "/events",
        json=[
            {"user_id": known_user, "item_id": 3, "timestamp": 10, "positive": False},
            {"user_id": "u-9", "item_id": 4, "timestamp": 11},
        ],
    )
    columns = {
        "user": "user_id",
        "item": "item_id",
        "timestamp": "timestamp",
        "rating": None,
        "label": "label",
    }
    raw = Tabular(str(events), columns).load()
    n = len(events.read_text().splitlines())
    assert raw.interactions.height == n
    assert raw.interactions["label"].to_list()[-2:] == [0.0, 1.0]
