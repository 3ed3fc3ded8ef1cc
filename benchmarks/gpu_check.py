"""GPU runtimes side by side: database throughput, query latency and parity, per model.

For the CLIP ViT-B/32 architecture (random weights, timing only; benchmarks/clip_random.py) and
the bundled EfficientNet-Lite2 (when its packages import), on every GPU runtime present:

  torch fp32 eager       the GPU PyTorch baseline (backend torch-cuda)
  torch fp16 eager       autocast FP16, no graphs (shows what the graphs add)
  torch fp16 + graphs    backend torch-cuda-fp16
  ORT CUDA EP            backend onnxruntime on an onnxruntime-gpu build (FP16 ONNX)
  ORT TensorRT EP        backend onnxruntime-trt
  TensorRT plan          backend tensorrt (plan built here by export-engine's builder)

Throughput = images/s over pre-decoded uint8 batches of 1, 32 and 256 (host -> GPU -> host,
decoding excluded), streamed through `encode_batches` (two batches in flight) where the encoder
has it; query latency = p50 / p90 of single-image `encode` calls. Parity = min cosine against
torch fp32 eager on the same 16 parity images.

    python benchmarks/gpu_check.py [--out DIR] [--dry-run] [--images DIR]

Without a CUDA device (or with --dry-run) it runs the same flow on CPU stand-ins (a tiny random
CLIP, torch fp32 and autocast fp16 on the CPU, batches 1 and 2) and says so: not GPU figures.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from clip_random import LABEL as CLIP_LABEL
from clip_random import clip_random_dir
from common import OUT, machine, table, write_json

from fastret.engine.cuda_torch import TorchCudaEncoder, cuda_missing
from fastret.service.load import encoder_for_source, model_info
from fastret.engine.tensorrt_runtime import tensorrt_missing
from fastret.export.models import ModelSource, bundled_source, clip_source
from fastret.export.torch_models import load_torch_model
from fastret.export.onnx_export import compare_embeddings, ensure_exported, parity_pixels

GPU_BATCHES = (1, 32, 256)
DRY_BATCHES = (1, 2)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tiny_clip_dir(directory: Path = Path("/tmp/fastret-clip-tiny")) -> Path:
    """The dry run's model: a 2-layer, 32 px random CLIP (seconds on any CPU)."""
    if not (directory / "config.json").is_file():
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        torch.manual_seed(0)
        config = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=16,
        )
        CLIPVisionModelWithProjection(config).eval().save_pretrained(directory)
    return directory


def model_sources(dry_run: bool) -> list[tuple[str, ModelSource | None, str]]:
    """(label, source or None, why skipped) for the two models (a tiny CLIP only in a dry run)."""
    if dry_run:
        tiny = clip_source(tiny_clip_dir(), "clip-tiny-random")
        return [("tiny random CLIP (dry run)", tiny, ""), ("efficientnet-lite2 (bundled)", None, "dry run")]
    models: list[tuple[str, ModelSource | None, str]] = [
        (CLIP_LABEL, clip_source(clip_random_dir(), "clip-vit-b32-random"), "")
    ]
    try:
        import efficientnet_lite_pytorch  # noqa: F401

        models.append(("efficientnet-lite2 (bundled ImageNet weights)", bundled_source(), ""))
    except Exception as exc:  # ImportError or ModelNotFound: the packages are not on this machine
        models.append(("efficientnet-lite2 (bundled)", None, f"not importable here ({type(exc).__name__}: {exc})"))
    return models


def gpu_runtimes(source: ModelSource) -> list[tuple[str, Callable | None, str]]:
    """(label, factory or None, why skipped) for every GPU runtime, fp32 eager first."""
    import onnxruntime as ort

    info = model_info(source)
    available = ort.get_available_providers()
    no_ort_gpu = f"onnxruntime {ort.__version__} has {', '.join(available)} only"
    trt_missing = tensorrt_missing()

    def tensorrt_encoder():
        from fastret.engine.tensorrt_runtime import TensorRTEncoder
        from fastret.export.tensorrt_build import build_plan_for_export

        return TensorRTEncoder(build_plan_for_export(ensure_exported(source, log=log), log=log), info)

    return [
        ("torch fp32 eager", lambda: encoder_for_source(source, "torch-cuda", log=log), ""),
        ("torch fp16 eager", lambda: TorchCudaEncoder(load_torch_model(source), info, half=True, graphs=False), ""),
        ("torch fp16 + CUDA graphs", lambda: encoder_for_source(source, "torch-cuda-fp16", log=log), ""),
        (
            "ORT CUDA EP (fp16 ONNX)",
            (lambda: encoder_for_source(source, "onnxruntime", log=log)) if "CUDAExecutionProvider" in available else None,
            no_ort_gpu,
        ),
        (
            "ORT TensorRT EP (fp16)",
            (lambda: encoder_for_source(source, "onnxruntime-trt", log=log)) if "TensorrtExecutionProvider" in available else None,
            no_ort_gpu,
        ),
        ("TensorRT plan (fp16)", tensorrt_encoder if trt_missing is None else None, trt_missing or ""),
    ]


def cpu_stand_ins(source: ModelSource) -> list[tuple[str, Callable | None, str]]:
    """The dry run's runtimes: the same measuring code, on the CPU."""
    info = model_info(source)
    return [
        ("torch fp32 eager (CPU, dry run)", lambda: encoder_for_source(source, "torch", log=log), ""),
        (
            "torch fp16 autocast (CPU, dry run)",
            lambda: TorchCudaEncoder(load_torch_model(source), info, half=True, graphs=False, max_batch=8, device="cpu"),
            "",
        ),
        ("GPU runtimes", None, "dry run: no CUDA device"),
    ]


