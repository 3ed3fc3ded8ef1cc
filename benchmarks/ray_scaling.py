"""Images/s of the Ray engine (1 and 2 encoder actors) against the local pipeline, and Ray's overhead.

On the augmented 10k set (benchmarks/make_scaled_set.py), one encoder artefact (made once by the
driver, as `fastret index --engine ray` does): the local pipeline (`embed_files`, the encoder's own
threads), then the Ray job with 1 actor x 1 CPU, 2 actors x 1 CPU and 1 actor x 2 CPUs on a local
Ray cluster of --cpus CPUs. Overheads: starting the local cluster, shipping the artefact into the
object store, a run over --probe images (actor start-up plus the pipeline's fixed cost), and the
round trip of one result batch through the object store (serialisation). The local run's
embeddings go to OUT/db_embeddings.npy with its paths (ANN measurements reuse them).

    python benchmarks/make_scaled_set.py --src ../shared/data/wang1k --out /tmp/scaleout-10k
    python benchmarks/ray_scaling.py --db /tmp/scaleout-10k/db --out /tmp/ray-scaling
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, spread, table, write_json  # noqa: E402

from fastret.engine.decode import list_images  # noqa: E402
from fastret.engine.pipeline import embed_files  # noqa: E402
from fastret.service.load import open_encoder  # noqa: E402
from fastret.service.ray_job import PATHS_PER_TASK, RayOptions, embed_files_ray  # noqa: E402


def timed_local(paths, encoder) -> tuple[dict, np.ndarray, list]:
    result = embed_files(paths, encoder)
    seconds = result.stage_seconds["total"]
    return {"run": "local pipeline", "seconds": seconds, "images_per_s": len(result.paths) / seconds}, result.embeddings, result.paths


def timed_ray(paths, recipe, actors: int, cpus: int) -> tuple[dict, np.ndarray]:
    result = embed_files_ray(paths, recipe, RayOptions(actors=actors, cpus_per_actor=cpus))
    seconds = result.stage_seconds["total"]
    row = {"run": f"ray {actors} actor(s) x {cpus} CPU", "seconds": seconds, "images_per_s": len(result.paths) / seconds,
           **{f"{k}_s": v for k, v in result.stage_seconds.items() if k != "total"}}
    return row, result.embeddings


def result_round_trip(dim: int, repeats: int = 20) -> float:
    """Seconds to put and get one result batch (PATHS_PER_TASK embeddings) through the object store."""
    import ray

    batch = {"order": np.arange(PATHS_PER_TASK), "embedding": np.ones((PATHS_PER_TASK, dim), np.float32)}
    started = time.perf_counter()
    for _ in range(repeats):
        ray.get(ray.put(batch))
    return (time.perf_counter() - started) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("/tmp/scaleout-10k/db"))
    parser.add_argument("--limit", type=int, default=None, help="only N images spread over the classes")
    parser.add_argument("--model", default="efficientnet-lite2")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--probe", type=int, default=16, help="images of the fixed-cost run")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ray-scaling"))
    args = parser.parse_args(argv)
    import ray

    paths = spread(list_images(args.db), args.limit)
    encoder = open_encoder(args.model, args.backend, precision=args.precision, workload="throughput")
    local, reference, kept = timed_local(paths, encoder)
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "db_embeddings.npy", reference)
    (args.out / "db_paths.txt").write_text("\n".join(str(p) for p in kept) + "\n")
    rows = [local]
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    overhead = {"ray_init_s": round(time.perf_counter() - started, 3)}
    try:
        probe, _ = timed_ray(paths[: args.probe], encoder.recipe, 2, 1)
        overhead["fixed_cost_run_s"] = round(probe["seconds"], 3)
        overhead["result_batch_round_trip_ms"] = round(1000 * result_round_trip(encoder.info.dim), 3)
        for actors, cpus in ((1, 1), (2, 1), (1, 2)):
            row, embeddings = timed_ray(paths, encoder.recipe, actors, cpus)
            row["max_abs_diff_vs_local"] = float(np.abs(embeddings - reference).max())
            rows.append(row)
    finally:
        ray.shutdown()
    report = {
        "what": "augmented images (make_scaled_set.py), embedding only (no HNSW build)",
        "images": len(paths),
        "runtime": f"{encoder.backend} ({encoder.precision})",
        "machine": machine(),
        "overhead": overhead,
        "runs": rows,
    }
    write_json(args.out / "ray_scaling.json", report)
    print(table(["run", "seconds", "images/s"], [[r["run"], r["seconds"], r["images_per_s"]] for r in rows]))
    print(overhead, report["machine"]["load_average_1m_5m_15m"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
