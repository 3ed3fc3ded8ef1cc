"""Files -> decoded batches -> embeddings, with decoding pipelined against the encoder.

Decoder threads (Pillow releases the GIL while decoding and resampling) fill fixed-size batches
while the encoder works on the previous ones: one batch at a time, or as many at once as the
encoder has parallel requests (OpenVINO's throughput streams). A bad file is skipped with a reason
naming it; it never stops the job.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from fastret.engine.decode import DEFAULT_MAX_PIXELS, ImageError, Preprocessing, Skipped, load_pixels
from fastret.engine.encoders import Encoder, default_threads

DEFAULT_BATCH_SIZE = 4
"""Measured best on 2 cores (BENCHMARKS.md, "CPU speed"): with OpenVINO's two streams, two batches
of 4 in flight beat batch 16 by 5-15%; CLIP on ONNX Runtime INT8 is as fast at 4 as at 16.
GPUs want 64-256 (--batch-size)."""
DEFAULT_WORKERS = max(1, default_threads() // 4)
"""Decoding is ~10% of a CPU encoder's work: one decoder thread per 4 cores keeps it ahead."""


@dataclass
class DecodedBatch:
    paths: list[Path]
    pixels: np.ndarray  # (n, H, W, 3) uint8
    skipped: list[Skipped]
    seconds: float


@dataclass
class EmbedResult:
    """Embeddings of the files that decoded, in input order, and what was skipped and why."""

    paths: list[Path]
    embeddings: np.ndarray
    skipped: list[Skipped] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        total = self.stage_seconds.get("total", 0.0)
        return len(self.paths) / total if total > 0 else 0.0


def decode_batch(
    paths: Sequence[Path], spec: Preprocessing, *, draft: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedBatch:
    """Decode a list of files; failures become Skipped entries, never exceptions."""
    started = time.perf_counter()
    kept: list[Path] = []
    crops: list[np.ndarray] = []
    skipped: list[Skipped] = []
    for path in paths:
        try:
            crops.append(load_pixels(path, spec, draft=draft, max_pixels=max_pixels))
            kept.append(Path(path))
        except ImageError as exc:
            skipped.append(Skipped(Path(path), str(exc)))
        except Exception as exc:  # a decoder bug must not end a batch job either
            skipped.append(Skipped(Path(path), f"unexpected {type(exc).__name__}: {exc}"))
    pixels = np.stack(crops) if crops else np.empty((0, spec.size, spec.size, 3), np.uint8)
    return DecodedBatch(kept, pixels, skipped, time.perf_counter() - started)


def decoded_batches(
    paths: Sequence[Path],
    spec: Preprocessing,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[DecodedBatch]:
    """Yield decoded batches in input order, decoding up to `workers` batches ahead."""
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    if workers <= 0:
        for chunk in chunks:
            yield decode_batch(chunk, spec, draft=draft, max_pixels=max_pixels)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastret-decode") as pool:
        pending: deque = deque()
        chunk_iter = iter(chunks)
        for chunk in chunk_iter:
            pending.append(pool.submit(decode_batch, chunk, spec, draft=draft, max_pixels=max_pixels))
            if len(pending) > workers:
                break
        while pending:
            yield pending.popleft().result()
            next_chunk = next(chunk_iter, None)
            if next_chunk is not None:
                pending.append(pool.submit(decode_batch, next_chunk, spec, draft=draft, max_pixels=max_pixels))


def _timed_encode(encoder: Encoder, pixels: np.ndarray) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    return encoder.encode(pixels), time.perf_counter() - started


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def embed_files(
    paths: Sequence[Path],
    encoder: Encoder,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = False,
    on_skip: Callable[[Skipped], None] | None = None,
) -> EmbedResult:
    """Embed every file that decodes; report the others through `on_skip` as they happen.

    Batches go to the encoder from `encoder.parallel_requests` threads (1 when it has none), in
    order; `encode` in the stage times is the sum of encoder calls, which overlap when parallel.
    """
    spec = encoder.info.preprocessing
    started = time.perf_counter()
    kept: list[Path] = []
    parts: list[np.ndarray] = []
    skipped: list[Skipped] = []
    decode_s = encode_s = 0.0
    slots = max(1, int(getattr(encoder, "parallel_requests", 1)))
    in_flight: deque[tuple[list[Path], Future]] = deque()
    with _progress(len(paths), progress) as bar, ThreadPoolExecutor(slots, thread_name_prefix="fastret-encode") as pool:

        def collect() -> None:
            nonlocal encode_s
            batch_paths, future = in_flight.popleft()
            embeddings, seconds = future.result()
            parts.append(embeddings)
            kept.extend(batch_paths)
            encode_s += seconds
            bar.update(len(batch_paths))

        batches = decoded_batches(
            paths, spec, batch_size=batch_size, workers=workers, draft=draft, max_pixels=max_pixels
        )
        for batch in batches:
            decode_s += batch.seconds
            for skip in batch.skipped:
                skipped.append(skip)
                if on_skip is not None:
                    bar.clear()
                    on_skip(skip)
            bar.update(len(batch.skipped))
            if len(batch.paths):
                in_flight.append((batch.paths, pool.submit(_timed_encode, encoder, batch.pixels)))
            while len(in_flight) >= slots:
                collect()
        while in_flight:
            collect()
    embeddings = np.concatenate(parts) if parts else np.empty((0, encoder.info.dim), np.float32)
    return EmbedResult(
        paths=kept,
        embeddings=embeddings,
        skipped=skipped,
        stage_seconds={
            "decode_worker": round(decode_s, 4),
            "encode": round(encode_s, 4),
            "total": round(time.perf_counter() - started, 4),
        },
    )
