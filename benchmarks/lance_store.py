"""The LanceDB store against hnswlib: ANN parameters by recall, then build, speed, memory and disk.

Two parts:

* --embeddings DB.npy --queries-dir DIR: real embeddings of the augmented 10k set (ray_scaling.py
  saves the database's; the queries are embedded here with the same runtime and cached): recall@10
  against exact search of LanceDB's IVF_PQ and IVF_HNSW_SQ over their query-time parameters, to
  choose the store's defaults (engine/lance_store.py, AnnParams).
* --synthetic N ...: N clustered unit vectors (ann_recall.py's generator: 100 centres, intrinsic
  dimension 16, 512-d, seed 0), 1,000 queries. For each store, a child process builds it (build
  seconds, disk bytes) and a fresh child opens it and answers the queries one at a time and in
  one batch (queries/s, recall@10 against exact, resident memory while answering one query at a time
  (VmRSS), after the batch and its peak (VmHWM)). hnswlib: M 16, ef_construction 100, ef 128 (ann_recall.py's 1M choice); LanceDB:
  the store's defaults.

    python benchmarks/lance_store.py --embeddings /tmp/ray-scaling/db_embeddings.npy \
        --queries-dir /tmp/scaleout-10k/queries --synthetic 100000 300000 --out /tmp/lance-bench
    python benchmarks/lance_store.py --synthetic 1000000 --stores lancedb --out /tmp/lance-1m  # one store a run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ann_recall import synthetic  # noqa: E402
from common import machine, table, write_json  # noqa: E402

from fastret.engine.index import exact_search  # noqa: E402
from fastret.engine.lance_store import AnnParams, connect, write_table  # noqa: E402

QUERIES = 1000
STORES = ["hnswlib", "lancedb"]
PROBES = (40, 80)  # LanceDB's query-time partitions beyond AnnParams().nprobes
ONE_AT_A_TIME_BUDGET_S = 10.0


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(e)) / exact.shape[1] for f, e in zip(found, exact)]))


def exact_ids(db: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    return np.concatenate([exact_search(db, queries[i : i + 100], k)[0] for i in range(0, len(queries), 100)])


def lance_search(table, queries: np.ndarray, k: int, ann: AnnParams, *, batched: bool) -> np.ndarray:
    """Top-k ids with the store's query options (one query per call, or one call for all)."""
    def query(vectors):
        q = table.search(vectors).distance_type("cosine").limit(k)
        if ann.kind == "IVF_HNSW_SQ":
            q = q.nprobes(ann.nprobes).ef(ann.ef)
        else:
            q = q.nprobes(ann.nprobes)
            q = q.refine_factor(ann.refine_factor) if ann.refine_factor else q
        return q.select(["id", "_distance"]).to_arrow()

    out = np.full((len(queries), k), -1, np.int64)
    if batched:
        found = query(queries)
        rows, ids = found.column("query_index").to_numpy(), found.column("id").to_numpy()
        for r in range(len(queries)):
            mine = ids[rows == r][:k]
            out[r, : len(mine)] = mine
    else:
        for r, vector in enumerate(queries):
            ids = query(vector).column("id").to_numpy()[:k]
            out[r, : len(ids)] = ids
    return out


# --- part 1: parameters by recall on real embeddings -------------------------------------------


def query_embeddings(queries_dir: Path, cache: Path) -> np.ndarray:
    if cache.is_file():
        return np.load(cache)
    from fastret.engine.decode import list_images
    from fastret.engine.pipeline import embed_files
    from fastret.service.load import open_encoder

    encoder = open_encoder("efficientnet-lite2", "onnxruntime", precision="fp32", workload="throughput")
    vectors = embed_files(list_images(queries_dir), encoder).embeddings
    np.save(cache, vectors)
    return vectors


