"""HNSW vs exact search: recall@10 and queries/s over ef and M, build time and memory.

Two databases:

* scaled: real fastret embeddings of the augmented 10k/1k set (benchmarks/make_scaled_set.py),
  read from --embeddings DIR (db_embeddings.npy, query_embeddings.npy: ta_speed.py's fastret side
  writes them) or computed with the bundled model and cached there;
* synthetic: N clustered unit vectors (default 1,000,000 x 512): cluster centres plus noise in a
  low-dimensional random subspace per point set (--intrinsic-dim), as image embeddings have a low
  intrinsic dimension; queries are drawn the same way.

Recall@10 = |HNSW top-10 ∩ exact top-10| / 10 averaged over the queries; exact = the engine's
brute-force search (numpy matrix product).

`--pipeline rerank` (or `both`) measures fastret's default ranking instead: the re-ranking state
fitted as `fastret index` fits it (PCA 256 + DBA 5 and its HNSW graph, automatic ef), the HNSW
re-ranked pipeline (project, graph search, alpha-QE 5, graph search) against the same pipeline
by brute force, at the automatic ef and over --ef. Queries/s one at a time (a loop of single-row calls,
time-boxed) and in one batch of all queries, both for exact and HNSW. Memory = growth of this
process's resident set while the graph is built, and the graph's own size (hnswlib's
index_file_size: vectors + links), which is what it holds in memory.

    python benchmarks/ann_recall.py --embeddings benchmarks/out/ta_speed/fastret --synthetic 1000000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fastret.engine.index import HnswParams, build_hnsw, exact_search, fit_rerank
from fastret.engine.rerank import RECOMMENDED_RERANK, graph_search, rerank_search

from common import OUT, TOP_K, machine, table, write_json

EXACT_CHUNK = 100  # queries per exact-search call in the batch runs (bounds the score matrix)


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic(count: int, dim: int, clusters: int, intrinsic: int, seed: int) -> np.ndarray:
    """Clustered unit vectors: centre + noise spanned by `intrinsic` random directions, built in blocks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    basis = rng.standard_normal((intrinsic, dim), dtype=np.float32) * (1.5 / np.sqrt(intrinsic))
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):
        stop = min(start + 100_000, count)
        block = centres[rng.integers(0, clusters, stop - start)]
        block += rng.standard_normal((stop - start, intrinsic), dtype=np.float32) @ basis
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def scaled_embeddings(directory: Path, db: Path, queries: Path) -> tuple[np.ndarray, np.ndarray]:
    """The scaled set's embeddings from the cache, computing them once with the bundled model."""
    cached = directory / "db_embeddings.npy", directory / "query_embeddings.npy"
    if not all(p.is_file() for p in cached):
        from tqdm import tqdm

        from fastret.engine.decode import list_images
        from fastret.service.load import open_encoder
        from fastret.engine.pipeline import embed_files

        encoder = open_encoder("efficientnet-lite2")
        directory.mkdir(parents=True, exist_ok=True)
        for folder, path in zip((db, queries), cached):
            images = list_images(folder)
            with tqdm(total=len(images), unit="img", file=sys.stderr) as bar:
                np.save(path, embed_files(images, encoder, on_progress=bar.update).embeddings)
    return np.load(cached[0]), np.load(cached[1])


def per_second(search, queries: np.ndarray, budget_s: float) -> tuple[float, int]:
    """Queries/s answering one query per call, for at most budget_s (at least 20 queries)."""
    started = time.perf_counter()
    done = 0
    for row in queries:
        search(row[None])
        done += 1
        if done >= 20 and time.perf_counter() - started > budget_s:
            break
    return done / (time.perf_counter() - started), done


def batch_per_second(search, queries: np.ndarray) -> float:
    started = time.perf_counter()
    search(queries)
    return len(queries) / (time.perf_counter() - started)


def exact_top(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [exact_search(db, queries[s : s + EXACT_CHUNK], TOP_K)[0] for s in range(0, len(queries), EXACT_CHUNK)]
    )


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / TOP_K for f, t in zip(found, truth)]))