def stream(encoder, batch: np.ndarray, count: int) -> None:
    """Encode `batch` `count` times, two in flight where the encoder streams."""
    batches = itertools.repeat(batch, count)
    for _ in encoder.encode_batches(batches) if hasattr(encoder, "encode_batches") else map(encoder.encode, batches):
        pass


def images_per_second(encoder, batch: np.ndarray, min_seconds: float) -> float:
    """Throughput at one batch size: 2 warm-up batches, then enough to fill min_seconds (at least 3)."""
    stream(encoder, batch, 2)
    started = time.perf_counter()
    stream(encoder, batch, 1)
    one = max(time.perf_counter() - started, 1e-6)
    count = min(max(3, math.ceil(min_seconds / one)), 500)
    started = time.perf_counter()
    stream(encoder, batch, count)
    return len(batch) * count / (time.perf_counter() - started)


def query_latency_ms(encoder, image: np.ndarray, calls: int) -> dict:
    """p50 / p90 of single-image encode() calls after 5 warm-up calls."""
    for _ in range(5):
        encoder.encode(image)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        encoder.encode(image)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90))}


def release_gpu_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_model(label: str, source: ModelSource, runtimes, batches, min_seconds: float, calls: int, images) -> dict:
    """Every runtime of one model: parity vs the first (fp32 eager) runtime, throughput, latency."""
    spec = source.preprocessing
    parity_batch, parity_source = parity_pixels(spec, images)
    rng = np.random.default_rng(0)
    timing = {b: rng.integers(0, 256, size=(b, spec.size, spec.size, 3), dtype=np.uint8) for b in batches}
    rows, reference = [], None
    for name, factory, why in runtimes:
        if factory is None:
            rows.append({"runtime": name, "skipped": why})
            log(f"{label} / {name}: skipped ({why})")
            continue
        log(f"{label} / {name}: measuring")
        try:
            encoder = factory()
            embeddings = encoder.encode(parity_batch)
            reference = embeddings if reference is None else reference
            row = {
                "runtime": name,
                "backend": encoder.backend,
                "parity_vs_fp32_eager": compare_embeddings(reference, embeddings, parity_source).to_dict(),
                "images_per_second": {str(b): images_per_second(encoder, timing[b], min_seconds) for b in batches},
                "query_latency_ms": query_latency_ms(encoder, timing[batches[0]][:1], calls),
            }
        except Exception as exc:  # one runtime failing on a lent GPU must not cost the others' figures
            row = {"runtime": name, "skipped": f"failed: {type(exc).__name__}: {exc}"}
            log(f"{label} / {name}: {row['skipped']}")
        rows.append(row)
        encoder = None
        release_gpu_memory()
    return {"model": label, "model_id": source.model_id, "parity_images": parity_source, "runtimes": rows}


def device_description(dry_run: bool) -> dict:
    import onnxruntime as ort
    import torch

    described = {
        **machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "tensorrt": tensorrt_missing() or __import__("tensorrt").__version__,
        "dry_run": dry_run,
    }
    if not dry_run:
        major, minor = torch.cuda.get_device_capability(0)
        described.update(
            gpu=torch.cuda.get_device_name(0),
            compute_capability=f"{major}.{minor}",
            tf32_matmul=getattr(torch.backends.cuda.matmul, "allow_tf32", None),
            tf32_cudnn=getattr(torch.backends.cudnn, "allow_tf32", None),
        )
    return described


def print_model_table(result: dict, batches) -> None:
    header = ["runtime", "min cos vs fp32", *[f"img/s @{b}" for b in batches], "query p50 ms", "p90 ms"]
    measured = [row for row in result["runtimes"] if "skipped" not in row]
    rows = [
        [
            row["runtime"],
            f"{row['parity_vs_fp32_eager']['min_cosine']:.6f}",
            *[f"{row['images_per_second'][str(b)]:.1f}" for b in batches],
            f"{row['query_latency_ms']['p50']:.2f}",
            f"{row['query_latency_ms']['p90']:.2f}",
        ]
        for row in measured
    ]
    print(f"\n{result['model']}  (parity images: {result['parity_images']})")
    print(table(header, rows))
    for row in result["runtimes"]:
        if "skipped" in row:
            print(f"  {row['runtime']}: skipped: {row['skipped']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT / "gpu", help="folder for gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU stand-ins: check the flow without a GPU")
    parser.add_argument("--images", type=Path, default=None, help="real images for the parity check")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timed seconds per throughput figure")
    args = parser.parse_args(argv)

    missing = cuda_missing()
    dry_run = args.dry_run or missing is not None
    if dry_run:
        print(f"DRY RUN ({missing or '--dry-run'}): CPU stand-ins, batches {DRY_BATCHES}; these are not GPU figures.")
    device = device_description(dry_run)
    batches = DRY_BATCHES if dry_run else GPU_BATCHES
    min_seconds, calls = (0.05, 3) if dry_run else (args.seconds, 50)
    results = []
    for label, source, why in model_sources(dry_run):
        if source is None:
            print(f"\n{label}: skipped: {why}")
            results.append({"model": label, "skipped": why})
            continue
        runtimes = cpu_stand_ins(source) if dry_run else gpu_runtimes(source)
        result = measure_model(label, source, runtimes, batches, min_seconds, calls, args.images)
        print_model_table(result, batches)
        results.append(result)
    report = {
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device,
        "method": {
            "throughput": "pre-decoded uint8 batches, host->device->host, streamed two in flight where supported",
            "latency": f"single-image encode(), {calls} calls after 5 warm-up",
            "parity": "min cosine vs torch fp32 eager (first runtime) on the same images",
        },
        "models": results,
    }
    write_json(args.out / "gpu_check.json", report)
    print(f"\nwrote {args.out / 'gpu_check.json'}")
    print(json.dumps(report["device"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