def sweep(db: np.ndarray, queries: np.ndarray, out: Path) -> list[dict]:
    from fastret.engine.index import Item

    exact = exact_ids(db, queries)
    uri = str(out / "sweep-lance")
    items = [Item(f"{i}", "x") for i in range(len(db))]
    rows = []
    builds = [AnnParams(), AnnParams(sub_vectors=db.shape[1] // 16), AnnParams(kind="IVF_HNSW_SQ")]
    for build in builds:
        started = time.perf_counter()
        write_table(uri, np.arange(len(db)), items, db, None, build)
        build_s = time.perf_counter() - started
        table = connect(uri).open_table("items")
        if build.kind == "IVF_HNSW_SQ":
            settings = [replace(build, ef=ef) for ef in (16, 32, 64, 128)]
        else:
            settings = [replace(build, nprobes=n, refine_factor=r) for n in (10, 20, 40) for r in (None, 10, 20)]
        for ann in settings:
            started = time.perf_counter()
            found = lance_search(table, queries, 10, ann, batched=True)
            rows.append({"kind": ann.kind, "sub_vectors": (ann.sub_vectors or db.shape[1] // 8) if ann.kind == "IVF_PQ" else None,
                         "nprobes": ann.nprobes if ann.kind == "IVF_PQ" else None,
                         "refine_factor": ann.refine_factor if ann.kind == "IVF_PQ" else None,
                         "ef": ann.ef if ann.kind == "IVF_HNSW_SQ" else None,
                         "recall@10": round(recall(found, exact), 4),
                         "q/s batch": round(len(queries) / (time.perf_counter() - started), 1),
                         "build_s": round(build_s, 1)})
            print(rows[-1], flush=True)
    shutil.rmtree(uri, ignore_errors=True)
    return rows


# --- part 2: hnswlib vs LanceDB in child processes ---------------------------------------------


def memory_mib() -> dict:
    status = Path("/proc/self/status").read_text()
    field = lambda name: round(int(status.split(f"{name}:")[1].split()[0]) / 1024, 1)  # noqa: E731
    return {"rss_mib": field("VmRSS"), "peak_rss_mib": field("VmHWM")}


def child(args: argparse.Namespace) -> None:
    """One side's build or query run; prints its JSON result."""
    work = Path(args.work)
    result: dict = {}
    if args.child == "build-hnswlib":
        from fastret.engine.index import HnswParams, build_hnsw

        db = np.load(work / "db.npy", mmap_mode="r")
        started = time.perf_counter()
        graph = build_hnsw(np.asarray(db), HnswParams(M=16, ef_construction=100))
        result["build_s"] = time.perf_counter() - started
        graph.save_index(str(work / "hnsw.bin"))
        result["disk_bytes"] = (work / "hnsw.bin").stat().st_size
    elif args.child == "build-lancedb":
        from fastret.engine.index import Item

        db = np.load(work / "db.npy", mmap_mode="r")
        items = [Item(f"{i}", "x") for i in range(len(db))]
        started = time.perf_counter()
        write_table(str(work / "lance"), np.arange(len(db)), items, db, None, AnnParams())
        result["build_s"] = time.perf_counter() - started
        result["disk_bytes"] = sum(p.stat().st_size for p in (work / "lance").rglob("*") if p.is_file())
    else:
        queries = np.load(work / "queries.npy")
        started = time.perf_counter()
        if args.child == "query-hnswlib":
            import hnswlib

            graph = hnswlib.Index(space="cosine", dim=queries.shape[1])
            graph.load_index(str(work / "hnsw.bin"))
            graph.set_ef(128)
            search = lambda q: graph.knn_query(q, k=10)[0]  # noqa: E731
        else:
            table = connect(str(work / "lance")).open_table("items")
            search = lambda q: lance_search(table, np.atleast_2d(q), 10, AnnParams(), batched=len(q) > 1)  # noqa: E731
        result["open_s"] = time.perf_counter() - started
        started, done = time.perf_counter(), 0
        while done < len(queries) and time.perf_counter() - started < ONE_AT_A_TIME_BUDGET_S:
            search(queries[done : done + 1])
            done += 1
        result["q/s one at a time"] = done / (time.perf_counter() - started)
        result["rss_serving_mib"] = memory_mib()["rss_mib"]  # open, and answering one query at a time
        started = time.perf_counter()
        found = search(queries)
        result["q/s batch"] = len(queries) / (time.perf_counter() - started)
        np.save(work / f"{args.child}-ids.npy", np.asarray(found, np.int64))
        result.update(memory_mib())
        if args.child == "query-lancedb":  # more partitions probed: recall against speed
            for probes in PROBES:
                started = time.perf_counter()
                found = lance_search(table, queries, 10, replace(AnnParams(), nprobes=probes), batched=True)
                result[f"q/s batch, {probes} probes"] = len(queries) / (time.perf_counter() - started)
                np.save(work / f"probes-{probes}-ids.npy", found)
    print(json.dumps(result))


def run_child(kind: str, work: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--work", str(work)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(count: int, out: Path, stores: list[str] = STORES) -> list[dict]:
    work = out / f"synthetic-{count}"
    work.mkdir(parents=True, exist_ok=True)
    vectors = synthetic(count + QUERIES, 512, 100, 16, seed=0)
    np.save(work / "db.npy", vectors[:count])
    np.save(work / "queries.npy", vectors[count:])
    exact = exact_ids(vectors[:count], vectors[count:])
    rows = []
    for store in stores:
        row = {"store": store, "vectors": count, **run_child(f"build-{store}", work), **run_child(f"query-{store}", work)}
        row["recall@10"] = round(recall(np.load(work / f"query-{store}-ids.npy"), exact), 4)
        for probes in PROBES if store == "lancedb" else ():
            row[f"recall@10, {probes} probes"] = round(recall(np.load(work / f"probes-{probes}-ids.npy"), exact), 4)
        rows.append(row)
        print(row, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", type=Path, default=None, help="database embeddings (.npy) for the sweep")
    parser.add_argument("--queries-dir", type=Path, default=Path("/tmp/scaleout-10k/queries"))
    parser.add_argument("--synthetic", type=int, nargs="*", default=[100_000, 300_000])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lance-bench"))
    parser.add_argument("--stores", nargs="+", choices=STORES, default=STORES, help="which stores to compare (default: both)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine()}
    if args.embeddings is not None:
        db = np.load(args.embeddings)
        queries = query_embeddings(args.queries_dir, args.out / "query_embeddings.npy")
        report["sweep_10k_augmented"] = sweep(db, queries, args.out)
        write_json(args.out / "lance_store.json", report)
    report["synthetic"] = [row for count in args.synthetic for row in compare(count, args.out, args.stores)]
    report["machine_after"] = machine()
    write_json(args.out / "lance_store.json", report)
    if report["synthetic"]:
        keys = ["store", "vectors", "build_s", "disk_bytes", "recall@10", "q/s one at a time", "q/s batch",
                "rss_serving_mib", "rss_mib", "peak_rss_mib"]
        print(table(keys, [[row.get(k) for k in keys] for row in report["synthetic"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