def sweep(name: str, db: np.ndarray, queries: np.ndarray, ms: list[int], ef_construction: int, efs: list[int],
          budget_s: float) -> dict:
    print(f"[{name}] {len(db):,} x {db.shape[1]} database, {len(queries)} queries", flush=True)
    started = time.perf_counter()
    truth = exact_top(db, queries)  # the ground truth, timed: it is exact search in batches of 100
    exact = {"batch_qps": len(queries) / (time.perf_counter() - started)}
    exact["one_at_a_time_qps"] = per_second(lambda q: exact_search(db, q, TOP_K), queries, budget_s)[0]
    print(f"[{name}] exact: {exact['one_at_a_time_qps']:.1f} q/s one at a time, {exact['batch_qps']:.1f} q/s batched",
          flush=True)
    rows = []
    for m in ms:
        before = resident_mib()
        started = time.perf_counter()
        graph = build_hnsw(db, HnswParams(M=m, ef_construction=ef_construction))
        build_s = time.perf_counter() - started
        memory = resident_mib() - before
        print(f"[{name}] M={m} ef_construction={ef_construction}: built in {build_s:.1f} s, +{memory:.0f} MiB",
              flush=True)
        for ef in efs:
            graph.set_ef(max(ef, TOP_K))
            found, _ = graph.knn_query(queries, k=TOP_K)
            rows.append({
                "M": m, "ef_construction": ef_construction, "ef": ef, "build_s": round(build_s, 2),
                "rss_growth_mib": round(memory, 1), "index_mib": round(graph.index_file_size() / 2**20, 1),
                "recall@10": round(recall(found, truth), 4),
                "one_at_a_time_qps": round(per_second(lambda q: graph.knn_query(q, k=TOP_K), queries, budget_s)[0], 1),
                "batch_qps": round(batch_per_second(lambda q: graph.knn_query(q, k=TOP_K), queries), 1),
            })
            print(f"[{name}]   ef={ef}: recall@10 {rows[-1]['recall@10']}, {rows[-1]['one_at_a_time_qps']} q/s one "
                  f"at a time, {rows[-1]['batch_qps']} q/s batched", flush=True)
        del graph
    return {"database": len(db), "dim": int(db.shape[1]), "queries": len(queries),
            "exact": {k: round(v, 2) for k, v in exact.items()}, "hnsw": rows}


