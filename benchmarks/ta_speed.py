"""The course task, timed as a grader would: PyTorch baseline vs fastret, in one invocation.

Each side runs in its own process (so peak memory is its own) over the same files, after the
files have been read once so both find them in the page cache:

* baseline: benchmarks/baseline.py (PyTorch eager fp32, PIL, one query at a time, exact search);
* fastret: open_encoder (the `auto` runtime: OpenVINO on CPUs; the export is made before timing
  starts, it is a one-off artefact) + build_index (pipelined decode, batched encode, HNSW build) +
  the re-ranking state `fastret index` fits (PCA, DBA, their HNSW graph; counted in index_build) +
  batched query embedding + the default search, re-ranked through that graph (`--no-rerank`: one
  batched HNSW search over the raw embeddings, the previous default).

Both write each query's top-10 list to a file and compute P@10 and R@10 (label = folder). Ratios
are baseline / fastret, measured in the same run on the same machine.

    python benchmarks/ta_speed.py --db /tmp/fastret-scaled/db --queries /tmp/fastret-scaled/queries
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fastret.engine.decode import list_images
from fastret.engine.encoders import describe_runtime
from fastret.service.load import open_encoder
from fastret.engine.pipeline import DEFAULT_BATCH_SIZE, embed_files
from fastret.engine.index import fit_rerank
from fastret.engine.rerank import RECOMMENDED_RERANK, graph_search
from fastret.engine.retrieval import build_index

from clip_random import model_argument, model_label
from common import OUT, TOP_K, machine, peak_rss_mib, score_top_k, table, task_dirs, write_json, write_results

HERE = Path(__file__).resolve().parent
SIDES = ("fastret", "baseline")
STAGES = ("model_load", "db_embed", "index_build", "queries", "write", "total")


def run_fastret(db: Path, queries: Path, model: str, backend: str, out: Path, rerank: bool = True) -> dict:
    seconds: dict[str, float] = {}
    started = total_started = time.perf_counter()
    encoder = open_encoder(model_argument(model), backend, workload="throughput", log=lambda _: None)
    seconds["model_load"] = _lap(started)

    index, embedded = build_index(db, encoder)
    seconds["db_embed"] = embedded.stage_seconds["total"]
    seconds["index_build"] = embedded.stage_seconds["hnsw_build"]
    state = None
    if rerank:
        started = time.perf_counter()
        state = fit_rerank(index.embeddings, index.ids, RECOMMENDED_RERANK, index.hnsw_params)
        seconds["rerank_fit"] = _lap(started)
        seconds["index_build"] = round(seconds["index_build"] + seconds["rerank_fit"], 3)

    started = time.perf_counter()
    queried = embed_files(list_images(queries), encoder)
    seconds["query_embed"] = _lap(started)
    started = time.perf_counter()
    if state is not None:
        ids, scores = graph_search(state, queried.embeddings, TOP_K, RECOMMENDED_RERANK)
    else:
        ids, scores = index.search(queried.embeddings, TOP_K)
    seconds["search"] = _lap(started)
    seconds["queries"] = round(seconds["query_embed"] + seconds["search"], 3)

    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "db_embeddings.npy", index.embeddings)  # reused by ann_recall.py
    np.save(out / "query_embeddings.npy", queried.embeddings)
    started = time.perf_counter()
    db_paths = [Path(index.root) / item.path for item in index.items]
    write_results(out / "results", queries, queried.paths, db, db_paths, ids, scores)
    seconds["write"] = _lap(started)
    seconds["total"] = _lap(total_started)
    return {
        "side": f"fastret ({describe_runtime(encoder)}, pipelined decode, batch {DEFAULT_BATCH_SIZE}, batched queries, HNSW "
        f"M={index.hnsw_params.M} ef={state.ef if state else index.hnsw_params.ef_search}"
        f"{', re-ranked: PCA %d + DBA 5 + QE 5' % state.base.shape[1] if state else ''})",
        "rerank": state.summary() if state else None,
        "model": model_label(model),
        "db_images": len(index),
        "query_images": len(queried.paths),
        "seconds": seconds,
        "db_images_per_s": round(len(index) / seconds["db_embed"], 2),
        "query_ms": round(1000 * seconds["queries"] / len(queried.paths), 2),
        "peak_rss_mib": peak_rss_mib(),
        **score_top_k(ids, db_paths, queried.paths),
        "machine": machine(),
    }


def run_side(side: str, db: Path, queries: Path, model: str, backend: str, out: Path, rerank: bool = True) -> dict:
    """One side in a fresh process; its result.json is read back."""
    if side == "baseline":
        command = [sys.executable, str(HERE / "baseline.py"), "--db", str(db), "--queries", str(queries)]
    else:
        command = [sys.executable, str(HERE / "ta_speed.py"), "--side", "fastret", "--db", str(db),
                   "--queries", str(queries), "--backend", backend, *(["--no-rerank"] if not rerank else [])]
    command += ["--model", model, "--out", str(out / side)]
    subprocess.run(command, check=True)
    return json.loads((out / side / "result.json").read_text())


def warm_page_cache(*folders: Path) -> None:
    for folder in folders:
        for path in list_images(folder):
            path.read_bytes()


def report(results: dict[str, dict]) -> tuple[str, dict]:
    base, fast = results["baseline"], results["fastret"]
    ratios = {stage: _ratio(base["seconds"][stage], fast["seconds"][stage]) for stage in STAGES}
    rows = [[f"{stage} (s)", base["seconds"][stage], fast["seconds"][stage], ratios[stage]] for stage in STAGES]
    rows += [
        ["database images/s", base["db_images_per_s"], fast["db_images_per_s"],
         _ratio(fast["db_images_per_s"], base["db_images_per_s"])],
        ["ms per query", base["query_ms"], fast["query_ms"], _ratio(base["query_ms"], fast["query_ms"])],
        ["peak RSS (MiB)", base["peak_rss_mib"], fast["peak_rss_mib"], _ratio(base["peak_rss_mib"], fast["peak_rss_mib"])],
        [f"P@{TOP_K}", base[f"P@{TOP_K}"], fast[f"P@{TOP_K}"], None],
        [f"R@{TOP_K}", base[f"R@{TOP_K}"], fast[f"R@{TOP_K}"], None],
    ]
    return table(["", "baseline", "fastret", "speed-up"], rows), ratios


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 2) if numerator and denominator else None


def _lap(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, required=True, help="database folder (label = class folder)")
    parser.add_argument("--queries", type=Path, required=True, help="query folder")
    parser.add_argument("--limit", type=int, default=None, help="use N database and N // 10 query images")
    parser.add_argument("--model", default="efficientnet-lite2", help="efficientnet-lite2 or clip-random")
    parser.add_argument("--backend", default="auto", help="fastret's runtime (default: auto)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--side", choices=["fastret"], help=argparse.SUPPRESS)  # internal: one side, in-process
    parser.add_argument("--out", type=Path, default=OUT / "ta_speed")
    parser.add_argument("--no-rerank", action="store_true", help="fastret's plain ranking (the default before re-ranking)")
    args = parser.parse_args(argv)

    if args.side == "fastret":
        result = run_fastret(args.db, args.queries, args.model, args.backend, args.out, rerank=not args.no_rerank)
        write_json(args.out / "result.json", result)
        return 0

    db, queries = task_dirs(args.db, args.queries, args.limit, args.out)
    print(f"task: {len(list_images(db))} database and {len(list_images(queries))} query images from {args.db}, "
          f"{args.queries}; model {model_label(args.model)}", flush=True)
    # One-off artefacts before timing: the export, and the INT8 model calibrated on the database.
    started = time.perf_counter()
    open_encoder(model_argument(args.model), args.backend, image_dir=db, workload="throughput", log=print)
    artefacts_s = time.perf_counter() - started
    print(f"artefacts ready in {artefacts_s:.1f} s (one-off; cached for later runs)", flush=True)
    warm_page_cache(db, queries)
    results = {}
    for side in args.sides:  # fastret first: its embeddings are cached for ann_recall.py
        print(f"running {side} ...", flush=True)
        results[side] = run_side(side, db, queries, args.model, args.backend, args.out, rerank=not args.no_rerank)
        print(f"{side}: total {results[side]['seconds']['total']} s, P@{TOP_K} {results[side][f'P@{TOP_K}']}", flush=True)
    summary = {"command": " ".join(sys.argv), "limit": args.limit, "model": model_label(args.model),
               "artefacts_s": round(artefacts_s, 1),
               "machine": machine(), "results": results}
    if set(results) == set(SIDES):
        text, summary["speedup"] = report(results)
        print(text)
    write_json(args.out / "ta_speed.json", summary)
    print(f"-> {args.out / 'ta_speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
