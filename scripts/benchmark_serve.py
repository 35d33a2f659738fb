"""Load benchmark of the HTTP service: `python scripts/benchmark_serve.py retrieval_run=<run> ranking_run=<run>`.

Starts `scripts/serve.py` as its own process on localhost, waits (bounded) for `/health`, then drives it from
this process with `POST /recommend` for known users (ids from `/metadata`, seeded draws), in two bounded modes:

- open loop at `rates` requests/s for `duration_s` each: requests leave on a fixed schedule whatever the
  server does, and latency counts from the scheduled send time, so queueing shows (the honest way to read "p99
  at 50 requests/s");
- closed loop with `concurrency` clients sending back to back: the throughput the service sustains.

Reports, per setting: p50 / p95 / p99 latency seen by the client, the server's own p50 / p99 (`timings_ms`
total: the pipeline without HTTP), throughput and errors, as a markdown table with the exact command; writes
results.json. The server is stopped at the end whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import httpx
import hydra
import numpy as np
from omegaconf import DictConfig

from recsys_lab.train import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]


def start_server(cfg: DictConfig, out: Path) -> subprocess.Popen:
    args = [
        sys.executable,
        str(REPO / "scripts" / "serve.py"),
        f"port={cfg.port}",
        f"threads={cfg.server_threads}",
        f"max_concurrent={cfg.max_concurrent}",
        f"candidates={cfg.candidates}",
        f"index.kind={cfg.index.kind}",
        f"hydra.run.dir={out / 'server'}",
    ]
    args += [f"+index.options.{k}={v}" for k, v in (cfg.index.options or {}).items()]
    args += [f"{key}={cfg[key]}" for key in ("retrieval_run", "ranking_run", "ranking_export") if cfg[key]]
    args += [f"ranking_int8={cfg.ranking_int8}"]
    log = (out / "server.log").open("w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def wait_ready(url: str, server: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until /health answers; RuntimeError if the server exits or the deadline passes."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}; see its server.log")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server did not answer /health within {timeout_s} s")


def _bodies(users: list, n: int, k: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"user_id": users[i], "k": k, "explain": False} for i in rng.integers(0, len(users), n)]


async def _send(client: httpx.AsyncClient, body: dict, t0: float, out: list) -> None:
    try:
        r = await client.post("/recommend", json=body)
        ok = r.status_code == 200
        server_ms = r.json()["timings_ms"]["total"] if ok else float("nan")
    except httpx.HTTPError:
        ok, server_ms = False, float("nan")
    out.append(((time.perf_counter() - t0) * 1e3, server_ms, ok))


async def open_loop(url: str, bodies: list[dict], rate: float, duration_s: float) -> dict:
    """Requests leave every 1/rate s for duration_s; latency from each one's scheduled departure."""
    n = int(rate * duration_s)
    out: list = []
    async with httpx.AsyncClient(
        base_url=url, timeout=30.0, limits=httpx.Limits(max_connections=512)
    ) as client:
        start = time.perf_counter()
        tasks = []
        for i in range(n):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(_send(client, bodies[i % len(bodies)], due, out)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return _summary(out, elapsed)


async def closed_loop(url: str, bodies: list[dict], concurrency: int, duration_s: float) -> dict:
    """`concurrency` clients, each sending its next request when the last one is answered."""
    out: list = []
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        start = time.perf_counter()

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() - start < duration_s:
                await _send(client, bodies[i % len(bodies)], time.perf_counter(), out)
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return _summary(out, elapsed)


def _summary(out: list, elapsed: float) -> dict:
    latency = np.array([o[0] for o in out if o[2]])
    server = np.array([o[1] for o in out if o[2]])
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
    return {
        "requests": len(out),
        "errors": sum(not o[2] for o in out),
        "throughput_rps": len(latency) / elapsed,
        "p50_ms": pct(latency, 50),
        "p95_ms": pct(latency, 95),
        "p99_ms": pct(latency, 99),
        "server_p50_ms": pct(server, 50),
        "server_p99_ms": pct(server, 99),
    }


def _event_loop_policy() -> str:
    """uvloop for the load generator when installed (uvicorn[standard], the serve extra): the client's own
    overhead counts in the latencies it measures, so it should be as small as the server's."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def run(cfg: DictConfig) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a log line per request would load this process
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{cfg.port}"
    loop = _event_loop_policy()
    server = start_server(cfg, out)
    try:
        ready_s = wait_ready(url, server, cfg.start_timeout_s)
        meta = httpx.get(f"{url}/metadata", timeout=10.0).json()
        bodies = _bodies(meta["user_id_sample"], 5000, cfg.k, cfg.seed)
        for body in bodies[: cfg.warmup]:  # first calls pay one-off costs (allocations, lazy imports)
            httpx.post(f"{url}/recommend", json=body, timeout=30.0)
        rows = {}
        for rate in cfg.rates:
            rows[f"open loop {rate} req/s"] = asyncio.run(open_loop(url, bodies, rate, cfg.duration_s))
        for c in cfg.concurrency:
            rows[f"closed loop, {c} clients"] = asyncio.run(closed_loop(url, bodies, c, cfg.duration_s))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    results = {
        "command": "python " + " ".join(sys.argv),
        "server_ready_s": ready_s,
        "index": meta["index"],
        "catalogue_items": meta["catalogue_items"],
        "candidates": meta["candidates"],
        "ranking": (meta.get("ranking") or {}).get("model"),
        "ranker_backend": meta.get("ranker_backend"),
        "retrieval": (meta.get("retrieval") or {}).get("model"),
        "server_threads": cfg.server_threads,
        "max_concurrent": cfg.max_concurrent,
        "client_loop": loop,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    head = (
        f"`{results['command']}` — {results['catalogue_items']:,} items, index {results['index']['kind']}, "
        f"{results['candidates']} candidates ranked by {str(results['ranking']).rsplit('.', 1)[-1]} "
        f"({results['ranker_backend']}), "
        f"server on {results['server_threads']} thread(s) per request, at most {results['max_concurrent']} "
        f"requests at once, ready in {results['server_ready_s']:.0f} s"
    )
    cols = ["throughput_rps", "p50_ms", "p95_ms", "p99_ms", "server_p50_ms", "server_p99_ms", "errors"]
    lines = [head, "", "| load | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in results["rows"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{row[c]:.1f}" if c != "errors" else str(row[c]) for c in cols)
            + " |"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="benchmark_serve")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except RuntimeError as err:
        raise SystemExit(f"benchmark_serve: {err}") from None


if __name__ == "__main__":
    main()
