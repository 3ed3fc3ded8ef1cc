"""Encoder throughput of every CPU runtime and precision, with parity and the compute floor.

For each architecture (the bundled EfficientNet-Lite2; the CLIP ViT-B/32 architecture with random
weights, timing only) it times torch eager fp32 (the baseline), ONNX Runtime fp32 / int8,
OpenVINO fp32 / bf16 / int8 on the same real images at one batch size, and reports images/s, the ratio
to torch, min cosine / max abs difference against torch fp32, and how far an image's embedding moves
when it is embedded alone instead of in its batch (dynamic INT8 that scales a whole batch's
activations together moves it; per-row scales do not). Two rates per runtime: one batch
at a time (the encoder as `fastret search` opens it), and pipelined: the encoder as `fastret index`
opens it (workload "throughput"), with as many batches in flight as it serves at once (OpenVINO: one
per stream; ONNX Runtime: one one-thread call per core; torch: one, so its two rates are one). The floor: FLOPs per image
(torch's FLOP counter over convolutions and matrix products) over the machine's measured peak for
the row's arithmetic (a large fp32 / bf16 / int8 matrix product on all cores), i.e. the best
images/s a runtime computing everything in that type could reach.

    python benchmarks/encoder_speed.py --images ../shared/data/wang1k --batch 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clip_random import CLIP_RANDOM, model_argument, model_label  # noqa: E402
from common import OUT, machine, table, write_json  # noqa: E402

from fastret.engine.decode import list_images, load_pixels  # noqa: E402
from fastret.service.load import BackendUnavailable, encoder_for_source  # noqa: E402
from fastret.export.models import resolve_model  # noqa: E402
from fastret.export.onnx_export import compare_embeddings, ensure_exported  # noqa: E402

ALONE_IMAGES = 8
"""Images of the first batch also embedded one at a time, to see if a batch changes them."""
RUNTIMES = (
    ("torch", "fp32"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
)


def model_flops(source) -> float:
    """FLOPs of one image through the model's matrix products and convolutions (torch's counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fastret.export.torch_models import load_torch_model

    model = load_torch_model(source)
    size = source.preprocessing.size
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros((1, size, size, 3), dtype=torch.uint8))
    return float(counter.get_total_flops())


def measured_peaks(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) of a large matrix product on all cores, per arithmetic type: numpy's
    sgemm for fp32, torch's bf16 matmul and int8 `_int_mm` (oneDNN, AVX-512 BF16 / VNNI)."""
    import torch

    torch.set_num_threads(machine()["cores"])
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    products = {
        "fp32": lambda: a @ a,
        "bf16": (lambda b: lambda: b @ b)(torch.from_numpy(a).to(torch.bfloat16)),
        "int8": (lambda q: lambda: torch._int_mm(q, q))(torch.from_numpy(np.clip(a * 30, -127, 127).astype(np.int8))),
    }
    peaks = {}
    for name, product in products.items():
        product()
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - started)
        peaks[name] = 2 * n**3 / best / 1e9
    return peaks


def images_per_second(encoder, pixels: np.ndarray, batch: int, rounds: int) -> float:
    """Best of `rounds` passes over the pixels in batches (best-of resists a noisy machine)."""
    encoder.encode(pixels[:batch])
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(0, len(pixels), batch):
            encoder.encode(pixels[i : i + batch])
        best = min(best, time.perf_counter() - started)
    return len(pixels) / best


