"""Loopback load test of `fastret serve`: many concurrent uploads, latency percentiles, 0 errors.

Starts the server as a child process on 127.0.0.1 (a free port), once per --max-batch setting,
sends --requests uploads at --concurrency at a time (plus a one-at-a-time baseline), checks
every answer (a query taken from the index must find itself first), and stops the server.
Bounded: each phase gives up after --time-limit seconds and counts what is unfinished as errors.

    python benchmarks/web_load.py --index /tmp/wang1k-index [--requests 200 --concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

import common
from fastret.engine.decode import list_images
from fastret.engine.index import Index

DISTINCT_QUERIES = 50


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(index: Path, max_batch: int, backend: str, threads: int | None, start_timeout: float):
    """`fastret serve` in a child process; yields its base URL once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "fastret.cli.main", "serve", "--index", str(index), "--port", str(port),
               "--max-batch", str(max_batch), "--backend", backend] + (["--threads", str(threads)] if threads else [])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if server.poll() is not None:
                raise SystemExit(f"web_load: the server exited with status {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"web_load: the server did not answer within {start_timeout:.0f} s")
            time.sleep(0.25)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def one_search(client: httpx.AsyncClient, query: tuple[str, bytes], k: int) -> dict:
    """Send one upload; say how long it took, and whether the answer is right."""
    expected, data = query
    started = time.perf_counter()
    try:
        response = await client.post("/search", files={"image": (Path(expected).name, data)}, params={"k": k})
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            return {"seconds": seconds, "error": f"HTTP {response.status_code}: {response.text[:200]}"}
        body = response.json()
        top = body["results"][0]["path"] if body["results"] else None
        error = None if top == expected else f"top hit {top}, expected {expected}"
        return {"seconds": seconds, "error": error, "timing": body["timing"], "backend": body["backend"]}
    except httpx.HTTPError as exc:
        return {"seconds": time.perf_counter() - started, "error": f"{type(exc).__name__}: {exc}"}


async def phase(url: str, queries: list[tuple[str, bytes]], requests: int, concurrency: int, k: int,
                time_limit: float) -> dict:
    """`requests` searches, at most `concurrency` in flight, cycling through the queries."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=time_limit) as client:
        async def gated(n: int) -> dict:
            async with gate:
                return await one_search(client, queries[n % len(queries)], k)

        tasks = [asyncio.create_task(gated(n)) for n in range(requests)]
        started = time.perf_counter()
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        wall = time.perf_counter() - started
        for task in pending:
            task.cancel()
    outcomes = [task.result() for task in done]
    latencies_ms = np.array([o["seconds"] for o in outcomes if o["error"] is None]) * 1000
    errors = [o["error"] for o in outcomes if o["error"] is not None] + ["unfinished"] * len(pending)
    timings = [o["timing"] for o in outcomes if "timing" in o]
    mean = lambda key: round(float(np.mean([t[key] for t in timings])), 2) if timings else None  # noqa: E731
    percentile = lambda q: round(float(np.percentile(latencies_ms, q)), 1) if len(latencies_ms) else None  # noqa: E731
    return {
        "backend": ",".join(sorted({o["backend"] for o in outcomes if "backend" in o})),
        "concurrency": concurrency,
        "requests": requests,
        "ok": len(latencies_ms),
        "errors": len(errors),
        "first_errors": errors[:5],
        "p50_ms": percentile(50),
        "p95_ms": percentile(95),
        "p99_ms": percentile(99),
        "max_ms": round(float(latencies_ms.max()), 1) if len(latencies_ms) else None,
        "requests_per_s": round(len(latencies_ms) / wall, 1),
        "mean_batch": mean("batch_size"),
        "server_decode_ms": mean("decode_ms"),
        "server_encode_ms": mean("encode_ms"),
        "server_search_ms": mean("search_ms"),
        "wall_s": round(wall, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True, help="index directory (its root provides the queries)")
    parser.add_argument("--requests", type=int, default=200, help="searches in the concurrent phase (default: 200)")
    parser.add_argument("--concurrency", type=int, default=200, help="searches in flight at once (default: 200)")
    parser.add_argument("--baseline-requests", type=int, default=30, help="one-at-a-time searches first (default: 30)")
    parser.add_argument("--max-batch", default="16,1", help="server --max-batch settings to compare (default: 16,1)")
    parser.add_argument("--backend", default="auto", help="server --backend (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="server encoder threads (default: all cores)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per phase before giving up")
    parser.add_argument("--out", type=Path, default=common.OUT / "web_load.json")
    args = parser.parse_args()

    index = Index.load(args.index, verify=False)
    root = Path(index.root)
    indexed = {item.path for item in index.items}
    files = [p for p in list_images(root) if p.relative_to(root).as_posix() in indexed]
    queries = [(p.relative_to(root).as_posix(), p.read_bytes()) for p in common.spread(files, DISTINCT_QUERIES)]
    print(f"{len(index)} indexed images under {root}; {len(queries)} distinct query files", file=sys.stderr)

    rows = []
    for max_batch in [int(v) for v in args.max_batch.split(",")]:
        with running_server(args.index, max_batch, args.backend, args.threads, start_timeout=args.time_limit) as url:
            asyncio.run(phase(url, queries, 3, 1, args.k, args.time_limit))  # warm-up: first-call costs
            for requests, concurrency in ((args.baseline_requests, 1), (args.requests, args.concurrency)):
                result = asyncio.run(phase(url, queries, requests, concurrency, args.k, args.time_limit))
                rows.append({"max_batch": max_batch, **result})
                print(f"max_batch {max_batch}, concurrency {concurrency}: {result['errors']} errors, "
                      f"p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms", file=sys.stderr)

    header = ["backend", "server max_batch", "concurrency", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "max ms",
              "req/s", "mean batch", "server decode/encode/search ms"]
    print(common.table(header, [
        [r["backend"], r["max_batch"], r["concurrency"], r["requests"], r["errors"]]
        + [f"{r[key]:.1f}" for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "requests_per_s", "mean_batch")]
        + [f"{r['server_decode_ms']:.1f} / {r['server_encode_ms']:.1f} / {r['server_search_ms']:.1f}"]
        for r in rows
    ]))
    common.write_json(args.out, {"command": " ".join(sys.argv), "machine": common.machine(),
                                 "model": index.model.model_id, "count": len(index), "phases": rows})
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
