"""Would float16 embeddings on disk change retrieval? Quality, bytes and load time of an index's
embeddings stored as float16 instead of float32.

For each index given: leave-one-out P@10, R@10 and mAP with exact search, and P@10 plus HNSW
recall@10 (against exact fp32 search) with an HNSW graph built with the index's parameters, once on
the float32 rows and once on the same rows rounded to float16 (searched as float32: what loading a
float16 file into the float32 search would do); the share of queries whose exact top 10 is the
same list; bytes of the (N, D) matrix; and the median time to load it from a warm page cache as
float32, as float16 converted to float32, and memory-mapped float16.

    python benchmarks/fp16_embeddings.py --index wang1k=/tmp/wang1k-index --index animals=/tmp/animals-index
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import OUT, TOP_K, leave_one_out_quality, machine, table, write_json  # noqa: E402

from fastret.engine.index import Index, build_hnsw  # noqa: E402
from fastret.engine.metrics import drop_self  # noqa: E402


def hnsw_top(embeddings: np.ndarray, rows: np.ndarray, params) -> np.ndarray:
    """(Q, TOP_K) HNSW leave-one-out top ids of `rows` (rows are ids; the graph is built here)."""
    graph = build_hnsw(embeddings, params)
    graph.set_ef(max(params.ef_search, TOP_K + 1))
    ids, _ = graph.knn_query(embeddings[rows], k=TOP_K + 1)
    return drop_self(ids.astype(np.int64), rows)


def exact_top(embeddings: np.ndarray, rows: np.ndarray) -> np.ndarray:
    scores = embeddings[rows] @ embeddings.T
    scores[np.arange(len(rows)), rows] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K]


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true top-k ids found (recall@k against a reference search)."""
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(found, truth)]))


def load_seconds(matrix: np.ndarray, repeats: int) -> dict:
    """Median seconds to load the matrix from a warm page cache, three ways."""
    folder = Path(tempfile.mkdtemp(prefix="fastret-fp16-"))
    np.save(folder / "fp32.npy", matrix)
    np.save(folder / "fp16.npy", matrix.astype(np.float16))
    ways = {
        "float32 file": lambda: np.load(folder / "fp32.npy"),
        "float16 file -> float32": lambda: np.load(folder / "fp16.npy").astype(np.float32),
        "float32 file, mmap + touch": lambda: np.load(folder / "fp32.npy", mmap_mode="r").sum(),
        "float16 file, mmap + touch": lambda: np.load(folder / "fp16.npy", mmap_mode="r").sum(dtype=np.float32),
    }
    result = {}
    for name, load in ways.items():
        load()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            load()
            times.append(time.perf_counter() - started)
        result[name] = statistics.median(times)
    return result


def measure(name: str, index_dir: Path, queries: int, repeats: int) -> dict:
    index = Index.load(index_dir)
    fp32 = np.ascontiguousarray(index.embeddings, dtype=np.float32)
    fp16 = fp32.astype(np.float16).astype(np.float32)
    labels = [item.label for item in index.items]
    rows = np.arange(len(fp32)) if queries >= len(fp32) else np.linspace(0, len(fp32) - 1, queries).round().astype(int)
    truth = exact_top(fp32, rows)
    out = {"items": len(fp32), "dim": int(fp32.shape[1]), "queries": len(rows),
           "max_abs_rounding": float(np.abs(fp32 - fp16).max()),
           "bytes": {"float32": fp32.nbytes, "float16": fp32.nbytes // 2}}
    for dtype, matrix in (("float32", fp32), ("float16", fp16)):
        hnsw = hnsw_top(matrix, rows, index.hnsw_params)
        out[dtype] = {
            "exact": leave_one_out_quality(matrix, labels, rows),
            "hnsw": leave_one_out_quality(matrix, labels, rows, ranked=hnsw),
            "hnsw_recall@10_vs_exact_fp32": overlap(hnsw, truth),
            "exact_same_top10_share": float(np.mean(np.all(exact_top(matrix, rows) == truth, axis=1))),
        }
    out["load_seconds"] = load_seconds(fp32, repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--queries", type=int, default=1000, help="leave-one-out queries spread over each index")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT / "fp16_embeddings.json")
    args = parser.parse_args(argv)
    results = {}
    for spec in args.index:
        name, _, folder = spec.partition("=")
        results[name] = measure(name, Path(folder), args.queries, args.repeats)
    rows = []
    for name, r in results.items():
        for dtype in ("float32", "float16"):
            q = r[dtype]
            rows.append([f"{name} {dtype}", q["exact"]["P@10"], q["exact"]["R@10"], q["exact"]["mAP"],
                         q["hnsw"]["P@10"], q["hnsw_recall@10_vs_exact_fp32"], q["exact_same_top10_share"],
                         r["bytes"][dtype] / 2**20])
    print(table(["index", "exact P@10", "exact R@10", "exact mAP", "HNSW P@10", "HNSW recall@10", "same top10",
                 "MiB"], rows))
    loads = [[name] + [1000 * v for v in r["load_seconds"].values()] for name, r in results.items()]
    print(table(["index (load ms)"] + list(next(iter(results.values()))["load_seconds"]), loads))
    write_json(args.out, {"machine": machine(), "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