def pipelined_images_per_second(encoder, pixels: np.ndarray, batch: int, rounds: int) -> float:
    """Best of `rounds` passes with encoder.parallel_requests batches in flight, as embed_files runs."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
    with ThreadPoolExecutor(encoder.parallel_requests) as pool:
        list(pool.map(encoder.encode, batches[: encoder.parallel_requests]))
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            list(pool.map(encoder.encode, batches))
            best = min(best, time.perf_counter() - started)
    return len(pixels) / best


def bench_model(name: str, images: Path, count: int, batch: int, rounds: int) -> list[dict]:
    source, _ = resolve_model(model_argument(name))
    ensure_exported(source, image_dir=images, log=lambda _: None)
    pixels = np.stack([load_pixels(p, source.preprocessing) for p in list_images(images)[:count]])
    flops = model_flops(source)
    rows, reference, torch_rate = [], None, None
    for backend, precision in RUNTIMES:
        try:
            encoder = encoder_for_source(source, backend, precision=precision, image_dir=images, log=lambda _: None)
        except BackendUnavailable as exc:
            rows.append({"model": model_label(name), "runtime": f"{backend} {precision}", "skipped": str(exc)})
            continue
        embeddings = np.concatenate([encoder.encode(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])
        alone = np.concatenate([encoder.encode(pixels[i : i + 1]) for i in range(ALONE_IMAGES)])
        rate = images_per_second(encoder, pixels, batch, rounds)
        if backend != "torch":
            batch_job = encoder_for_source(
                source, backend, precision=precision, image_dir=images, workload="throughput", log=lambda _: None
            )
            pipelined = pipelined_images_per_second(batch_job, pixels, batch, rounds)
        else:
            pipelined = rate
        if reference is None:
            reference, torch_rate = embeddings, rate
        parity = compare_embeddings(reference, embeddings, str(images))
        rows.append(
            {
                "model": model_label(name),
                "runtime": f"{backend} {precision}",
                "images_per_s": round(rate, 1),
                "vs_torch": round(rate / torch_rate, 2),
                "pipelined_images_per_s": round(pipelined, 1),
                "pipelined_vs_torch": round(pipelined / torch_rate, 2),
                "min_cosine_vs_torch": round(parity.min_cosine, 6),
                "max_abs_diff_vs_torch": float(f"{parity.max_abs_diff:.2e}"),
                "min_cosine_alone_vs_in_batch": round(float((alone * embeddings[:ALONE_IMAGES]).sum(1).min()), 7),
                "gflops_per_image": round(flops / 1e9, 3),
            }
        )
    return rows


def _cosine(value: float | None) -> str | None:
    """Cosines near 1 print with all their digits (the table's 3 decimals would show 1.000)."""
    return None if value is None else f"{value:.7f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of real images")
    parser.add_argument("--count", type=int, default=64, help="images per pass")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="best of this many passes (the machine has slow phases)")
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite2", CLIP_RANDOM])
    parser.add_argument("--out", type=Path, default=OUT / "encoder_speed.json")
    args = parser.parse_args(argv)

    peaks = measured_peaks()
    rows = [row for name in args.models for row in bench_model(name, args.images, args.count, args.batch, args.rounds)]
    for row in rows:
        if "images_per_s" in row:
            floor = peaks[row["runtime"].split()[-1]] / row["gflops_per_image"]
            row["floor_images_per_s"] = round(floor, 1)
            row["share_of_floor"] = round(row["pipelined_images_per_s"] / floor, 2)
    header = ["model", "runtime", "images/s", "x torch", "pipelined", "x torch", "min cos", "alone vs batch",
              "GFLOP/img", "floor img/s", "of floor (pipelined)"]
    print(
        f"measured peaks on {machine()['cores']} cores (2048^3 matrix product): "
        + ", ".join(f"{name} {value:.0f}" for name, value in peaks.items())
        + f" GFLOP/s; batch {args.batch}; floor = the row's precision's peak / GFLOP per image"
    )
    print(
        table(
            header,
            [
                [r["model"], r["runtime"], r.get("images_per_s"), r.get("vs_torch"), r.get("pipelined_images_per_s"),
                 r.get("pipelined_vs_torch"), _cosine(r.get("min_cosine_vs_torch")),
                 _cosine(r.get("min_cosine_alone_vs_in_batch")), r.get("gflops_per_image"),
                 r.get("floor_images_per_s"), r.get("share_of_floor")]
                for r in rows
            ],
        )
    )
    for row in rows:
        if "skipped" in row:
            print(f"skipped {row['model']} {row['runtime']}: {row['skipped']}")
    peaks_json = {name: round(value, 1) for name, value in peaks.items()}
    write_json(args.out, {"machine": machine(), "peak_gflops": peaks_json, "batch": args.batch, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
