"""The speed/quality frontier of the CPU models: EfficientNet-Lite0/1/2 (and other input sides) x
runtime x precision.

For each (model, runtime, precision): database images/s (the indexing pipeline in this process:
decode workers + encoder, as `fastret index` runs it), warm query ms (one query file through the
search service: decode, embed, search), cold search s (median of whole `fastret search` processes,
run in turn over all configurations, A B C A B C, so a change of machine load hits them alike),
and P@10 / mAP on wang1k and animals10-mini (leave-one-out) and the augmented set (`--scaled` DB and
`--scaled-queries` QUERIES from benchmarks/make_scaled_set.py: augmented copies of held-out photos
against augmented copies of the others; augmented data, not a benchmark of real photos). INT8 models
are calibrated on --wang1k.

    python benchmarks/model_frontier.py --wang1k ../shared/data/wang1k --animals ../shared/data/animals10-mini \
        --scaled /tmp/scaled/db --scaled-queries /tmp/scaled/queries
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import OUT, leave_one_out_quality, limited_view, machine, query_quality, table, timed_process, write_json  # noqa: E402

from fastret.engine.decode import list_images  # noqa: E402
from fastret.engine.evaluation import folder_labels  # noqa: E402
from fastret.engine.retrieval import build_index  # noqa: E402
from fastret.service.load import encoder_for_index, open_encoder  # noqa: E402
from fastret.service.search import Retriever, SearchOptions  # noqa: E402

MODELS = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "efficientnet-lite0@192",
          "efficientnet-lite2@224"]
RUNTIMES = ["onnxruntime:fp32", "openvino:fp32", "openvino:int8"]


def quality(encoder, folder: Path) -> tuple[dict, float, object]:
    """Leave-one-out quality of a folder embedded by `encoder`, the pipeline's images/s, the index."""
    index, result = build_index(folder, encoder)
    labels = folder_labels([item.path for item in index.items])
    return leave_one_out_quality(np.asarray(index.embeddings), labels), result.images_per_second, index


def scaled_quality(encoder, db: Path, queries: Path) -> tuple[dict, float]:
    """Quality of the query folder against the database folder, and the database's images/s."""
    index, result = build_index(db, encoder)
    asked, _ = build_index(queries, encoder)
    found = query_quality(np.asarray(index.embeddings), folder_labels([item.path for item in index.items]),
                          np.asarray(asked.embeddings), folder_labels([item.path for item in asked.items]))
    return found, result.images_per_second


def warm_query_ms(index, queries: list[Path], repeats: int) -> float:
    """Median ms of one query file through the search service (the index's own latency encoder)."""
    retriever = Retriever(index, encoder_for_index(index))
    options = SearchOptions()
    for path in queries[:3]:
        retriever.search_file(path, options)
    times = []
    for n in range(repeats):
        started = time.perf_counter()
        retriever.search_file(queries[n % len(queries)], options)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wang1k", type=Path, required=True)
    parser.add_argument("--animals", type=Path, required=True)
    parser.add_argument("--scaled", type=Path, help="the augmented database folder (benchmarks/make_scaled_set.py)")
    parser.add_argument("--scaled-limit", type=int, default=None, help="use N images spread over --scaled's classes")
    parser.add_argument("--scaled-queries", type=Path, help="the augmented query folder (held-out photos)")
    parser.add_argument("--scaled-runtimes", nargs="+", default=["openvino:fp32", "openvino:int8"],
                        help="runtimes that embed --scaled (fp32 quality does not depend on the runtime)")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--runtimes", nargs="+", default=RUNTIMES, help="BACKEND:PRECISION")
    parser.add_argument("--query-repeats", type=int, default=20)
    parser.add_argument("--cold-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT / "model_frontier.json")
    args = parser.parse_args(argv)

    load_at_start = [round(v, 2) for v in os.getloadavg()]
    scratch = Path(tempfile.mkdtemp(prefix="fastret-frontier-"))
    queries = list_images(args.wang1k)[::97]
    if (args.scaled is None) != (args.scaled_queries is None):
        parser.error("--scaled and --scaled-queries go together")
    if args.scaled is not None and args.scaled_limit is not None:
        args.scaled = limited_view(args.scaled, args.scaled_limit, scratch / "scaled")
    rows: list[dict] = []
    for model in args.models:
        for runtime in args.runtimes:
            backend, precision = runtime.split(":")
            encoder = open_encoder(model, backend, image_dir=args.wang1k, precision=precision, workload="throughput",
                                   log=lambda line: print(f"  {line}", file=sys.stderr))
            row = {"model": model, "backend": encoder.backend, "precision": encoder.precision}
            print(f"{model} on {backend} ({encoder.precision})", file=sys.stderr, flush=True)
            row["wang1k"], row["db_images_per_s"], index = quality(encoder, args.wang1k)
            row["animals10"], _, _ = quality(encoder, args.animals)
            if args.scaled is not None and runtime in args.scaled_runtimes:
                row["scaled"], row["scaled_images_per_s"] = scaled_quality(encoder, args.scaled, args.scaled_queries)
            index_dir = scratch / f"index-{len(rows)}"
            index.save(index_dir)
            row["index_dir"] = str(index_dir)
            row["warm_query_ms"] = warm_query_ms(index, queries, args.query_repeats)
            rows.append(row)
            del encoder
    fastret_bin = str(Path(sys.executable).with_name("fastret"))
    colds: list[list[float]] = [[] for _ in rows]
    for _ in range(args.cold_repeats):  # in turn over all configurations
        for row, walls in zip(rows, colds):
            walls.append(timed_process([fastret_bin, "search", str(queries[0]), "--index", row["index_dir"]])[0])
    for row, walls in zip(rows, colds):
        row["cold_search_s"] = statistics.median(walls)
        row["cold_search_runs"] = [round(w, 3) for w in walls]

    def cell(row: dict, data: str, name: str):
        return (row.get(data) or {}).get(name)

    header = ["model", "runtime", "db img/s", "warm q ms", "cold s", "wang P@10", "wang mAP", "anim P@10",
              "anim mAP", "scaled P@10", "scaled mAP", "scaled img/s"]
    lines = [[r["model"], f"{r['backend']} {r['precision']}", r["db_images_per_s"], r["warm_query_ms"],
              r["cold_search_s"], cell(r, "wang1k", "P@10"), cell(r, "wang1k", "mAP"), cell(r, "animals10", "P@10"),
              cell(r, "animals10", "mAP"), cell(r, "scaled", "P@10"), cell(r, "scaled", "mAP"),
              r.get("scaled_images_per_s")] for r in rows]
    print(table(header, lines))
    write_json(args.out, {"machine": machine(), "load_average_at_start": load_at_start, "rows": rows,
                          "scaled": str(args.scaled), "scaled_limit": args.scaled_limit,
                          "scaled_queries": str(args.scaled_queries)})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
