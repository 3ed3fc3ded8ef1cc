"""Re-ranking and query expansion: quality (P@10, mAP) and added cost of each option and combos.

Embeds each set once with the bundled ONNX encoder (plain and horizontally flipped views,
cached as .npy under the output folder), then sweeps fastret.engine.rerank options on the
cached vectors: every figure of one row comes from the same embeddings.

Protocols (see ../shared/data/README.md):
  wang1k, animals10-mini   leave-one-out: each image queries all the others; the query's own
                           database entry is treated as absent (ranking, DBA, QE, k-reciprocal);
  wang1k-split             ids ending in 0 are queries (100), the other 900 the database:
                           PCA and DBA see the database only (no leave-one-out caveat at all);
  scaled                   augmented 10k database / 1k queries from benchmarks/make_scaled_set.py
                           (folders db/ and queries/), when present.

    python benchmarks/rerank_quality.py [--sets wang1k animals10-mini wang1k-split scaled]
"""

from __future__ import annotations

import os

# Query-time re-ranking does small matrix products: one BLAS thread is the fast and steady choice
# on this shared 2-core machine (a contended multi-thread OpenBLAS ran a 101x1280 Gram 30x slower).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fastret.engine.decode import list_images
from fastret.service.load import encoder_for_source
from fastret.engine.metrics import summarize
from fastret.engine.pipeline import decoded_batches
from fastret.engine.rerank import RerankOptions, prepare_database, rerank_search
from fastret.engine.tta import average_views, flip_horizontal
from fastret.export.models import bundled_source

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTRET_DATA", REPO.parent / "shared" / "data"))
SCALED = Path(os.environ.get("FASTRET_SCALED", "/tmp/fastret-scaled"))
KS = (1, 5, 10, 20)


def embed_folder(root: Path, cache: Path, name: str, log=print, flipped: bool = True) -> dict:
    """Plain (and flipped) embeddings of every image under root, cached as .npy (+ items json)."""
    files = {view: cache / f"{name}-{view}.npy" for view in ("plain", "flipped")[: 2 if flipped else 1]}
    items_file = cache / f"{name}-items.json"
    if items_file.is_file() and all(f.is_file() for f in files.values()):
        items = json.loads(items_file.read_text())
        return {"paths": items["paths"], "labels": np.array(items["labels"]), "embed_seconds": items["seconds"],
                **{view: np.load(f) for view, f in files.items()}}
    source = bundled_source()
    encoder = encoder_for_source(source, "onnxruntime", log=log)
    paths = list_images(root)
    log(f"embedding {len(paths)} images of {root} ({' + '.join(files)})")
    views: dict[str, list[np.ndarray]] = {view: [] for view in files}
    kept: list[Path] = []
    seconds = {view: 0.0 for view in files}
    for batch in decoded_batches(paths, encoder.info.preprocessing, batch_size=32, workers=2):
        for skip in batch.skipped:
            log(skip.line())
        if not len(batch.paths):
            continue
        for view in views:
            pixels = batch.pixels if view == "plain" else flip_horizontal(batch.pixels)
            started = time.perf_counter()
            views[view].append(encoder.encode(pixels))
            seconds[view] += time.perf_counter() - started
        kept.extend(batch.paths)
    cache.mkdir(parents=True, exist_ok=True)
    for view, parts in views.items():
        np.save(files[view], np.concatenate(parts))
    rel = [p.relative_to(root).as_posix() for p in kept]
    items_file.write_text(json.dumps({"paths": rel, "labels": [p.parent.name for p in kept], "seconds": seconds}))
    return embed_folder(root, cache, name, log, flipped)


def tta_database(data: dict, flip: bool) -> np.ndarray:
    return average_views(data["plain"], data["flipped"]) if flip else data["plain"]


