"""How far each indexing stage is from its floor on this CPU, per model: core-milliseconds per image.

- decode: one thread decoding the folder's files to the model's crops (JPEG draft mode on, as
  `fastret index` runs), process CPU time per image;
- encode: the index job's encoder (OpenVINO, the precision asked for) on one thread, batches of 4,
  process CPU time per image; its floor: the model's operations at the measured peak of a large
  INT8 (or fp32) matrix product on one core;
- the encoder's time by layer kind (OpenVINO's per-layer counters: shares only, the counters slow it);
- the ceiling this gives on all cores, cores x 1000 / (decode + encode) images/s, and, with
  --index-runs N, the median whole-process `fastret index` images/s of the folder (each run a fresh
  index), so the table says how much of the ceiling the pipeline reaches.

CPU time is much less sensitive than wall time to other work on the machine; the wall figures are not.

    python benchmarks/stage_floor.py --images /tmp/scaled/db --models efficientnet-lite2 efficientnet-lite0
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import OUT, machine, spread, table, timed_process, write_json  # noqa: E402
from encoder_speed import measured_peaks, model_flops  # noqa: E402

from fastret.engine.decode import list_images, load_pixels  # noqa: E402
from fastret.export.models import resolve_model  # noqa: E402
from fastret.service.load import open_encoder  # noqa: E402

BATCH = 4


def cpu_ms_per_image(work, count: int, rounds: int) -> float:
    """Median over `rounds` of this process's CPU milliseconds per image of work()."""
    work()
    samples = []
    for _ in range(rounds):
        started = time.process_time()
        work()
        samples.append(1000 * (time.process_time() - started) / count)
    return statistics.median(samples)


def layer_shares(encoder, pixels: np.ndarray) -> dict[str, float]:
    """Share of the encoder's time per (layer type, kernel), from OpenVINO's per-layer counters."""
    import openvino as ov

    config = {**encoder.config, "PERF_COUNT": True, "INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}
    request = ov.Core().compile_model(str(encoder.path), "CPU", config).create_infer_request()
    totals: collections.Counter = collections.Counter()
    for n in range(4):
        request.infer({0: pixels})
        if n:
            for layer in request.profiling_info:
                totals[f"{layer.node_type} {layer.exec_type}"] += layer.cpu_time.total_seconds()
    whole = sum(totals.values()) or 1.0
    return {name: round(value / whole, 3) for name, value in totals.most_common(6)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite2", "efficientnet-lite2@224",
                                                        "efficientnet-lite1", "efficientnet-lite0"])
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--sample", type=int, default=200, help="files spread over the folder for the CPU timings")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--index-runs", type=int, default=0, help="whole-process `fastret index` runs per model")
    parser.add_argument("--out", type=Path, default=OUT / "stage_floor.json")
    args = parser.parse_args(argv)

    cores = machine()["cores"]
    peaks = measured_peaks()
    paths = spread(list_images(args.images), args.sample)
    scratch = Path(tempfile.mkdtemp(prefix="fastret-floor-"))
    fastret_bin = str(Path(sys.executable).with_name("fastret"))
    rows = []
    for model in args.models:
        source, _ = resolve_model(model)
        spec = source.preprocessing
        decode_ms = cpu_ms_per_image(lambda: [load_pixels(p, spec, draft=True) for p in paths], len(paths), args.rounds)
        encoder = open_encoder(model, "openvino", threads=1, image_dir=args.images, precision=args.precision)
        pixels = np.stack([load_pixels(p, spec) for p in paths[: 16 * BATCH]])
        batches = [pixels[i : i + BATCH] for i in range(0, len(pixels), BATCH)]
        encode_ms = cpu_ms_per_image(lambda: [encoder.encode(b) for b in batches], len(pixels), args.rounds)
        flops = model_flops(source)
        peak = peaks["int8" if encoder.precision == "int8" else "fp32"] / cores  # one core's GOP/s
        row = {
            "model": model, "precision": encoder.precision, "gflop": round(flops / 1e9, 3),
            "decode_core_ms": round(decode_ms, 2), "encode_core_ms": round(encode_ms, 2),
            "encode_floor_core_ms": round(flops / (peak * 1e9) * 1000, 2),
            "ceiling_images_per_s": round(cores * 1000 / (decode_ms + encode_ms), 1),
            "layers": layer_shares(encoder, batches[0]),
        }
        if args.index_runs:
            walls = []
            for n in range(args.index_runs):
                out = scratch / f"{model.replace('@', '_')}-{n}"
                walls.append(timed_process([fastret_bin, "index", str(args.images), "--model", model, "--out",
                                            str(out), "-q", "--precision", args.precision])[0])
            row["index_images_per_s"] = round(len(list_images(args.images)) / statistics.median(walls), 1)
            row["index_walls_s"] = [round(w, 2) for w in walls]
        rows.append(row)
        print(f"{model}: {row}", file=sys.stderr, flush=True)
    print(f"peak GOP/s on {cores} cores: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    print(table(["model", "prec", "GFLOP", "decode core-ms", "encode core-ms", "encode floor", "ceiling img/s",
                 "fastret index img/s"],
                [[r["model"], r["precision"], r["gflop"], r["decode_core_ms"], r["encode_core_ms"],
                  r["encode_floor_core_ms"], r["ceiling_images_per_s"], r.get("index_images_per_s")] for r in rows]))
    for r in rows:
        print(f"{r['model']} encoder time by layer kind: " + ", ".join(f"{k} {v:.0%}" for k, v in r["layers"].items()))
    write_json(args.out, {"machine": machine(), "images": str(args.images), "peaks_gops": peaks, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
