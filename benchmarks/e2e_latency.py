"""Warm single-query latency (file -> ranked list) and database throughput, per backend vs the baseline.

For each runtime (fastret on openvino, onnxruntime and torch, each at its automatic precision,
and the PyTorch baseline of benchmarks/baseline.py), on the same files:

* database throughput: images/s embedding --db (fastret: build_index, i.e. pipelined decode +
  batched encode + HNSW build; baseline: host float preprocessing, batches of 32);
* single-query latency, warm: read + decode + preprocess, encode, search (fastret: HNSW top-10 via
  rank_hits; baseline: torch matrix product + topk), each query timed on its own; p50/p95/p99 of
  the total and the median of each stage.

Each runtime lives in its own process (so torch's OpenMP threads never share a process with
another runtime), and the queries go to the processes in turn, a block of --block queries at a
time, each block after one untimed warm-up query. This dev machine's speed drops by ~1.6x for
seconds at a time (its host is shared): measured one side after the other, such a phase lands on
one side only and moves the ratio. Interleaved, both sides see the same phases; the speed-up is
the median over blocks of the baseline's block p50 over the runtime's block p50.

    python benchmarks/e2e_latency.py --db ../shared/data/wang1k --queries /tmp/fastret-scaled/queries
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

from fastret.engine.decode import list_images

from clip_random import model_argument, model_label
from common import OUT, TOP_K, limited_view, machine, spread, table, write_json

BACKENDS = ("openvino", "onnxruntime", "torch")
BASELINE = "baseline"


def percentiles(samples_ms: list[float]) -> dict:
    values = np.asarray(samples_ms)
    return {f"p{q}": round(float(np.percentile(values, q)), 2) for q in (50, 95, 99)}


def fastret_answerer(backend: str, model: str, db: Path):
    """(description, database images/s, answer(path) -> {stage: seconds}) as the CLI runs fastret:
    `fastret index` opens the runtime for throughput, `fastret search` for latency."""
    from fastret.engine.decode import load_pixels
    from fastret.engine.encoders import describe_runtime
    from fastret.service.load import open_encoder
    from fastret.engine.retrieval import build_index, rank_hits

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

    return f"fastret {describe_runtime(encoder)}", embedded.images_per_second, answer


def baseline_answerer(model: str, db: Path):
    import torch

    from baseline import Baseline, reference_tensor

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

    return "PyTorch baseline", throughput, answer


def side_process(connection, side: str, model: str, db: str) -> None:
    """One runtime in its own process: build its database, then time the blocks of queries it is sent."""
    from fastret.service.load import BackendUnavailable

    try:
        if side == BASELINE:
            runtime, throughput, answer = baseline_answerer(model, Path(db))
        else:
            runtime, throughput, answer = fastret_answerer(side, model, Path(db))
    except BackendUnavailable as exc:
        connection.send({"unavailable": str(exc)})
        return
    connection.send({"runtime": runtime, "db_images_per_s": round(throughput, 2)})
    while (block := connection.recv()) is not None:
        answer(block[0])  # warm-up: the process has been idle while the others ran
        timings = []
        for path in block:
            started = time.perf_counter()
            stages = answer(path)
            timings.append({"total": time.perf_counter() - started, **stages})
        connection.send(timings)


def receive(connection, side: str):
    """The side's next message; its process's error (printed above by that process) ends the run."""
    try:
        return connection.recv()
    except EOFError:
        raise SystemExit(f"e2e_latency: the {side} process stopped (its error is above)") from None


def start_sides(sides: list[str], model: str, db: Path) -> dict:
    """Start each side's process in turn (database builds never overlap); the available ones."""
    context = multiprocessing.get_context("spawn")
    running = {}
    for side in sides:
        ours, theirs = context.Pipe()
        process = context.Process(target=side_process, args=(theirs, side, model, str(db)), daemon=True)
        process.start()
        theirs.close()  # the child holds its end: if it dies, our recv ends instead of waiting forever
        hello = receive(ours, side)
        if "unavailable" in hello:
            print(f"{side}: unavailable ({hello['unavailable']})")
            process.join()
            continue
        print(f"{hello['runtime']}: database {hello['db_images_per_s']} images/s", flush=True)
        running[side] = (process, ours, hello)
    return running


