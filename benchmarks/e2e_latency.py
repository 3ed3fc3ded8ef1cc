"""Warm single-query latency (file -> ranked list) and database throughput, per backend vs the baseline.

For each runtime (fastret on openvino, onnxruntime and torch, each at its automatic precision,
and the PyTorch baseline of benchmarks/baseline.py), on the same files:

* database throughput: images/s embedding --db (fastret: build_index, i.e. pipelined decode +
  batched encode + HNSW build; baseline: host float preprocessing, batches of 32);
* single-query latency, warm (after --warmup queries): read + decode + preprocess, encode, search
  (fastret: HNSW top-10 via rank_hits; baseline: torch matrix product + topk), each query timed
  on its own; p50/p95/p99 of the total and the median of each stage.

    python benchmarks/e2e_latency.py --db ../shared/data/wang1k --queries /tmp/fastret-scaled/queries
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fastret.engine.decode import list_images, load_pixels
from fastret.engine.encoders import describe_runtime
from fastret.engine.load import BackendUnavailable, open_encoder
from fastret.engine.retrieval import build_index, rank_hits

from baseline import Baseline, reference_tensor
from clip_random import model_argument, model_label
from common import OUT, TOP_K, limited_view, machine, spread, table, write_json

BACKENDS = ("openvino", "onnxruntime", "torch")


def percentiles(samples_ms: list[float]) -> dict:
    values = np.asarray(samples_ms)
    return {f"p{q}": round(float(np.percentile(values, q)), 2) for q in (50, 95, 99)}


def time_queries(answer, paths: list[Path], warmup: int) -> dict:
    """answer(path) -> {stage: seconds}; every query timed alone, after `warmup` untimed ones."""
    for path in paths[:warmup]:
        answer(path)
    stages: dict[str, list[float]] = {}
    totals = []
    for path in paths:
        started = time.perf_counter()
        for stage, seconds in answer(path).items():
            stages.setdefault(stage, []).append(1000 * seconds)
        totals.append(1000 * (time.perf_counter() - started))
    return {"queries": len(paths), "total_ms": percentiles(totals),
            "stage_median_ms": {stage: round(float(np.median(v)), 2) for stage, v in stages.items()}}


def fastret_side(backend: str, model: str, db: Path, queries: list[Path], warmup: int) -> dict:
    # As the CLI does: `fastret index` opens the runtime for throughput, `fastret search` for latency.
    indexer = open_encoder(model_argument(model), backend, image_dir=db, workload="throughput", log=lambda _: None)
    index, embedded = build_index(db, indexer)
    encoder = open_encoder(model_argument(model), backend, log=lambda _: None)
    spec = encoder.info.preprocessing

    def answer(path: Path) -> dict:
        t0 = time.perf_counter()
        pixels = load_pixels(path, spec)
        t1 = time.perf_counter()
        vector = encoder.encode(pixels[None])[0]
        t2 = time.perf_counter()
        rank_hits(index, vector, TOP_K)
        t3 = time.perf_counter()
        return {"read_decode_preprocess": t1 - t0, "encode": t2 - t1, "search": t3 - t2}

    return {"runtime": f"fastret {describe_runtime(encoder)}", "db_images_per_s": round(embedded.images_per_second, 2),
            **time_queries(answer, queries, warmup)}


def baseline_side(model: str, db: Path, queries: list[Path], warmup: int) -> dict:
    import torch

    baseline = Baseline(model)
    db_paths = list_images(db)
    started = time.perf_counter()
    database = baseline.embed_files(db_paths)
    throughput = len(db_paths) / (time.perf_counter() - started)

    def answer(path: Path) -> dict:
        t0 = time.perf_counter()
        batch = reference_tensor(path, baseline.spec)[None]
        t1 = time.perf_counter()
        query = baseline.embed(batch)
        t2 = time.perf_counter()
        with torch.inference_mode():
            torch.topk(query @ database.T, TOP_K, dim=1)
        t3 = time.perf_counter()
        return {"read_decode_preprocess": t1 - t0, "encode": t2 - t1, "search": t3 - t2}

    return {"runtime": "PyTorch baseline", "db_images_per_s": round(throughput, 2),
            **time_queries(answer, queries, warmup)}


def measure(backends: list[str], model: str, db: Path, queries: list[Path], warmup: int) -> list[dict]:
    """One row per available fastret runtime, each measured in turn, then the baseline's row."""
    rows = []
    for backend in backends:
        try:
            rows.append(fastret_side(backend, model, db, queries, warmup))
        except BackendUnavailable as exc:
            print(f"{backend}: unavailable ({exc})")
            continue
        print(f"{rows[-1]['runtime']}: {rows[-1]['total_ms']}", flush=True)
    rows.append(baseline_side(model, db, queries, warmup))
    return rows


def print_table(rows: list[dict]) -> None:
    baseline_p50 = rows[-1]["total_ms"]["p50"]
    print(table(
        ["runtime", "db img/s", "p50 ms", "p95 ms", "p99 ms", "decode ms", "encode ms", "search ms", "p50 speed-up"],
        [[r["runtime"], r["db_images_per_s"], r["total_ms"]["p50"], r["total_ms"]["p95"], r["total_ms"]["p99"],
          r["stage_median_ms"]["read_decode_preprocess"], r["stage_median_ms"]["encode"], r["stage_median_ms"]["search"],
          round(baseline_p50 / r["total_ms"]["p50"], 2)] for r in rows],
    ))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=Path("../shared/data/wang1k"))
    parser.add_argument("--db-limit", type=int, default=300, help="database images embedded (spread over classes)")
    parser.add_argument("--queries", type=Path, default=Path("/tmp/fastret-scaled/queries"))
    parser.add_argument("--n-queries", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", default="efficientnet-lite2", help="efficientnet-lite2 or clip-random")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--repeats", type=int, default=1, help="whole measurements, one after another")
    parser.add_argument("--out", type=Path, default=OUT / "e2e_latency")
    args = parser.parse_args(argv)

    db = limited_view(args.db, args.db_limit, args.out / f"db-{args.db_limit}")
    queries = spread(list_images(args.queries), args.n_queries)
    print(f"{len(list_images(db))} database images from {args.db}, {len(queries)} queries from {args.queries}, "
          f"model {model_label(args.model)}", flush=True)
    runs = []
    for repeat in range(args.repeats):  # the baseline's own latency moves between runs: repeat the whole
        rows = measure(args.backends, args.model, db, queries, args.warmup)
        print(f"run {repeat + 1} of {args.repeats}")
        print_table(rows)
        runs.append(rows)
    if args.repeats > 1:
        for i, row in enumerate(runs[0][:-1]):
            ratios = [run[-1]["total_ms"]["p50"] / run[i]["total_ms"]["p50"] for run in runs]
            print(f"{row['runtime']}: p50 speed-up per run {', '.join(f'{r:.2f}' for r in ratios)}, "
                  f"median {float(np.median(ratios)):.2f}")
    write_json(args.out / "e2e_latency.json", {"command": " ".join(sys.argv), "model": model_label(args.model),
                                               "machine": machine(), "db": str(args.db), "db_images": args.db_limit,
                                               "results": runs[-1], "runs": runs})
    print(f"-> {args.out / 'e2e_latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
