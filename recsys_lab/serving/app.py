"""The HTTP service (FastAPI): recommendations, events, health, metadata and hot model swaps.

Endpoints:
- `POST /recommend` {user_id | items | both | text, k, context, filters, explain} -> items with scores, the retrieval
  scores, and for a ranker with attention the history items behind each score (`because`). Unknown users,
  new items and empty histories are normal paths (see `recsys_lab.serving.requests`); the answer's `source`
  says whether the request was encoded ("personal"), a free-text search ("text": retrieval models with
  `encode_text`, the text towers; the ranker still orders the found items for the user) or served by popularity
  in context ("popularity").
- `POST /events` [{user_id, item_id, timestamp, event}] appends interactions to a JSON-lines log (what the
  online trainer reads) and to the users' live histories, so the next recommendation sees them.
- `GET /health`, `GET /metadata` (runs, data fingerprints, index size, versions, events logged).
- `POST /reload` {retrieval_run, ranking_run}: builds the new pipeline beside the serving one (a stage not named
  keeps its current run), then swaps one reference; requests in flight finish on the version they started with,
  none is dropped.

Validation: every body is a strict pydantic model (unknown fields, wrong types, NaN, k < 1 are 422 with the
field named); a value the data cannot interpret (a filter column that is no item column, a context column the
model does not have) is a 422 naming it. Anything else that fails inside a request is a 500 for that request
only: the worker keeps serving.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from recsys_lab.serving.pipeline import Pipeline
from recsys_lab.serving.requests import Filters, OnlineHistories, RequestError
from recsys_lab.serving.requests import Request as PipelineRequest
from recsys_lab.utils.run import package_versions

RawId = StrictInt | StrictStr
Value = StrictInt | StrictFloat | StrictStr
MAX_K = 1000
MAX_ITEMS = 1000
MAX_EVENTS = 10000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FiltersBody(_Strict):
    include: dict[str, list[Value]] = Field(default_factory=dict)
    ranges: dict[str, tuple[StrictInt | StrictFloat | None, StrictInt | StrictFloat | None]] = Field(
        default_factory=dict
    )
    exclude_items: list[RawId] = Field(default_factory=list, max_length=MAX_ITEMS)


class RecommendBody(_Strict):
    user_id: RawId | None = None
    items: list[RawId] = Field(default_factory=list, max_length=MAX_ITEMS)
    text: StrictStr | None = Field(None, min_length=1, max_length=2000)
    k: StrictInt = Field(10, ge=1, le=MAX_K)
    context: dict[str, Value] = Field(default_factory=dict)
    filters: FiltersBody = Field(default_factory=FiltersBody)
    explain: bool = True


class EventBody(_Strict):
    user_id: RawId
    item_id: RawId
    timestamp: StrictInt | None = None  # seconds; the service's clock when missing
    event: StrictStr = "click"
    positive: bool = True


class ReloadBody(_Strict):
    retrieval_run: StrictStr | None = None
    ranking_run: StrictStr | None = None


class EventLog:
    """Interactions posted to the service, appended as JSON lines (one writer at a time)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self.count = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, records: list[dict]) -> None:
        with self._lock:
            if self.path is not None:
                with self.path.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
            self.count += len(records)


class ServiceState:
    """The serving pipeline (swapped whole on reload), its version and the shared event state."""

    def __init__(self, pipeline: Pipeline, build: Callable[..., Pipeline], events: EventLog) -> None:
        self.build, self.events = build, events
        self.serving = (pipeline, 1)  # swapped whole: the pipeline and its version together
        self.online: OnlineHistories = pipeline.online
        self._reload_lock = threading.Lock()
        self.started = time.time()

    @property
    def pipeline(self) -> Pipeline:
        return self.serving[0]

    @property
    def version(self) -> int:
        return self.serving[1]

    def reload(self, retrieval_run: str | None, ranking_run: str | None) -> None:
        """A new version from the given runs; a stage not named keeps the serving version's run."""
        with self._reload_lock:  # one reload at a time; serving goes on meanwhile
            current, version = self.serving
            keep = {
                role: str(run.path) if run else None
                for role, run in (("retrieval", current.retrieval), ("ranking", current.ranking))
            }
            fresh = self.build(
                retrieval_run=retrieval_run or keep["retrieval"],
                ranking_run=ranking_run or keep["ranking"],
                online=self.online,
            )
            self.serving = (fresh, version + 1)  # one reference: a request holds the version it started with