def evaluate(
    db: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    options: RerankOptions,
    *,
    leave_one_out: bool,
) -> dict:
    """Quality over the full ranking, and the cost of one option set.

    Quality: every query ranks the whole database (leave-one-out: its own entry is absent).
    Cost: build = prepare_database (PCA fit, DBA); single = one query at a time, top 10, as
    `fastret search` runs it; batched = all queries in one call, top 10, as `fastret eval` does.
    Both are exact searches over the prepared vectors.
    """
    started = time.perf_counter()
    prepared = prepare_database(db, options)
    build_s = time.perf_counter() - started
    depth = len(db) - 1 if leave_one_out else len(db)
    excludes = [frozenset({q}) for q in range(len(queries))] if leave_one_out else None
    started = time.perf_counter()
    ranked = rerank_search(prepared, queries, depth + int(leave_one_out), options, excludes=excludes)[0][:, :depth]
    ranking_s = time.perf_counter() - started
    for vector in queries[:10]:  # warm-up, untimed
        rerank_search(prepared, vector, 10, options)
    started = time.perf_counter()
    for vector in queries:
        rerank_search(prepared, vector, 10, options)
    single_ms = 1000 * (time.perf_counter() - started) / len(queries)
    started = time.perf_counter()
    rerank_search(prepared, queries, 10, options)
    batched_ms = 1000 * (time.perf_counter() - started) / len(queries)
    summary = summarize(ranked, db_labels, query_labels, KS, leave_one_out=leave_one_out, full_ranking=ranked)
    return {"build_s": round(build_s, 4), "ms_per_query": round(single_ms, 3), "ms_per_query_batched":
            round(batched_ms, 3), "full_ranking_s": round(ranking_s, 3), **summary}


def option_grid(dim: int, count: int) -> list[tuple[str, RerankOptions, bool, bool]]:
    """(name, options, flip database, flip queries) rows: each option alone, then combinations."""
    pca_dims = [d for d in (128, 256, 512) if d < min(dim, count - 1)]
    pca = 256 if 256 in pca_dims else (pca_dims[-1] if pca_dims else None)
    plain = RerankOptions()
    rows: list[tuple[str, RerankOptions, bool, bool]] = [
        ("plain kNN", plain, False, False),
        ("flip-TTA queries", plain, False, True),
        ("flip-TTA db + queries", plain, True, True),
    ]
    rows += [(f"PCA {d} (power 0)", RerankOptions(pca_dim=d), False, False) for d in pca_dims]
    if pca:
        rows += [(f"PCA-whitening {pca} (power {p})", RerankOptions(pca_dim=pca, pca_power=p), False, False)
                 for p in (0.25, 0.5)]
    rows += [(f"aQE n={n}", RerankOptions(qe_n=n), False, False) for n in (2, 5, 10)]
    rows.append(("aQE n=5 alpha=3", RerankOptions(qe_n=5, qe_alpha=3.0), False, False))
    rows += [(f"DBA n={n}", RerankOptions(dba_n=n), False, False) for n in (2, 5, 10)]
    rows += [(f"k-reciprocal k1={k1} k2={k2} lam=0.3", RerankOptions(kreciprocal=True, k1=k1, k2=k2), False, False)
             for k1, k2 in ((20, 6), (10, 3))]
    combos = [
        ("DBA 2 + aQE 2", RerankOptions(dba_n=2, qe_n=2)),
        ("DBA 5 + aQE 5", RerankOptions(dba_n=5, qe_n=5)),
        ("DBA 10 + aQE 10", RerankOptions(dba_n=10, qe_n=10)),
        ("DBA 5 + aQE 5 + k-reciprocal", RerankOptions(dba_n=5, qe_n=5, kreciprocal=True)),
    ]
    if pca:
        combos += [
            (f"PCA {pca} + aQE 5", RerankOptions(pca_dim=pca, qe_n=5)),
            (f"PCA {pca} + DBA 5 + aQE 5", RerankOptions(pca_dim=pca, dba_n=5, qe_n=5)),
        ]
    rows += [(name, options, False, False) for name, options in combos]
    rows += [(f"flip-TTA + {name}", options, True, True) for name, options in combos[1:2] + combos[-1:]]
    return rows