def turn_order(sides: list[str], block_number: int) -> list[str]:
    """Who times block `block_number`, in order: the first side rotates, so no side is always first
    after the others' turns."""
    shift = block_number % len(sides)
    return sides[shift:] + sides[:shift]


def measure(sides: list[str], model: str, db: Path, queries: list[Path], block: int) -> tuple[list[dict], list[dict]]:
    """Per side: its row (all its timed queries); and per block: each side's p50 in ms."""
    running = start_sides(sides, model, db)
    timings: dict[str, list[dict]] = {side: [] for side in running}
    blocks = []
    for number, first in enumerate(range(0, len(queries), block)):
        paths = queries[first : first + block]
        block_p50 = {}
        for side in turn_order(list(running), number):
            _, connection, _ = running[side]
            connection.send(paths)
            answers = receive(connection, side)
            timings[side].extend(answers)
            block_p50[side] = round(1000 * float(np.median([a["total"] for a in answers])), 2)
        blocks.append(block_p50)
    for process, connection, _ in running.values():
        connection.send(None)
        process.join()
    rows = []
    for side, (_, _, hello) in running.items():
        stages = {stage: [1000 * t[stage] for t in timings[side]] for stage in timings[side][0]}
        rows.append({"side": side, "runtime": hello["runtime"], "db_images_per_s": hello["db_images_per_s"],
                     "queries": len(timings[side]), "total_ms": percentiles(stages.pop("total")),
                     "stage_median_ms": {stage: round(float(np.median(v)), 2) for stage, v in stages.items()}})
    return rows, blocks


def add_speed_ups(rows: list[dict], blocks: list[dict]) -> None:
    """Each row's p50 speed-up over the baseline: median over blocks, and the spread of blocks."""
    for row in rows:
        ratios = [b[BASELINE] / b[row["side"]] for b in blocks]
        row["p50_speed_up"] = {"median_of_blocks": round(float(np.median(ratios)), 2),
                               "min_block": round(min(ratios), 2), "max_block": round(max(ratios), 2)}


def print_table(rows: list[dict]) -> None:
    print(table(
        ["runtime", "db img/s", "p50 ms", "p95 ms", "p99 ms", "decode ms", "encode ms", "search ms",
         "p50 speed-up (blocks: median, range)"],
        [[r["runtime"], r["db_images_per_s"], r["total_ms"]["p50"], r["total_ms"]["p95"], r["total_ms"]["p99"],
          r["stage_median_ms"]["read_decode_preprocess"], r["stage_median_ms"]["encode"], r["stage_median_ms"]["search"],
          f"{r['p50_speed_up']['median_of_blocks']} ({r['p50_speed_up']['min_block']}-{r['p50_speed_up']['max_block']})"]
         for r in rows],
    ))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=Path("../shared/data/wang1k"))
    parser.add_argument("--db-limit", type=int, default=300, help="database images embedded (spread over classes)")
    parser.add_argument("--queries", type=Path, default=Path("/tmp/fastret-scaled/queries"))
    parser.add_argument("--n-queries", type=int, default=200)
    parser.add_argument("--block", type=int, default=10, help="queries per side before the next side's turn")
    parser.add_argument("--model", default="efficientnet-lite2", help="efficientnet-lite2 or clip-random")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--out", type=Path, default=OUT / "e2e_latency")
    args = parser.parse_args(argv)

    db = limited_view(args.db, args.db_limit, args.out / f"db-{args.db_limit}")
    queries = spread(list_images(args.queries), args.n_queries)
    print(f"{len(list_images(db))} database images from {args.db}, {len(queries)} queries from {args.queries} "
          f"in blocks of {args.block}, model {model_label(args.model)}", flush=True)
    rows, blocks = measure([*args.backends, BASELINE], args.model, db, queries, args.block)
    add_speed_ups(rows, blocks)
    print_table(rows)
    write_json(args.out / "e2e_latency.json", {"command": " ".join(sys.argv), "model": model_label(args.model),
                                               "machine": machine(), "db": str(args.db), "db_images": args.db_limit,
                                               "block": args.block, "results": rows, "block_p50_ms": blocks})
    print(f"-> {args.out / 'e2e_latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