def create_app(
    pipeline: Pipeline,
    build: Callable[..., Pipeline] | None = None,
    events_path: str | None = None,
    max_concurrent: int = 2,
):
    """The FastAPI app around a pipeline; `build(retrieval_run=, ranking_run=, online=)` makes the pipeline of
    a reload (None: `/reload` answers 501). At most `max_concurrent` requests run the pipeline at once, the
    others wait their turn: on a few cores, more at once only thrash (measured in the load benchmark)."""
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent={max_concurrent}: expected a positive integer")
    slots = threading.BoundedSemaphore(max_concurrent)
    versions = package_versions(
        {p: p for p in ("recsys_lab", "torch", "fastapi", "pytorch-lightning")} | {"faiss": "faiss-cpu"}
    )
    app = FastAPI(title="recsys_lab", version=versions["recsys_lab"])
    state = ServiceState(pipeline, build or _no_reload, EventLog(events_path))
    app.state.service = state

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        # where and what, never the input itself: it may be NaN or huge, and is the client's own anyway
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in err.errors()]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(err)})

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:  # this request fails, the worker lives
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(err).__name__}"})

    @app.post("/recommend")
    def recommend(body: RecommendBody) -> dict[str, Any]:
        pipe, version = state.serving  # this request's version, whatever a reload does meanwhile
        request = PipelineRequest(
            user_id=body.user_id,
            items=list(body.items),
            text=body.text,
            k=body.k,
            context=dict(body.context),
            filters=Filters(
                include={c: list(v) for c, v in body.filters.include.items()},
                ranges={c: tuple(v) for c, v in body.filters.ranges.items()},
                exclude_items=list(body.filters.exclude_items),
            ),
        )
        with slots:
            out = pipe.recommend(request)
        items = [
            {
                "item_id": item,
                "score": score,
                "retrieval_score": r,
                **({"because": out.because[i]} if out.because is not None and body.explain else {}),
            }
            for i, (item, score, r) in enumerate(
                zip(out.items, out.scores, out.retrieval_scores, strict=True)
            )
        ]
        return {
            "items": items,
            "source": out.source,
            "unknown_items": out.unknown_items,
            "model_version": version,
            "timings_ms": out.timings_ms,
        }

    @app.post("/events")
    def events(body: list[EventBody]) -> dict[str, Any]:
        if len(body) > MAX_EVENTS:
            raise HTTPException(422, f"events: {len(body)} in one call, at most {MAX_EVENTS}")
        pipe = state.pipeline
        now = int(time.time())
        records, unknown = [], []
        encoder = pipe.catalogue
        for e in body:
            if str(e.item_id) not in encoder.item_entity:
                unknown.append(e.item_id)  # logged for the trainer (a new item), not in the live history
            elif e.positive:
                state.online.add(e.user_id, e.item_id)
            # the log is a training source as it is (`data=tabular data.path=<events.jsonl> data.columns.label=
            # label`): string ids, as the CSV reader reads them, and a 0/1 label
            records.append(
                {
                    "user_id": str(e.user_id),
                    "item_id": str(e.item_id),
                    "timestamp": e.timestamp if e.timestamp is not None else now,
                    "event": e.event,
                    "label": int(e.positive),
                }
            )
        state.events.append(records)
        return {"logged": len(records), "unknown_items": unknown}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model_version": state.version,
            "uptime_s": round(time.time() - state.started, 1),
        }

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        return {
            **state.pipeline.describe(),
            "model_version": state.version,
            "events_logged": state.events.count,
            "events_path": str(state.events.path) if state.events.path else None,
            "versions": versions,
        }

    @app.post("/reload")
    def reload(body: ReloadBody) -> dict[str, Any]:
        if not (body.retrieval_run or body.ranking_run):
            raise HTTPException(422, "reload: give retrieval_run, ranking_run or both")
        try:
            state.reload(body.retrieval_run, body.ranking_run)
        except NotImplementedError as err:
            raise HTTPException(501, str(err)) from None
        except (ValueError, OSError, RuntimeError) as err:  # a bad run directory: the serving version stays
            raise HTTPException(422, f"reload failed, still serving version {state.version}: {err}") from None
        return {"model_version": state.version, **state.pipeline.describe()}

    return app


def _no_reload(**_: Any) -> Pipeline:
    raise NotImplementedError("this service was started without a pipeline builder: no reload")