def rerank_sweep(name: str, db: np.ndarray, queries: np.ndarray, m: int, ef_construction: int, efs: list[int],
                 budget_s: float) -> dict:
    """The default (re-ranked) pipeline: fit its state, then HNSW vs exact re-ranked search."""
    options = RECOMMENDED_RERANK
    print(f"[{name} re-ranked] {len(db):,} x {db.shape[1]} database, {len(queries)} queries", flush=True)
    started = time.perf_counter()
    state = fit_rerank(db, np.arange(len(db)), options, HnswParams(M=m, ef_construction=ef_construction))
    fit_s = time.perf_counter() - started
    print(f"[{name} re-ranked] state fitted in {fit_s:.1f} s: {state.summary()}", flush=True)
    prepared = state.prepared()
    started = time.perf_counter()
    truth = np.concatenate([rerank_search(prepared, queries[s : s + EXACT_CHUNK], TOP_K, options)[0]
                            for s in range(0, len(queries), EXACT_CHUNK)])
    exact = {"batch_qps": len(queries) / (time.perf_counter() - started)}
    exact["one_at_a_time_qps"] = per_second(lambda q: rerank_search(prepared, q, TOP_K, options), queries, budget_s)[0]
    print(f"[{name} re-ranked] exact: {exact['one_at_a_time_qps']:.1f} q/s one at a time, {exact['batch_qps']:.1f} "
          "q/s batched", flush=True)
    rows = []
    for ef in [None, *efs]:  # None: the automatic ef
        search = lambda q: graph_search(state, q, TOP_K, options, ef=ef)  # noqa: E731
        rows.append({
            "M": m, "ef_construction": ef_construction, "ef": ef or state.ef, "automatic": ef is None,
            "recall@10": round(recall(search(queries)[0], truth), 4),
            "one_at_a_time_qps": round(per_second(search, queries, budget_s)[0], 1),
            "batch_qps": round(batch_per_second(search, queries), 1),
        })
        print(f"[{name} re-ranked]   ef={rows[-1]['ef']}{' (automatic)' if ef is None else ''}: recall@10 "
              f"{rows[-1]['recall@10']}, {rows[-1]['one_at_a_time_qps']} q/s one at a time", flush=True)
    return {"database": len(db), "dim": int(db.shape[1]), "queries": len(queries), "fit_s": round(fit_s, 1),
            "state": state.summary(), "exact": {k: round(v, 2) for k, v in exact.items()}, "hnsw": rows}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        for m in sorted({row["M"] for row in result["hnsw"]}):
            rows = [row for row in result["hnsw"] if row["M"] == m]
            ax.plot([r["one_at_a_time_qps"] for r in rows], [r["recall@10"] for r in rows], "o-",
                    label=f"HNSW M={m}, one at a time")
            ax.plot([r["batch_qps"] for r in rows], [r["recall@10"] for r in rows], "s--",
                    label=f"HNSW M={m}, batch of {result['queries']}")
        ax.plot([result["exact"]["one_at_a_time_qps"]], [1.0], "k^", label="exact, one at a time")
        ax.plot([result["exact"]["batch_qps"]], [1.0], "kv", label="exact, batched")
        ax.set_xscale("log")
        ax.set_xlabel("queries/s")
        ax.set_ylabel("recall@10 vs exact")
        ax.set_title(f"{name}: {result['database']:,} x {result['dim']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("HNSW (hnswlib) vs exact search, 2-core CPU dev machine, no GPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", type=Path, default=OUT / "ta_speed" / "fastret",
                        help="folder of the scaled set's cached embeddings (computed there if absent)")
    parser.add_argument("--db", type=Path, default=Path("/tmp/fastret-scaled/db"))
    parser.add_argument("--queries", type=Path, default=Path("/tmp/fastret-scaled/queries"))
    parser.add_argument("--skip-scaled", action="store_true")
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="synthetic database size (0: none)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--intrinsic-dim", type=int, default=32)
    parser.add_argument("--synthetic-queries", type=int, default=1000)
    parser.add_argument("--M", type=int, nargs="+", default=None, help="default: 8 16 32 (scaled), 16 (synthetic)")
    parser.add_argument("--ef-construction", type=int, default=None, help="default: 200 (scaled), 100 (synthetic)")
    parser.add_argument("--ef", type=int, nargs="+", default=[10, 16, 32, 64, 128, 256])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per one-at-a-time measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipeline", choices=("raw", "rerank", "both"), default="raw",
                        help="raw embeddings, fastret's default re-ranked pipeline, or both")
    parser.add_argument("--out", type=Path, default=OUT / "ann_recall")
    args = parser.parse_args(argv)

    results = {}
    if not args.skip_scaled:
        db, queries = scaled_embeddings(args.embeddings, args.db, args.queries)
        defaults = HnswParams()
        if args.pipeline != "rerank":
            results["scaled (augmented, real embeddings)"] = sweep(
                "scaled", db, queries, args.M or [8, defaults.M, 32], args.ef_construction or defaults.ef_construction,
                sorted(set(args.ef) | {defaults.ef_search}), args.budget,
            )
        if args.pipeline != "raw":
            results["scaled, re-ranked"] = rerank_sweep(
                "scaled", db, queries, (args.M or [defaults.M])[0], args.ef_construction or defaults.ef_construction,
                args.ef, args.budget)
    if args.synthetic:
        started = time.perf_counter()
        data = synthetic(args.synthetic + args.synthetic_queries, args.dim, args.clusters, args.intrinsic_dim, args.seed)
        print(f"[synthetic] generated in {time.perf_counter() - started:.1f} s", flush=True)
        db, queries = data[: args.synthetic], data[args.synthetic :]
        if args.pipeline != "rerank":
            results[f"synthetic {args.synthetic:,}"] = sweep(
                "synthetic", db, queries, args.M or [16], args.ef_construction or 100, args.ef, args.budget
            )
        if args.pipeline != "raw":
            results[f"synthetic {args.synthetic:,}, re-ranked"] = rerank_sweep(
                "synthetic", db, queries, (args.M or [16])[0], args.ef_construction or 100, args.ef, args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    parameters = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    write_json(args.out / "ann_recall.json",
               {"command": " ".join(sys.argv), "machine": machine(), "parameters": parameters, "results": results})
    raw = {name: result for name, result in results.items() if "re-ranked" not in name}
    if raw:
        plot(raw, args.out / "ann_recall.png")
    for name, result in results.items():
        print(f"\n{name}: exact {result['exact']['one_at_a_time_qps']} q/s one at a time, "
              f"{result['exact']['batch_qps']} q/s batched")
        print(table(["M/efC/ef", "recall@10", "q/s (1)", "q/s (batch)", "x exact (1)", "build s", "index MiB"],
                    [[f"{r['M']}/{r['ef_construction']}/{r['ef']}", r["recall@10"], r["one_at_a_time_qps"], r["batch_qps"],
                      round(r["one_at_a_time_qps"] / result["exact"]["one_at_a_time_qps"], 1), r.get("build_s", result.get("fit_s")),
                      r.get("index_mib")]
                     for r in result["hnsw"]]))
    print(f"-> {args.out / 'ann_recall.json'}, {args.out / 'ann_recall.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