def run_set(name: str, data: dict, split: str, log=print) -> list[dict]:
    labels = data["labels"]
    if split == "leave-one-out":
        query_rows = db_rows = np.arange(len(labels))
    elif split == "wang-split":  # ids ending in 0 are queries
        is_query = np.array([Path(p).stem.endswith("0") for p in data["paths"]])
        query_rows, db_rows = np.flatnonzero(is_query), np.flatnonzero(~is_query)
    else:  # "scaled": data holds db and queries stacked, with a marker
        query_rows, db_rows = np.flatnonzero(data["is_query"]), np.flatnonzero(~data["is_query"])
    results = []
    plain_dim = data["plain"].shape[1]
    for row_name, options, flip_db, flip_q in option_grid(plain_dim, len(db_rows)):
        if (flip_db or flip_q) and "flipped" not in data:
            continue
        db = tta_database(data, flip_db)[db_rows]
        queries = tta_database(data, flip_q)[query_rows]
        result = evaluate(
            db, labels[db_rows], queries, labels[query_rows], options, leave_one_out=split == "leave-one-out"
        )
        flip_ms = 1000 * data["embed_seconds"].get("flipped", 0.0) / len(labels)  # batched encoder s per image
        row = {"set": name, "protocol": split, "option": row_name, "flip_db": flip_db, "flip_queries": flip_q,
               "options": asdict(options), "extra_encode_ms_per_query": round(flip_ms, 2) if flip_q else 0.0,
               "extra_index_encode_s": round(flip_ms * len(db_rows) / 1000, 2) if flip_db else 0.0, **result}
        results.append(row)
        log(
            f"{name:16s} {row_name:42s} P@10 {result['overall']['P@10']:.3f}  mAP {result['overall']['mAP']:.3f}  "
            f"macro P@10 {result['macro']['P@10']:.3f}  {result['ms_per_query']:6.2f} ms/q "
            f"({result['ms_per_query_batched']:.2f} batched)  "
            f"build {result['build_s']:.3f} s"
        )
    return results


def load_set(name: str, cache: Path, log=print) -> tuple[dict, str] | None:
    if name in ("wang1k", "wang1k-split"):
        root = DATA / "wang1k"
        if not root.is_dir():
            log(f"skip {name}: {root} is absent")
            return None
        return embed_folder(root, cache, "wang1k", log), "leave-one-out" if name == "wang1k" else "wang-split"
    if name == "animals10-mini":
        root = DATA / "animals10-mini"
        if not root.is_dir():
            log(f"skip {name}: {root} is absent")
            return None
        return embed_folder(root, cache, "animals10-mini", log), "leave-one-out"
    if name == "scaled":
        if not (SCALED / "db").is_dir() or not (SCALED / "queries").is_dir():
            log(f"skip scaled: {SCALED}/db and {SCALED}/queries are absent (run benchmarks/make_scaled_set.py)")
            return None
        # plain view only: 11,000 more encoder passes for flips did not fit this shared machine
        db = embed_folder(SCALED / "db", cache, "scaled-db", log, flipped=False)
        queries = embed_folder(SCALED / "queries", cache, "scaled-queries", log, flipped=False)
        merged = {"plain": np.concatenate([db["plain"], queries["plain"]])}
        merged["labels"] = np.concatenate([db["labels"], queries["labels"]])
        merged["paths"] = db["paths"] + queries["paths"]
        merged["is_query"] = np.r_[np.zeros(len(db["labels"]), bool), np.ones(len(queries["labels"]), bool)]
        merged["embed_seconds"] = {view: db["embed_seconds"][view] + queries["embed_seconds"][view] for view in db["embed_seconds"]}
        return merged, "scaled"
    raise ValueError(f"unknown set {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["wang1k", "animals10-mini", "wang1k-split", "scaled"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    parser.add_argument("--embed-only", action="store_true", help="fill the embedding cache and stop")
    args = parser.parse_args(argv)
    cache = args.out / "rerank-cache"
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    for name in args.sets:
        loaded = load_set(name, cache, log)
        if loaded is None or args.embed_only:
            continue
        data, split = loaded
        results += run_set(name, data, split, log)
    if args.embed_only:
        return 0
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), no GPU",
        "command": "python benchmarks/rerank_quality.py " + " ".join(argv or sys.argv[1:]),
        "openblas_threads": os.environ["OPENBLAS_NUM_THREADS"],
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "rerank_quality.json"
    out_file.write_text(json.dumps(report, indent=2))
    print_table(results)
    log(f"wrote {out_file}")
    return 0


def print_table(results: list[dict]) -> None:
    print("| set | option | P@10 | mAP | macro P@10 | ms/query one at a time | ms/query batched | build s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        encode = " + 1 encoder pass" if row["flip_queries"] else ""
        print(
            f"| {row['set']} | {row['option']} | {row['overall']['P@10']:.3f} | {row['overall']['mAP']:.3f} | "
            f"{row['macro']['P@10']:.3f} | {row['ms_per_query']:.2f}{encode} | {row['ms_per_query_batched']:.2f} | "
            f"{row['build_s']:.2f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
